"""Timing a layer's candidate implementations against each other: warmed up, interleaved, median.

A *timer* is any ``timer(fn, iters) -> seconds per call`` that runs ``fn()`` ``iters`` times back to back:
:func:`cuda_event_timer` on a GPU (:func:`cuda_graph_timer` for what CUDA graphs replay), :func:`wall_timer` on the
CPU, :class:`FakeTimer` in tests.
:func:`time_candidates` measures each candidate with it; :func:`pick` chooses a winner that only displaces the
default when it is clearly faster; :class:`Progress` reports a long tuning run on stderr.

torch is imported only by the CUDA timers.
"""
from __future__ import annotations

import math
import random
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

Timer = Callable[[Callable[[], object], int], float]
Clock = Callable[[], float]


# ----------------------------------------------------------------------------------------------------- timers


def wall_timer(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call of ``iters`` back-to-back calls, by ``time.perf_counter`` (CPU candidates only: on a GPU
    it would time the kernel launches, not the kernels)."""
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def _cuda_device(device, who: str):
    import torch

    if device is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"{who}({device!r}): CUDA events time CUDA devices only; use wall_timer for "
                         f"{dev.type} candidates")
    return dev


def cuda_event_timer(device=None) -> Timer:
    """A timer for candidates running on CUDA ``device`` (None: the current one): ``iters`` back-to-back calls
    between two CUDA events on the device's current stream, synchronising on the end event."""
    import torch

    dev = _cuda_device(device, "cuda_event_timer")

    def timer(fn: Callable[[], object], iters: int) -> float:
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            # Start from an idle GPU: behind a backlog of earlier work the launches would run ahead of the
            # kernels, and a candidate whose CPU launch cost exceeds its GPU time would look faster than it is.
            stream.synchronize()
            start.record(stream)
            for _ in range(iters):
                fn()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters

    return timer


def cuda_graph_timer(device=None, calls: int = 10) -> Timer:
    """A timer for candidates replayed from a CUDA graph, the way ``cuda_graph=True`` (and torch.compile's
    reduce-overhead mode) runs them: at a candidate's first use, two calls on a side stream (compiles and
    allocations stay outside the capture), then ``calls`` back-to-back calls captured into one graph; each sample
    replays that graph between two CUDA events. It times the GPU's work alone. At small batches an eager timer
    (:func:`cuda_event_timer`) times the host's launches instead, which are slower than the kernels there and
    would decide the comparison. The timer keeps each candidate's graph (and the graph's outputs): use one timer
    per set of candidates and drop it afterwards."""
    import torch

    dev = _cuda_device(device, "cuda_graph_timer")
    if calls < 1:
        raise ValueError(f"cuda_graph_timer(calls={calls!r}): at least 1")
    graphs: Dict[int, tuple] = {}  # id(fn) -> (fn, graph); fn is kept so that its id is not reused

    def timer(fn: Callable[[], object], iters: int) -> float:
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev)
            hit = graphs.get(id(fn))
            if hit is None:
                side = torch.cuda.Stream(dev)
                side.wait_stream(stream)
                with torch.cuda.stream(side):
                    fn()
                    fn()
                stream.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(calls):
                        fn()
                hit = graphs[id(fn)] = (fn, graph)
            graph = hit[1]
            reps = max(1, -(-iters // calls))
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            stream.synchronize()
            start.record(stream)
            for _ in range(reps):
                graph.replay()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / (reps * calls)

    return timer


class FakeClock:
    """A wall clock for tests: reads ``now``; :class:`FakeTimer` advances it by the time it pretends to spend."""

    def __init__(self, start: float = 0.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeTimer:
    """A timer for tests that returns a made-up cost per candidate instead of measuring.

    ``costs``: a mapping ``fn -> seconds per call`` (a value that is an exception is raised when ``fn`` is
    timed), or a callable ``costs(fn) -> seconds``. ``noise``: relative; each result is scaled by
    ``1 + U(-noise, noise)`` from a generator seeded with ``seed``. ``clock``: a :class:`FakeClock` advanced by
    ``seconds * iters`` per call, so wall-clock budgets see time pass. ``call_fn``: also call ``fn()`` once per
    timing, so a candidate that raises fails when timed, as under a real timer.

    ``calls`` records ``(fn, iters)`` per call, in order; :meth:`order` maps them to candidate indices.
    """

    def __init__(self, costs: Union[Mapping[Callable, object], Callable[[Callable], float]], *, noise: float = 0.0,
                 seed: int = 0, clock: Optional[FakeClock] = None, call_fn: bool = False):
        if not (isinstance(costs, Mapping) or callable(costs)):
            raise TypeError(f"FakeTimer costs must be a dict fn -> seconds or a callable fn -> seconds, got "
                            f"{type(costs).__name__}")
        if not 0 <= noise < 1:
            raise ValueError(f"FakeTimer noise={noise!r}: a relative amplitude in [0, 1)")
        self.costs = costs
        self.noise = noise
        self.rng = random.Random(seed)
        self.clock = clock
        self.call_fn = call_fn
        self.calls: List[Tuple[Callable, int]] = []

    def __call__(self, fn: Callable[[], object], iters: int) -> float:
        self.calls.append((fn, iters))
        if self.call_fn:
            fn()
        if isinstance(self.costs, Mapping):
            if fn not in self.costs:
                raise KeyError(f"FakeTimer has no cost for candidate {fn!r}")
            cost = self.costs[fn]
        else:
            cost = self.costs(fn)
        if isinstance(cost, BaseException):
            raise cost
        seconds = float(cost)
        if self.noise:
            seconds *= 1 + self.rng.uniform(-self.noise, self.noise)
        if self.clock is not None:
            self.clock.advance(seconds * iters)
        return seconds

    def order(self, fns: Sequence[Callable]) -> List[int]:
        """The candidate index (in ``fns``) of each recorded call, in call order."""
        index = {id(f): i for i, f in enumerate(fns)}
        return [index[id(f)] for f, _ in self.calls]


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class CandidateTiming:
    """One candidate's result. ``ms``: median milliseconds per call over its samples (inf when it failed);
    ``samples``: milliseconds per call, one per round it ran; ``iters``: calls per sample; ``error``:
    ``"ExceptionType: message"`` when it failed, else None, with the exception (its traceback dropped so that it
    frees the tensors of the failed call) and the formatted traceback beside it."""

    ms: float = math.inf
    samples: List[float] = field(default_factory=list)
    iters: int = 0
    error: Optional[str] = None
    exception: Optional[BaseException] = field(default=None, repr=False, compare=False)
    traceback: Optional[str] = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


class Timings(list):
    """:func:`time_candidates`' result: a list of :class:`CandidateTiming` in the candidates' order, plus how
    the run went: ``rounds`` completed of ``rounds_requested``, ``stopped_early`` (the budget ran out first) and
    ``elapsed_s`` (wall clock, warm-up included)."""

    def __init__(self, items=(), *, rounds: int = 0, rounds_requested: int = 0, stopped_early: bool = False,
                 elapsed_s: float = 0.0):
        super().__init__(items)
        self.rounds = rounds
        self.rounds_requested = rounds_requested
        self.stopped_early = stopped_early
        self.elapsed_s = elapsed_s

    def __repr__(self) -> str:
        return (f"Timings({list.__repr__(self)}, rounds={self.rounds}/{self.rounds_requested}, "
                f"stopped_early={self.stopped_early}, elapsed_s={self.elapsed_s:.3g})")


def _fail(result: CandidateTiming, e: Exception) -> None:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    result.error = f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__
    result.traceback = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    seen = set()
    x: Optional[BaseException] = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        x.__traceback__ = None
        x = x.__cause__ or x.__context__
    result.exception = e
    result.ms = math.inf


def _checked_seconds(s, what: str) -> float:
    s = float(s)
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"the timer returned {s!r} seconds per call for {what}")
    return s


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"time_candidates({name}={value!r}): an integer >= {minimum}")


def time_candidates(fns: Sequence[Callable[[], object]], *, warmup: int = 3, rounds: int = 7,
                    iters: Optional[int] = None, timer: Optional[Timer] = None, budget_s: Optional[float] = None,
                    min_time_s: float = 0.002, max_iters: int = 10_000, clock: Clock = time.perf_counter) -> Timings:
    """Time each candidate ``fn()`` (no arguments: bind them with a closure) and return a :class:`Timings`.

    1. Warm-up, candidate by candidate: one plain call (compilation, autotuning, and the first sign of a broken
       candidate), then ``warmup`` calls through the timer. When ``iters`` is None, the warm-up's time per call
       sizes the samples: enough calls that one sample takes about ``min_time_s`` (at most ``max_iters``).
    2. ``rounds`` rounds; each takes one sample of every candidate still running, in an order rotated by one
       each round, so that no candidate always runs first (after another's cache and clock effects).
    3. Each candidate's ``ms`` is the median of its samples.

    A candidate that raises (an ``Exception``, in warm-up or later) is marked failed (``ms`` inf, the error kept)
    and dropped from later rounds; nothing is raised. ``timer``: default :func:`wall_timer`; pass
    :func:`cuda_event_timer` for GPU candidates. ``budget_s``: wall-clock seconds for the whole call, warm-up
    included; once spent, no further round starts (at least one always runs) and the result says
    ``stopped_early``. ``clock``: the wall clock the budget is measured with (a :class:`FakeClock` in tests).
    """
    fns = list(fns)
    for i, fn in enumerate(fns):
        if not callable(fn):
            raise TypeError(f"time_candidates: candidate {i} is a {type(fn).__name__}, not a callable; pass "
                            "functions of no arguments (e.g. lambda: op(x, w))")
    _check_count("warmup", warmup, 0)
    _check_count("rounds", rounds, 1)
    _check_count("max_iters", max_iters, 1)
    if iters is not None:
        _check_count("iters", iters, 1)
    if not (isinstance(min_time_s, (int, float)) and min_time_s > 0 and math.isfinite(min_time_s)):
        raise ValueError(f"time_candidates(min_time_s={min_time_s!r}): seconds > 0")
    if budget_s is not None and not (isinstance(budget_s, (int, float)) and budget_s >= 0):
        raise ValueError(f"time_candidates(budget_s={budget_s!r}): seconds >= 0, or None for no budget")
    timer = wall_timer if timer is None else timer

    t0 = clock()
    results = [CandidateTiming() for _ in fns]
    active: List[int] = []
    for i, fn in enumerate(fns):
        try:
            fn()
            if iters is None:
                per_call = _checked_seconds(timer(fn, max(1, warmup)), f"candidate {i}")
                n = max_iters if per_call == 0 else math.ceil(min_time_s / per_call)
                results[i].iters = max(1, min(max_iters, n))
            else:
                if warmup:
                    _checked_seconds(timer(fn, warmup), f"candidate {i}")
                results[i].iters = iters
            active.append(i)
        except Exception as e:  # a broken candidate is a result, not the tuner's failure
            _fail(results[i], e)

    done = 0
    stopped_early = False
    for r in range(rounds):
        if not active:
            break
        k = r % len(active)
        for i in active[k:] + active[:k]:
            try:
                s = _checked_seconds(timer(fns[i], results[i].iters), f"candidate {i}")
                results[i].samples.append(s * 1e3)
            except Exception as e:
                _fail(results[i], e)
        active = [i for i in active if results[i].ok]
        done += 1
        if budget_s is not None and done < rounds and clock() - t0 >= budget_s:
            stopped_early = True
            break
    for i in active:
        results[i].ms = statistics.median(results[i].samples)
    return Timings(results, rounds=done, rounds_requested=rounds, stopped_early=stopped_early,
                   elapsed_s=clock() - t0)


def _ms(result) -> float:
    if isinstance(result, CandidateTiming):
        return result.ms
    if isinstance(result, bool) or not isinstance(result, (int, float)):
        raise TypeError(f"pick() takes CandidateTiming results or milliseconds, got {type(result).__name__}")
    return float(result)


def pick(results: Sequence[Union[CandidateTiming, float]], *, margin: float = 0.0, default_index: int = 0) -> int:
    """The index of the candidate to use: the fastest, unless the default (the rule's choice, index 0 unless
    told) is within ``margin`` of it. Another candidate displaces the default only when it is more than
    ``margin`` faster, relatively (``default_ms > best_ms * (1 + margin)``), so that noise never flips a choice.
    A failed default (inf) gives way to the fastest that ran; ties go to the default, then the lower index.
    Raises ValueError when no candidate ran (the errors are listed)."""
    times = [_ms(r) for r in results]
    if not times:
        raise ValueError("pick(): no candidates to choose from")
    if isinstance(default_index, bool) or not isinstance(default_index, int) or \
            not 0 <= default_index < len(times):
        raise ValueError(f"pick(default_index={default_index!r}): not the index of one of the {len(times)} "
                         "candidates")
    if not (isinstance(margin, (int, float)) and margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"pick(margin={margin!r}): a relative margin >= 0 (0.05 = must be 5% faster)")
    ran = [i for i, t in enumerate(times) if math.isfinite(t)]
    if not ran:
        errors = "; ".join(f"{i}: {r.error}" for i, r in enumerate(results)
                           if isinstance(r, CandidateTiming) and r.error)
        raise ValueError("pick(): every candidate failed" + (f" ({errors})" if errors else ""))
    best = min(ran, key=lambda i: (times[i], i))
    default = times[default_index]
    if math.isfinite(default) and not default > times[best] * (1 + margin):
        return default_index
    return best


# ------------------------------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m}m{s:02d}s"
    h, m = divmod(int(round(seconds)) // 60, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """Progress lines for a long loop, on stderr: ``[k/n] label ... (elapsed, eta)`` as item k starts, at most
    one line every ``interval_s`` (the first always shows), and a final line from :meth:`close`. Prints nothing
    when ``enabled`` is False. ::

        with Progress(len(layers), prefix="tune dla34 ") as progress:
            for layer in layers:
                progress.step(layer.name)
                ...
    """

    def __init__(self, total: int, *, enabled: bool = True, prefix: str = "", interval_s: float = 0.5,
                 stream=None, clock: Clock = time.monotonic):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"Progress(total={total!r}): the number of items, an integer >= 0")
        self.total = total
        self.enabled = enabled
        self.prefix = prefix
        self.interval_s = interval_s
        self.stream = stream
        self.clock = clock
        self.k = 0
        self.t0 = clock()
        self._last: Optional[float] = None
        self._closed = False

    def step(self, label: str = "") -> None:
        """Item k+1 starts; print its line unless one was printed less than ``interval_s`` ago."""
        self.k += 1
        if not self.enabled:
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = now - self.t0
        finished = self.k - 1
        timing = f"{_duration(elapsed)} elapsed"
        if finished > 0 and self.total >= finished:
            timing += f", eta {_duration(elapsed / finished * (self.total - finished))}"
        self._print(f"[{self.k}/{self.total}] {label} ... ({timing})")

    def close(self, label: str = "done") -> None:
        """The final line (once): ``[k/n] done in <elapsed>``."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._print(f"[{self.k}/{self.total}] {label} in {_duration(self.clock() - self.t0)}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("done" if exc_type is None else f"stopped ({exc_type.__name__})")

    def _print(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"{self.prefix}{line}", file=stream, flush=True)
