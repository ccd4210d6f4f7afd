"""Data-parallel benchmarking on torch.distributed: one process per GPU, launched by torchrun.

``torchrun --nproc_per_node N -m dla_fast bench ...`` (or ``python -m dla_fast bench --distributed N ...``, which
starts that command) runs the benchmark on every rank at once, each on ``cuda:LOCAL_RANK`` with the batch given by
``--batch-size`` (per rank). For each (model, dtype, batch) group:

1. every rank builds each implementation on its own device (local: a failure becomes that implementation's error
   row, as in the single-process benchmark, and every rank skips it);
2. collective set-up (DDP's parameter broadcast for training steps);
3. rank 0 alone times every implementation while the other ranks wait at a barrier (CPU-side, on a gloo group, so
   their GPUs stay idle): the single-GPU figure of this run;
4. all ranks time every implementation together, a barrier before each sample so that the ranks run the same
   implementation at the same time;
5. rank 0 gathers every rank's samples and :func:`aggregate` (a pure function) makes the rows: per-rank img/s, the
   aggregate (their sum), the paced figure (the node's images per slowest-rank sample) and the scaling efficiency
   (aggregate / (world size x rank 0 alone)).

Only rank 0 logs, prints and writes ``--json``. An exception after the local build phase ends the rank that raised
it, with a line naming the rank, and torchrun then stops the others and exits non-zero.

Training steps (``--train``): forward, cross-entropy, backward, SGD (momentum 0.9, weight decay 1e-4), with
torch's DistributedDataParallel (gradient all-reduce overlapped with backward) and per-process BN statistics; rank 0
alone times the same step without DDP. :data:`TRAIN_BUILDERS` maps an implementation name to its case builder, the
hook a training path of dla_fast's own adds itself to.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

# The training steps: timm's model eager and under torch.compile (default mode), ours on the modules (eager) and on
# the fused training kernels (set_fused_training; off CUDA or in float32 it falls back to the modules);
# "_save_memory": set_fused_training(save_memory=True); "_graph": the same model's forward and backward replayed
# from a CUDA graph (dla_fast.train.graph), rank 0 alone, no DDP.
TRAIN_IMPLS = ("timm_eager", "torch_compile", "dla_fast_eager", "dla_fast_fused", "dla_fast_fused_save_memory",
               "timm_eager_graph", "dla_fast_fused_graph", "dla_fast_fused_save_memory_graph")
TRAIN_DEFAULT_IMPLS = {"cuda": ("timm_eager", "torch_compile", "dla_fast_fused", "dla_fast_fused_graph"),
                       "cpu": ("timm_eager", "dla_fast_eager")}
GPU_ONLY_IMPLS = ("dla_fast_cudagraph", "dla_fast_aoti", "torch_compile_reduce_overhead", "timm_eager_graph",
                  "dla_fast_fused_graph", "dla_fast_fused_save_memory_graph")
SGD_ARGS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
KEY_FIELDS = ("model", "dtype", "batch_size", "impl", "mode")


# ------------------------------------------------------------------------------------------ where this rank is


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int


_WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def world_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[World]:
    """This process's place in a torchrun launch, from RANK / WORLD_SIZE / LOCAL_RANK; None when none is set (a
    plain single-process run)."""
    env = os.environ if environ is None else environ
    present = [v for v in _WORLD_VARS if env.get(v, "") != ""]
    if not present:
        return None
    if len(present) != len(_WORLD_VARS):
        missing = [v for v in _WORLD_VARS if v not in present]
        raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} not: launch with torchrun "
                         "(torchrun --nproc_per_node N -m dla_fast bench ...), which sets all three, or unset them "
                         "for a single-process run")
    try:
        rank, world_size, local_rank = (int(env[v]) for v in _WORLD_VARS)
    except ValueError:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {env['RANK']!r} / "
                         f"{env['WORLD_SIZE']!r} / {env['LOCAL_RANK']!r}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank} is not a valid place in a "
                         "launch (0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)")
    return World(rank, world_size, local_rank)


def rank_device(kind: str, local_rank: int, gpus: int) -> torch.device:
    """The device of the rank with ``local_rank``: ``cuda:LOCAL_RANK`` (one GPU per process), or the CPU."""
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise ValueError(f"device kind {kind!r}: 'cuda' or 'cpu'")
    if local_rank >= gpus:
        raise ValueError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this node shows {gpus} GPU(s): start "
                         f"at most {gpus} process(es) per node (torchrun --nproc_per_node {max(gpus, 1)}), or check "
                         "CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank)


class Context:
    """The process group of a torchrun launch, as the benchmark uses it.

    The default group is NCCL on GPUs (DDP's gradient all-reduce) and gloo on the CPU. Barriers and the exchange
    of results go through a gloo group: a rank waiting there sleeps on a socket instead of running a NCCL kernel on
    its GPU, and no result has to be copied to a GPU to be sent."""

    def __init__(self, world: World, device: torch.device):
        import torch.distributed as dist

        self.world = world
        self.rank, self.world_size = world.rank, world.world_size
        self.device = device
        self.host = socket.gethostname()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._own_group = not dist.is_initialized()
        if self._own_group:
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(self.backend, **kw)
        self.control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def where(self) -> str:
        return f"rank {self.rank} of {self.world_size} ({self.device} on {self.host})"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        """Every rank's device idle and every rank here before any goes on."""
        import torch.distributed as dist

        self.sync()
        dist.barrier(group=self.control)

    def all_gather(self, obj) -> list:
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def gather(self, obj) -> Optional[list]:
        """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
        import torch.distributed as dist

        out: Optional[list] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    @contextlib.contextmanager
    def failing_loudly(self):
        """An exception on this rank is named with the rank before it ends the process (torchrun then stops the
        other ranks, which may be waiting for this one in a collective, and exits non-zero)."""
        try:
            yield
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"error: {self.where()} failed: {type(e).__name__}: {first}\n"
                  "  (one failing rank ends the launch: torchrun stops the others, which may first report a lost "
                  "connection; its 'Root Cause' names the rank that failed first)", file=sys.stderr, flush=True)
            raise

    def close(self) -> None:
        """Tear the group down in the same state on every rank. DDP's reducer holds the group and often sits in a
        reference cycle, so without the collection it outlives ``destroy_process_group`` and is destroyed at
        interpreter exit, where gloo's worker threads can abort the process ("terminate called without an active
        exception") after the benchmark has finished; the barrier keeps a rank from destroying its side while
        another still has a send of the final gather in flight."""
        import torch.distributed as dist

        if self._own_group and dist.is_initialized():
            self.barrier()
            gc.collect()
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the harness


@dataclass
class Workload:
    """What the harness times on one rank, once built.

    ``step()``: one step on the case's batch (``batch_size`` images), run by every rank together; ``alone()``:
    the single-GPU baseline's step, timed on rank 0 alone (default ``step``); ``connect()``: collective set-up run
    on every rank after every rank has built (DDP's parameter broadcast), which may set ``step``; ``grad``: whether
    the step needs autograd (an inference step runs under ``torch.no_grad``); ``alone_only``: the case has no
    all-ranks step (a captured training step, which has no DDP), only rank 0's figure."""

    step: Optional[Callable[[], object]] = None
    alone: Optional[Callable[[], object]] = None
    connect: Optional[Callable[[], None]] = None
    grad: bool = False
    alone_only: bool = False
    rel_err: Optional[float] = None
    backends_used: Optional[str] = None


@dataclass
class Case:
    """One implementation to time: ``build()`` makes its :class:`Workload` on this rank, locally (no collective),
    and runs its first step; an exception there is this implementation's error row on every rank."""

    impl: str
    mode: str            # "infer" or "train"
    build: Callable[[], Workload]


class Skipped(Exception):
    """A case that cannot run here; its message alone is the row's error."""


def _error_text(e: BaseException) -> str:
    if isinstance(e, Skipped):
        return str(e)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def combine_errors(errors: Sequence[Optional[str]]) -> Optional[str]:
    """One error text from every rank's (None: that rank succeeded): ``rank 1: ...``, or ``every rank: ...``."""
    by: Dict[str, List[int]] = {}
    for r, e in enumerate(errors):
        if e is not None:
            by.setdefault(e, []).append(r)
    if not by:
        return None
    if len(by) == 1 and len(next(iter(by.values()))) == len(errors) and len(errors) > 1:
        return f"every rank: {next(iter(by))}"
    if len(errors) == 1:
        return next(iter(by))
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {e}" for e, rs in by.items())


def time_steps(step: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per step over ``iters`` back-to-back steps (CUDA events on a GPU, the wall clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t) / iters


def measure(ctx: Context, cases: Sequence[Case], rounds: int, iters: int, warmup: int,
            log: Callable[[str], None] = lambda s: None) -> List[dict]:
    """This rank's record of each case: build (local), agree on what built, connect, rank 0 alone, all together.

    Every rank must pass the same cases in the same order. A record holds ``impl``, ``mode``, ``error`` (the
    combined error of every rank, the same on all), ``first_s``, ``peak_mem_mb``, ``rel_err``, ``backends_used``,
    ``samples_s`` (seconds per step, one per round, all ranks together) and, on rank 0, ``alone_samples_s``."""
    dev = ctx.device
    records = [{"impl": c.impl, "mode": c.mode, "error": None, "first_s": None, "peak_mem_mb": None,
                "rel_err": None, "backends_used": None, "samples_s": [], "alone_samples_s": []} for c in cases]
    built: Dict[int, Workload] = {}
    local_errors: List[Optional[str]] = []
    for i, case in enumerate(cases):
        rec = records[i]
        try:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            t = time.perf_counter()
            wl = case.build()
            ctx.sync()
            rec["first_s"] = round(time.perf_counter() - t, 3)
            if dev.type == "cuda":
                rec["peak_mem_mb"] = round((torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20, 1)
            rec["rel_err"], rec["backends_used"] = wl.rel_err, wl.backends_used
            rec["alone_only"] = wl.alone_only
            built[i] = wl
            local_errors.append(None)
            log(f"  built {case.impl:<30} ({case.mode}) first step {rec['first_s']:7.2f}s"
                + (f"  rel_err {wl.rel_err:.2e}" if wl.rel_err is not None else "")
                + (f"  [{wl.backends_used}]" if wl.backends_used else ""))
        except Exception as e:  # one broken implementation must not sink the whole run
            local_errors.append(_error_text(e))
    # Only what built on every rank runs: each rank must make the same collective calls in the same order.
    everyone = ctx.all_gather(local_errors)
    for i, rec in enumerate(records):
        rec["error"] = combine_errors([errs[i] for errs in everyone])
        if rec["error"] is not None:
            built.pop(i, None)
            log(f"  FAILED {cases[i].impl}: {rec['error']}")
    for i in sorted(built):
        if built[i].connect is not None:
            built[i].connect()
        if built[i].step is None and not built[i].alone_only:
            raise RuntimeError(f"the {cases[i].impl} ({cases[i].mode}) workload has no step after connect()")

    def timed(i: int, alone: bool) -> float:
        wl = built[i]
        fn = (wl.alone or wl.step) if alone else wl.step
        with torch.no_grad() if not wl.grad else contextlib.nullcontext():
            return time_steps(fn, iters, dev)

    def warm(alone: bool) -> None:
        for i in sorted(built):
            wl = built[i]
            if wl.alone_only and not alone:
                continue
            fn = (wl.alone or wl.step) if alone else wl.step
            with torch.no_grad() if not wl.grad else contextlib.nullcontext():
                for _ in range(warmup):
                    fn()
        ctx.sync()

    order = sorted(built)
    ctx.barrier()
    if ctx.is_main:
        warm(alone=True)
        for _ in range(rounds):  # interleaved, as in the single-process benchmark
            for i in order:
                records[i]["alone_samples_s"].append(timed(i, alone=True))
    ctx.barrier()  # the other ranks wait here while rank 0 measures alone
    warm(alone=False)
    together = [i for i in order if not built[i].alone_only]  # the same on every rank: built is agreed on
    for _ in range(rounds):
        for i in together:
            ctx.barrier()
            records[i]["samples_s"].append(timed(i, alone=False))
    ctx.barrier()
    built.clear()
    return records


# ------------------------------------------------------------------------------------------ aggregation


def _median_rate(images: int, samples: Sequence[float]) -> float:
    return images / statistics.median(samples)


def aggregate(per_rank: Sequence[Sequence[dict]]) -> List[dict]:
    """The table rows from every rank's records (``per_rank[r]``: rank r's records, in the same case order on
    every rank; each carries the key fields ``model``, ``dtype``, ``batch_size`` (per rank), ``impl``, ``mode``,
    and :func:`measure`'s figures).

    Per case: ``per_rank_img_per_s`` (each rank's images / its median seconds per step), ``agg_img_per_s`` (their
    sum), ``paced_img_per_s`` (all ranks' images per step / the median over rounds of the slowest rank's sample:
    what a node paced by its slowest GPU delivers), ``single_img_per_s`` (rank 0 alone) and ``efficiency``
    (``agg / (world_size * single)``; 1.0 is perfect scaling); ``ms``: the median over rounds of the slowest rank's
    milliseconds per step."""
    world = len(per_rank)
    if world == 0:
        raise ValueError("aggregate() needs the records of at least one rank")
    n = len(per_rank[0])
    for r, recs in enumerate(per_rank):
        if len(recs) != n:
            raise ValueError(f"rank {r} reported {len(recs)} cases, rank 0 {n}: every rank must run the same cases")
        for i, rec in enumerate(recs):
            a, b = tuple(rec.get(k) for k in KEY_FIELDS), tuple(per_rank[0][i].get(k) for k in KEY_FIELDS)
            if a != b:
                raise ValueError(f"rank {r}'s case {i} is {a}, rank 0's is {b}: every rank must run the same cases "
                                 "in the same order")
    rows = []
    for i in range(n):
        recs = [per_rank[r][i] for r in range(world)]
        first = recs[0]
        row = {k: first.get(k) for k in KEY_FIELDS}
        row.update(hw=first.get("hw"), features=first.get("features", False), world_size=world,
                   backends_used=first.get("backends_used"), per_rank_img_per_s=None, single_img_per_s=None,
                   agg_img_per_s=None, paced_img_per_s=None, efficiency=None, ms=None,
                   first_s=_max_of(r.get("first_s") for r in recs),
                   peak_mem_mb=_max_of(r.get("peak_mem_mb") for r in recs),
                   rel_err=_max_of(r.get("rel_err") for r in recs), error=None)
        errors = [r.get("error") for r in recs]
        # measure() gives every rank the same, already combined, error: not to be prefixed with ranks again
        row["error"] = errors[0] if len(set(errors)) == 1 else combine_errors(errors)
        rows.append(row)
        if row["error"] is not None:
            continue
        batch = int(row["batch_size"])
        samples = [r.get("samples_s") or [] for r in recs]
        alone = first.get("alone_samples_s") or []
        if first.get("alone_only"):
            samples = []  # rank 0's figure only: no DDP step was timed together
        elif not all(samples):
            row["error"] = "no timing samples" + ("" if alone else " (rank 0 alone)")
            continue
        if not alone:
            row["error"] = "no timing samples (rank 0 alone)"
            continue
        if len({len(s) for s in samples}) > 1:
            raise ValueError(f"case {i} ({row['impl']}): the ranks took {[len(s) for s in samples]} samples; "
                             "every rank times the same rounds")
        if min(min(s) for s in samples + [alone]) <= 0:
            row["error"] = "a timing sample of 0 s (below the clock's resolution): raise --iters"
            continue
        if not samples:
            row.update(single_img_per_s=round(_median_rate(batch, alone), 1),
                       ms=round(statistics.median(alone) * 1e3, 4), alone_only=True)
            continue
        per = [_median_rate(batch, s) for s in samples]
        slowest = [max(s[k] for s in samples) for k in range(len(samples[0]))]
        single = _median_rate(batch, alone)
        agg = sum(per)
        row.update(per_rank_img_per_s=[round(p, 1) for p in per], agg_img_per_s=round(agg, 1),
                   paced_img_per_s=round(_median_rate(batch * world, slowest), 1), single_img_per_s=round(single, 1),
                   efficiency=round(agg / (world * single), 3),
                   ms=round(statistics.median(slowest) * 1e3, 4))
    return rows


def _max_of(values) -> Optional[float]:
    vs = [v for v in values if v is not None]
    return max(vs) if vs else None


def format_table(result: dict) -> str:
    """The markdown table of a distributed run (rank 0's result)."""
    from .bench import cudnn_mode

    hw = result.get("hw") or [224, 224]
    ranks = result.get("ranks") or []
    devices = sorted({r["device"] for r in ranks}) or [result.get("device")]
    hosts = sorted({r["host"] for r in ranks})
    mode = result.get("mode", "infer")
    what = ("training steps (DDP, SGD momentum 0.9, weight decay 1e-4, per-process BN statistics)"
            if mode == "train" else "inference")
    out = [f"{result['world_size']} ranks ({result.get('backend')}) on {len(hosts) or 1} node(s): "
           f"{', '.join(devices)} | torch {result['torch']} | triton {result['triton']} | "
           f"cuDNN {result.get('cudnn')}{cudnn_mode(result)} | {result['date']} | "
           f"input {hw[0]}x{hw[1]}{' features_only' if result.get('features') else ''} | {what}",
           "batch is per rank; efficiency = aggregate / (ranks x rank 0 alone); paced = all ranks' images per step "
           "/ the slowest rank's time",
           "",
           "| model | dtype | batch/rank | impl | rank 0 alone img/s | per-rank img/s | aggregate img/s | "
           "paced img/s | efficiency | first step s | peak MB | rel err |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        impl = r["impl"] + (" (train)" if r["mode"] == "train" else "")
        head = f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {impl} |"
        if r.get("error"):
            out.append(f"{head} - | - | - | - | - | - | - | {r['error'][:80]} |")
            continue
        if r.get("alone_only"):
            together = "no DDP | - | - | -"
        else:
            per = " / ".join(f"{p:.1f}" for p in r["per_rank_img_per_s"])
            together = (f"{per} | {r['agg_img_per_s']:.1f} | {r['paced_img_per_s']:.1f} | "
                        f"{r['efficiency']:.3f}")
        out.append(f"{head} {r['single_img_per_s']:.1f} | {together} | "
                   f"{r['first_s'] if r['first_s'] is not None else '-'} | "
                   f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else '-'} | "
                   f"{'-' if r['rel_err'] is None else format(r['rel_err'], '.1e')} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ inference cases


def infer_cases(name: str, dtype: torch.dtype, batch: int, impls: Sequence[str], device: torch.device,
                hw: Tuple[int, int], features: bool = False, tune: bool = False) -> List[Case]:
    """The single-process benchmark's implementations (:func:`dla_fast.bench.build_impl`), one case each, from the
    same random weights and input on every rank."""
    import dla_fast

    from . import bench
    from .verify import calibrated_random_weights, reference_output, rel_err

    torch.manual_seed(0)
    ours = calibrated_random_weights(dla_fast.create_model(name), 0).eval()
    x32 = torch.randn(batch, 3, hw[0], hw[1], generator=torch.Generator().manual_seed(1))
    dev = "cuda" if device.type == "cuda" else "cpu"  # build_impl places on the current GPU, set per rank
    x = x32.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    ref: list = []

    def make(impl: str) -> Case:
        def build() -> Workload:
            if impl in GPU_ONLY_IMPLS and device.type != "cuda":
                raise Skipped("skipped: needs a GPU")
            if not ref:
                ref.append(bench._flat(reference_output(bench._ours(name, ours, features), x32, device,
                                                        torch.float32)).cpu())
            fn, used = bench.build_impl(impl, name, ours, dtype, dev, batch, hw, features, x, tune)
            grad_free = torch.inference_mode() if not impl.startswith(("torch_compile", "dla_fast_aoti")) \
                else torch.no_grad()
            with grad_free:
                y = bench._flat(fn(x)).cpu()  # copied out at once, as CUDA-graph runners reuse their output
            return Workload(step=lambda: fn(x), rel_err=rel_err(y, ref[0]), backends_used=used)
        return Case(impl, "infer", build)

    return [make(i) for i in impls]


# ------------------------------------------------------------------------------------------ training cases


def train_model(impl: str, name: str) -> torch.nn.Module:
    """The float32 classifier an implementation trains, with the same random weights for every implementation and
    rank: ours (``dla_fast_eager``; ``dla_fast_fused*`` with fused training on) or timm's (``timm_eager``,
    ``torch_compile``: compiled by :func:`train_case`)."""
    import dla_fast

    from .verify import calibrated_random_weights

    torch.manual_seed(0)
    ours = calibrated_random_weights(dla_fast.create_model(name), 0)
    if impl == "dla_fast_eager":
        return ours
    if impl.startswith("dla_fast_fused"):
        return ours.set_fused_training(True, save_memory="_save_memory" in impl)
    if impl in ("timm_eager", "torch_compile", "timm_eager_graph"):
        import timm

        m = timm.create_model(name)
        m.load_state_dict(ours.state_dict(), strict=True)
        return m
    raise ValueError(f"no training model for impl {impl!r}; training steps: {', '.join(TRAIN_BUILDERS)}")


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), **SGD_ARGS)


def freeze_bn(model: torch.nn.Module) -> torch.nn.Module:
    """BN layers in eval mode (running statistics, as detection fine-tuning uses) in a model left in training
    mode otherwise."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    amp_dtype: Optional[torch.dtype] = None, scaler=None) -> Callable[[], torch.Tensor]:
    """One training step on (``x``, ``y``): forward (under autocast to ``amp_dtype`` when given), cross-entropy,
    backward, optimizer step (through ``scaler``, a GradScaler, when given: float16). The gradients stay in the
    parameters' ``.grad`` until the next step clears them. Returns the step; it returns the loss."""
    dev_type = x.device.type

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss

    return step


def make_captured_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                       amp_dtype: Optional[torch.dtype] = None, scaler=None) -> Callable[[], torch.Tensor]:
    """:func:`make_train_step`'s step with the forward, loss and backward replayed from a CUDA graph
    (:class:`dla_fast.train.graph.CapturedTrainStep`, captured here) and the optimizer step eager."""
    from .train.graph import CapturedTrainStep

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.float(), target)

    # The batch is the graph's own input tensors (donated): one copy of it in memory, as the other steps have.
    captured = CapturedTrainStep(model, loss_fn, x, y, amp_dtype=amp_dtype, scaler=scaler, donate_examples=True)

    def step() -> torch.Tensor:
        loss = captured(captured.inputs, captured.target)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return loss

    return step


def train_case(impl: str, name: str, dtype: torch.dtype, batch: int, device: torch.device, hw: Tuple[int, int],
               sync_bn: bool = False) -> Case:
    """A data-parallel training step of ``impl``'s model: rank 0 alone runs it without DDP, all ranks together
    with DDP. ``dtype`` other than float32 trains under autocast (float16 with a GradScaler), the weights stay
    float32. ``sync_bn``: SyncBatchNorm in the DDP model instead of per-process BN statistics."""
    def build() -> Workload:
        if impl in GPU_ONLY_IMPLS and device.type != "cuda":
            raise Skipped("skipped: needs a GPU")
        model = train_model(impl, name).to(device).to(memory_format=torch.channels_last).train()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, hw[0], hw[1], generator=gen).to(device).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
        amp = None if dtype == torch.float32 else dtype

        def scaler():
            return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        if impl.endswith("_graph"):
            wl = Workload(alone=make_captured_step(model, sgd(model), x, y, amp, scaler()), grad=True,
                          alone_only=True)
            wl.alone()
            return wl
        parallel = copy.deepcopy(model)  # before any step: the DDP copy starts from the same weights
        # torch.compile: the optimizer steps the module's parameters, the step calls the compiled module
        run = torch.compile(model) if impl == "torch_compile" else model
        wl = Workload(alone=make_train_step(run, sgd(model), x, y, amp, scaler()), grad=True)
        wl.alone()  # the first step (its time is the row's first_s), local

        def connect() -> None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(parallel) if sync_bn else parallel
            ddp = DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
            wl.step = make_train_step(torch.compile(ddp) if impl == "torch_compile" else ddp, sgd(ddp), x, y, amp,
                                      scaler())
        wl.connect = connect
        return wl

    return Case(impl, "train", build)


