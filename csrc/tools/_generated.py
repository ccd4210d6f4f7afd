"""What the csrc generators share: where csrc/ is, writing or checking a generator's files, and the list of
generators (for setup.py's build-time check and the CPU test that the generated files are in sync).

Every generator defines ``render() -> {path relative to csrc/: text}``; run as a script it writes those files,
or with ``--check`` lists the ones that differ from what is on disk (exit status 1) and writes nothing.
"""
import importlib.util
import os
import sys
from typing import Callable, Dict, List, Tuple

TOOLS = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(TOOLS)
ROOT = os.path.dirname(CSRC)
GENERATORS = ("gen_schema.py", "gen_instantiations.py", "gen_wgmma.py")


def load(name: str):
    """A generator module, loaded from its path (csrc/tools is no package)."""
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(TOOLS, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stale(files: Dict[str, str]) -> List[str]:
    """The paths (relative to csrc/) whose file on disk is missing or differs from ``files``."""
    out = []
    for rel, text in files.items():
        try:
            with open(os.path.join(CSRC, rel), encoding="utf-8", newline="") as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        out.append(rel)
    return out


def all_stale() -> List[Tuple[str, str]]:
    """(generated file, the generator that writes it) for every generated file that is out of date."""
    return [(rel, gen) for gen in GENERATORS for rel in stale(load(gen).render())]


def main(render: Callable[[], Dict[str, str]], argv: List[str]) -> int:
    files = render()
    if "--check" in argv:
        bad = stale(files)
        for rel in bad:
            print(f"csrc/{rel} is out of date: run python {os.path.relpath(sys.argv[0], ROOT)}", file=sys.stderr)
        return 1 if bad else 0
    for rel, text in files.items():
        path = os.path.join(CSRC, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        print("wrote", os.path.relpath(path, ROOT))
    return 0
