"""Packaging for dla-fast, and the build of the optional CUDA extension ``dla_fast._C``.

Environment knobs:

* ``DLA_FAST_SKIP_CUDA=1``   install without the extension on purpose.
* ``DLA_FAST_FORCE_CUDA=1``  fail the install when the extension cannot be built (CI on CUDA machines).
* ``DLA_FAST_CUDA_ARCHS``    target GPUs, e.g. ``"80;90a"`` (default) or ``"90a"``; ``+PTX`` on an entry also
                             embeds PTX for it. ``90a`` (Hopper's arch-specific target) is what enables the
                             wgmma kernels; plain ``90`` builds run the portable mma.sync kernels on an H100.
* ``CUDA_HOME``              the CUDA toolkit; found from ``nvcc`` when unset.
* ``MAX_JOBS``               parallel compile jobs (torch's BuildExtension honours it).

Install: ``pip install --no-build-isolation -e .`` (the build imports the installed torch).
"""
from __future__ import annotations

import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;90a"


def _log(msg: str) -> None:
    # stderr, so that pip shows it even without -v when the build succeeds
    print(f"[dla-fast setup] {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_cuda_home(d: str | None) -> bool:
    return bool(d) and os.path.isfile(os.path.join(d, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(d, "include", "cuda_runtime.h"))


def _nvcc_wrapper_target(path: str) -> str | None:
    """If ``path`` is a shell script wrapping nvcc (e.g. ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the
    toolkit directory it points at."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for m in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
        cand = m.group(1).decode(errors="replace")
        if _is_cuda_home(cand):
            return cand
    return None


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None.

    torch.utils.cpp_extension guesses ``dirname(dirname(which nvcc))``, which is wrong when ``nvcc`` on PATH is
    a wrapper script in /usr/local/bin (it would pick /usr/local and fail with ``cannot find -lcudart``), so
    resolve it here and export CUDA_HOME before cpp_extension is imported.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if _is_cuda_home(env):
            return env
        _log(f"CUDA_HOME={env!r} has no bin/nvcc + include/cuda_runtime.h; looking for the toolkit elsewhere")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cand = os.path.dirname(os.path.dirname(real))
        if _is_cuda_home(cand):
            return cand
        cand = _nvcc_wrapper_target(real)
        if cand:
            return cand
    candidates = ["/usr/local/cuda"]
    if os.path.isdir("/usr/local"):
        candidates += sorted((os.path.join("/usr/local", d) for d in os.listdir("/usr/local")
                              if d.startswith("cuda-")), reverse=True)
    for cand in candidates:
        if _is_cuda_home(cand):
            return cand
    return None


def arch_flags(spec: str) -> list[str]:
    flags = []
    entries = [e.strip() for e in re.split(r"[;,\s]+", spec) if e.strip()]
    if not entries:
        raise ValueError(f"DLA_FAST_CUDA_ARCHS={spec!r} names no architecture")
    for e in entries:
        ptx = e.endswith("+PTX")
        a = e[:-4] if ptx else e
        a = a.replace(".", "").replace("sm_", "").replace("compute_", "")
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise ValueError(f"DLA_FAST_CUDA_ARCHS entry {e!r} is not like '80', '90', '90a' or '90+PTX'")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{a},code=compute_{a}")
    return flags


CSRC = "csrc"
# Host code (ops), device code (kernels) and the generated per-dtype translation units (instantiations).
SOURCE_DIRS = ("ops", "kernels", "instantiations")


def extension_sources() -> list[str]:
    """Every .cpp/.cu file under csrc/ops, csrc/kernels and csrc/instantiations, relative to the repository root."""
    out = []
    for d in SOURCE_DIRS:
        for folder, _, files in os.walk(os.path.join(ROOT, CSRC, d)):
            rel = os.path.relpath(folder, ROOT)
            out += sorted(os.path.join(rel, f) for f in files if f.endswith((".cpp", ".cu")))
    return sorted(out)


def generated_stale() -> list[tuple[str, str]]:
    """(file under csrc/, its generator) for each generated source that differs from its generator's output."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("dla_fast_csrc_generated",
                                                  os.path.join(ROOT, CSRC, "tools", "_generated.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.all_stale()


def cuda_extension():
    """(ext_modules, cmdclass) for dla_fast._C, or ([], {}) with the reason printed when it cannot be built."""
    if _flag("DLA_FAST_SKIP_CUDA"):
        _log("DLA_FAST_SKIP_CUDA is set: installing WITHOUT the CUDA extension dla_fast._C "
             "(the Triton/eager backends still work)")
        return [], {}
    force = _flag("DLA_FAST_FORCE_CUDA")

    def skip(why: str):
        msg = (f"NOT building the CUDA extension dla_fast._C: {why}. The package installs without it and "
               "backend='auto' uses Triton/eager; set DLA_FAST_FORCE_CUDA=1 to make this an error.")
        if force:
            raise RuntimeError(f"DLA_FAST_FORCE_CUDA=1 but {why}")
        _log("*" * 100)
        _log(msg)
        _log("*" * 100)
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension computes its module-level CUDA_HOME
    try:
        import torch
    except ImportError as e:  # pragma: no cover - pip --no-build-isolation needs torch installed first
        return skip(f"torch is not importable ({e}); install torch first and use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"this torch ({torch.__version__}) is a CPU-only build (torch.version.cuda is None)")
    if cuda_home is None:
        return skip("no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset, no /usr/local/cuda)")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    try:
        archs = arch_flags(os.environ.get("DLA_FAST_CUDA_ARCHS", DEFAULT_ARCHS))
    except ValueError as e:
        return skip(str(e))

    sm90a = any("code=sm_90a" in f for f in archs)
    if sm90a and int(torch.version.cuda.split(".")[0]) < 12:
        _log(f"CUDA {torch.version.cuda} cannot target sm_90a (needs 12.0+): building sm_90 instead, "
             "without the Hopper wgmma kernels")
        archs = [f.replace("90a", "90") for f in archs]
        sm90a = False
    _log(f"building dla_fast._C with CUDA_HOME={cuda_home}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
         f"archs {' '.join(archs)}" + (" (with the sm_90a wgmma kernels)" if sm90a else ""))
    # Host code picks the wgmma kernels only when their sm_90a image is in the binary.
    defines = ["-DDLA_FAST_SM90A"] if sm90a else []
    stale = generated_stale()
    if stale:
        raise RuntimeError("generated CUDA sources are out of date: " + "; ".join(
            f"csrc/{f} (run python csrc/tools/{gen})" for f, gen in stale))
    sources = extension_sources()
    nvcc_flags = [
        "-O3",
        "-lineinfo",  # source lines in compute-sanitizer / ncu reports; no run-time cost
        # no --use_fast_math: the fp32 path promises IEEE results (fast-math flushes denormals, approximates)
        "--expt-relaxed-constexpr",
    ] + archs + defines
    ext = CUDAExtension(
        name="dla_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],  # includes name their folder: "ops/launch.h"
        # -g0: Python's CFLAGS carry -g, which triples the .so and the host compile time for no use here
        extra_compile_args={"cxx": ["-O3", "-g0"] + defines, "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def version() -> str:
    """The package version, read from dla_fast/version.py (its single source) without importing the package."""
    with open(os.path.join(ROOT, "dla_fast", "version.py")) as f:
        m = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if m is None:
        raise RuntimeError("dla_fast/version.py does not define __version__ = \"...\"")
    return m.group(1)


def main() -> None:
    ext_modules, cmdclass = cuda_extension()
    setup(
        name="dla-fast",
        version=version(),
        description="A fast drop-in replacement for timm's DLA models (fused conv+BN+act and aggregation kernels)",
        packages=find_packages(include=["dla_fast", "dla_fast.*"]),
        package_data={"dla_fast.plan": ["prior/*.json"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "numpy"],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "timm", "safetensors", "onnx", "onnxscript", "onnxruntime"],
            "bench": ["matplotlib"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


# setuptools runs this file as __main__; tests import it for the helpers above without building.
if __name__ == "__main__":
    main()