# impl -> builder(name, dtype, batch, device, hw) -> Case: a training path of dla_fast's own adds its entry here
TRAIN_BUILDERS: Dict[str, Callable[..., Case]] = {impl: functools.partial(train_case, impl) for impl in TRAIN_IMPLS}


# ------------------------------------------------------------------------------------------ the whole run


def run(ctx: Context, models: Sequence[str], dtypes: Sequence[torch.dtype], batch_sizes: Sequence[int],
        impls: Sequence[str], hw: Tuple[int, int], rounds: int, iters: Optional[int], warmup: int, *,
        train: bool = False, features: bool = False, tune: bool = False,
        log: Callable[[str], None] = lambda s: None,
        on_partial: Optional[Callable[[dict], None]] = None) -> Optional[dict]:
    """Every (model, dtype, batch) group on every rank; rank 0 returns the result (environment, ``ranks``,
    ``rows``), the other ranks None. ``on_partial`` (rank 0) gets the result so far after each group."""
    from .bench import FEATURE_LEVELS, each_case, environment, iterations
    from .verify import dtype_name

    dev = ctx.device
    me = {"rank": ctx.rank, "local_rank": ctx.world.local_rank, "host": ctx.host,
          "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
          "cuda_index": torch.cuda.current_device() if dev.type == "cuda" else None,
          "gpu_uuid": str(torch.cuda.get_device_properties(dev).uuid) if dev.type == "cuda" else None}
    ranks = ctx.gather(me)
    result: Optional[dict] = None
    if ctx.is_main:
        result = environment(dev.type)
        result.update(world_size=ctx.world_size, backend=ctx.backend, ranks=ranks, mode="train" if train else "infer",
                      hw=list(hw), features=list(FEATURE_LEVELS) if features else None, tune=tune, rows=[])
    def what(bs: int) -> str:
        return (f"batch {bs}/rank x {ctx.world_size} ranks {hw[0]}x{hw[1]}{' features' if features else ''}"
                f"{' train' if train else ''}")
    for name, dt, bs in each_case(models, dtypes, batch_sizes, log, what):
        if train:
            cases = [TRAIN_BUILDERS[i](name, dt, bs, dev, hw) for i in impls]
        else:
            cases = infer_cases(name, dt, bs, impls, dev, hw, features, tune)
        recs = measure(ctx, cases, rounds, iterations(iters, dev.type, bs), warmup, log)
        for rec in recs:
            rec.update(model=name, dtype=dtype_name(dt), batch_size=bs, hw=list(hw), features=features)
        gathered = ctx.gather(recs)
        if result is not None:
            result["rows"] += aggregate(gathered)
            if on_partial is not None:
                on_partial(result)
        # the models of this group (DDP's in reference cycles) go now, before the next group builds its own
        del cases, recs
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------ launching


def _is_distributed_flag(token: str) -> bool:
    name = token.split("=", 1)[0]
    return name.startswith("--di") and "--distributed".startswith(name)


def relaunch_command(nproc: int, argv: Sequence[str]) -> List[str]:
    """The torchrun command that runs ``python -m dla_fast <argv>`` (without its ``--distributed N``) as
    ``nproc`` processes on this node."""
    rest: List[str] = []
    skip = False
    for i, t in enumerate(argv):
        if skip:
            skip = False
            continue
        if t == "--":
            rest += argv[i:]
            break
        if _is_distributed_flag(t):
            skip = "=" not in t
            continue
        rest.append(t)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dla_fast", *rest]
