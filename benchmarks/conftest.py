"""pytest setup for the micro-benchmarks: benchmarks/ is outside tests/, so tests/conftest.py does not apply
here and the ``cuda`` marker's skip is repeated."""
import os
import sys

import pytest
import torch

# pytest puts this directory on sys.path (rootdir-less "prepend" import) for the test modules; the repository
# root must be there too when dla_fast is not installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
