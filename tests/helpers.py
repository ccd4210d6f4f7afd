"""Shared test utilities, re-exported from the package so that tests and `verify` draw and measure alike."""
import pytest

from dla_fast.verify import randomize_bn, rel_err  # noqa: F401  (the one copy of each)


def timm_or_skip():
    return pytest.importorskip("timm", reason="timm is the reference for these tests (pip install timm)")
