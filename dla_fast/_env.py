"""Every ``DLA_FAST_*`` environment switch the package reads at run time, in one table, each read once.

The table below is the documentation (``docs/environment.md`` renders the same list and adds the build-time
switches that only ``setup.py`` reads). Values are read on first use and cached: a switch is a setting for the
process, not something to flip between calls; tests that change one call :func:`reload`. The CUDA extension
reads its three debugging overrides (``DLA_FAST_CUDA_KERNEL``, ``DLA_FAST_CUDA_WIDE_BN``,
``DLA_FAST_CUDA_IM2COL``) once in C++; they are listed here so that one table names every switch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Switch:
    name: str
    values: str
    default: str
    doc: str
    read_by: str = "python"  # "python", "c++" (the extension), "build" (setup.py), "tests"


SWITCHES: Tuple[Switch, ...] = (
    Switch("DLA_FAST_CACHE_DIR", "a directory", "$XDG_CACHE_HOME/dla_fast or ~/.cache/dla_fast",
           "where tuned per-layer plans are kept (one file per GPU model and software versions)"),
    Switch("DLA_FAST_PRIOR", "off, or a prior JSON file", "the prior shipped for the GPU's compute capability",
           "the committed measurements used before the GPU's own tuning exists; 'off' uses the rules alone"),
    Switch("DLA_FAST_FRONT", "0, 1, auto", "auto",
           "the fused front (stem + level 0 + level 1 as one Triton kernel): auto runs it under backend='triton' on a "
           "GPU, and under backend='auto' for fp16 calls not paced by launches; 1 wherever the Triton kernels run (the "
           "CPU interpreter too; under backend='auto' for fp16/bf16 calls not paced by launches); 0 never"),
    Switch("DLA_FAST_TRAIN_DGRAD", "aten, triton", "triton on a GPU",
           "the data gradient of the front's thin stride-1 convs in fused training (at most 16 input channels: level "
           "0's 3x3): triton (the Triton conv kernel run on dz with the weight flipped and transposed, as the shared "
           "data gradients run; set, also under the CPU interpreter) or aten (cuDNN)"),
    Switch("DLA_FAST_TRAIN_SAVE_MEMORY", "prologue, recompute", "prologue",
           "how set_fused_training(save_memory=True) avoids keeping a block's inner activations: prologue (the next "
           "conv normalises its input as it loads it) or recompute (a pass of its own forms it, dropped after the "
           "conv)"),
    Switch("DLA_FAST_TRAIN_STATS_PASS", "stem, all", "stem",
           "which fused-training convs form z on the CUDA extension's conv and their BN statistics in a pass over z "
           "afterwards: stem (the few-input-channel convs, where the Triton kernel's gather is slow) or all (every "
           "conv without a BN prologue that the extension runs; the others keep the Triton conv, whose epilogue "
           "reduces the statistics as it writes z; slower on the H100's captured step, kept for comparisons)"),
    Switch("DLA_FAST_TRAIN_TILES", "1x1=BM,BN,BK,WARPS,STAGES;kxk=...;agg=...", "unset (the class rule's tiles)",
           "a tuning override of the fused-training statistics convs' tiles per class of dense ungrouped conv without "
           "the BN prologue (1x1, larger kernels, the aggregation node), for A/Bs of `opbench.py --train --tiles`; "
           "a layer the tile does not suit keeps its plan"),
    Switch("DLA_FAST_TRAIN_ELTWISE", "ELEMENTS,WARPS,CHANNELS", "2048,4,64",
           "a tuning override of the fused-training elementwise BN kernels (BN apply, BN backward's two passes, the "
           "statistics pass): elements a program covers, its warps, channels a tile at most"),
    Switch("DLA_FAST_TRAIN_STATS_TILE", "pixels, channels", "channels",
           "the statistics convs' tile in fused training: channels (the tile transposed, channels as the MMA's rows, "
           "so each channel's statistics are reduced within one warp; dense convs and the aggregation node without "
           "the BN prologue, tiles of at least 64 channels) or pixels (pixels as the MMA's rows everywhere; the "
           "epilogue reduces the statistics across warps)"),
    Switch("DLA_FAST_TRAIN_WGRAD", "aten, triton", "triton on a GPU",
           "the weight gradient of the front's thin convs in fused training (at most 16 input channels: the stem and "
           "levels 0-1): triton (a split-pixel reduction kernel of dla_fast's; set, also under the CPU interpreter) "
           "or aten (cuDNN)"),
    Switch("DLA_FAST_TRITON_CONV", "dense, flat, blockdiag, direct", "unset",
           "debugging: force the Triton conv kernel family wherever the plan leaves the tiles to the heuristic"),
    Switch("DLA_FAST_TRITON_SPLITK", "epilogue, kernel", "epilogue",
           "how the Triton heuristic's split-K convs and aggregation nodes (grids too small to fill the GPU: batch 1 "
           "at 7x7-28x28) sum their fp32 partials: epilogue (a second kernel) or kernel (the last program of each "
           "tile, in the GEMM kernel: one launch fewer a layer); the same bits either way, and tuning times both"),
    Switch("DLA_FAST_TRITON_POISON", "0, 1", "0",
           "tests: Triton outputs start as NaN, so an element a kernel never writes shows up"),
    Switch("DLA_FAST_CUDA_KERNEL", "auto, wgmma, tc, simt, direct", "auto",
           "debugging: force the CUDA kernel family over the plan (falls back wgmma -> tc -> simt)", "c++"),
    Switch("DLA_FAST_CUDA_WIDE_BN", "64, 128, 256", "unset",
           "debugging: force the width of the wide CUDA tensor-core tiles over the plan", "c++"),
    Switch("DLA_FAST_CUDA_IM2COL", "0, 1", "unset",
           "debugging: 0 loads the input by cp.async gather instead of TMA im2col on the wgmma tiles", "c++"),
    Switch("DLA_FAST_REQUIRE_EXT", "0, 1", "0",
           "tests: a missing dla_fast._C fails the CUDA tests instead of skipping them", "tests"),
    Switch("DLA_FAST_SKIP_CUDA", "0, 1", "0", "install without the CUDA extension", "build"),
    Switch("DLA_FAST_FORCE_CUDA", "0, 1", "0",
           "fail the install when the CUDA extension cannot be built", "build"),
    Switch("DLA_FAST_CUDA_ARCHS", "e.g. 80;90a", "80;90a",
           "GPU architectures of the extension; 90a enables the Hopper wgmma/TMA kernels", "build"),
)

_BY_NAME: Dict[str, Switch] = {s.name: s for s in SWITCHES}
_cache: Dict[str, Optional[str]] = {}


def get(name: str) -> Optional[str]:
    """The switch's value (stripped; None when unset or empty), read from the environment once."""
    if name not in _BY_NAME:
        raise KeyError(f"{name} is not a dla_fast switch; known: {', '.join(_BY_NAME)}")
    if name not in _cache:
        v = os.environ.get(name, "").strip()
        _cache[name] = v or None
    return _cache[name]


def choice(name: str) -> Optional[str]:
    """A switch that takes one of the words its table entry lists (``values``): the word, lowercased, or None
    when unset. Any other value raises, naming the valid ones."""
    v = get(name)
    if v is None:
        return None
    words = [w.strip() for w in _BY_NAME[name].values.split(",")]
    if v.lower() not in words:
        raise ValueError(f"{name}={v.lower()!r} is not a mode: use {' or '.join(words)}")
    return v.lower()


def flag(name: str) -> bool:
    """A 0/1 switch as a bool."""
    return (get(name) or "0").lower() not in ("0", "false", "no", "off")


def reload() -> None:
    """Forget the values read so far (tests that change a switch call this)."""
    _cache.clear()


def markdown_table() -> str:
    """The table of docs/environment.md."""
    lines = ["| variable | values | default | read by | what it does |", "|---|---|---|---|---|"]
    for s in SWITCHES:
        lines.append(f"| `{s.name}` | {s.values} | {s.default} | {s.read_by} | {s.doc} |")
    return "\n".join(lines)
