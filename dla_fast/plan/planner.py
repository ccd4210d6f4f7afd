"""The per-layer plan: which backend, kernel and tile run each fused layer at a given input shape, and why.

Every fused call is described by a :class:`LayerKey` (the op, its weight/stride/padding/groups/residual
signature, the dtype, the batch and the input's spatial size). :class:`Planner` answers it once per key and
device, from the first of these that has an answer:

1. ``tuned`` / ``cached``: the user's own measurements on this GPU (:mod:`dla_fast.plan.tuner`), kept in the
   on-disk cache of this GPU model and software versions (:mod:`dla_fast.plan.cache`): ``tuned`` when measured in
   this process, ``cached`` when read from disk;
2. ``prior``: the committed measurements shipped for the GPU's compute capability (``dla_fast/plan/prior/``),
   holding only the layers where the measured winner differs from the rule;
3. ``rule``: :func:`rule` below.

For (2) and (1) a key measured at another batch size of the same layer and input size stands in, the nearest on
a log scale (a 7x7 layer at batch 256 fills the GPU, at batch 1 it is a handful of tiles: the winners differ).

Small calls run without a CUDA graph are paced by the host's launch cost, not by the kernels (a Triton launch
costs ~100 us of Python, the CUDA extension's ~20 us, the kernels 3-30 us): there the plan is the launch-bound
rule whatever was measured, since the measurements time kernels. A call is small by the model's input pixels
(:func:`small_call`), so a detection input at a small batch (8 x 512x512) takes its measured plans. Where the tuner
has timed a whole model call (:func:`call_key`) in each of :data:`REGIMES`, the fastest decides the call's regime
instead of the pixel count: ``"measured"``, the measured plans; ``"paced"``, the measurements without a Triton launch
(each layer's fastest measured candidate on the CUDA extension or torch, :attr:`Plan.paced`; the launch-bound rule
where none was measured); ``"cuda"``, every layer on the CUDA extension's own default kernels, max-pools included,
as ``backend="cuda"`` runs them (per-layer timings miss what a configuration or a torch op costs the host and the
caches in sequence, so a call paced by its launches can be fastest on the untuned defaults).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import _env
from .. import backends as _backends

OPS = ("conv_bn_act", "aggregate", "max_pool")
SOURCES = ("tuned", "cached", "prior", "rule")
# Batches up to this size run without a CUDA graph (or torch.compile) are paced by their launches.
LAUNCH_BOUND_BATCH = 16
# A model call is small (the small-batch rule; paced by its launches without a CUDA graph) up to this many input
# pixels: the LAUNCH_BOUND_BATCH images of 224x224 the threshold was measured at. Detection inputs (8 x 512x512,
# 4 x 608x1088) are several times that: their kernels outlast their launches and fill the GPU.
LAUNCH_BOUND_PIXELS = LAUNCH_BOUND_BATCH * 224 * 224


def small_call(batch: int, hw: Sequence[int]) -> bool:
    """Whether a model call at ``batch`` x ``hw`` (the model's input size) is small (:data:`LAUNCH_BOUND_PIXELS`)."""
    return batch <= LAUNCH_BOUND_BATCH and batch * int(hw[0]) * int(hw[1]) <= LAUNCH_BOUND_PIXELS
PRIOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prior")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


CALL_PREFIX = "call|"
# The regimes a whole model call is timed in (:func:`dla_fast.plan.tuner.check_call`), the default first.
REGIMES = ("measured", "paced", "cuda")


def call_key(model_tag: str, dtype, n: int, hw: Sequence[int]) -> str:
    """The cache key of a whole model call (``model_tag`` names the network and the levels it runs): the entry
    says which of :data:`REGIMES` that call, run without a CUDA graph, is fastest in on this GPU and host."""
    return f"{CALL_PREFIX}{model_tag}|{_dtype_name(dtype)}|{int(hw[0])}x{int(hw[1])}|n{int(n)}"


def regime_entry(d) -> Optional[str]:
    """The ``regime`` of a call entry (one of :data:`REGIMES`), or None for an entry this version does not read."""
    v = d.get("regime") if isinstance(d, dict) else None
    return v if v in REGIMES else None


@dataclass(frozen=True)
class LayerKey:
    """One fused call's shape: ``sig`` is the op's signature without the batch and the spatial size.

    conv_bn_act: (Cout, Cin/groups, kh, kw, stride h, stride w, pad h, pad w, groups, residual 0/1);
    aggregate: (Cout, residual kind 0 none / 1 children[0] / 2 a tensor, C_0, C_1, ...);
    max_pool: (C, k).
    """

    op: str
    sig: Tuple[int, ...]
    dtype: str
    n: int
    hw: Tuple[int, int]

    def family(self) -> str:
        """The key without the batch size."""
        return f"{self.op}|{','.join(map(str, self.sig))}|{self.dtype}|{self.hw[0]}x{self.hw[1]}"

    def text(self) -> str:
        return f"{self.family()}|n{self.n}"

    @classmethod
    def parse(cls, text: str) -> "LayerKey":
        try:
            op, sig, dtype, hw, n = text.split("|")
            h, w = hw.split("x")
            if op not in OPS or not n.startswith("n"):
                raise ValueError
            return cls(op, tuple(int(v) for v in sig.split(",")), dtype, int(n[1:]), (int(h), int(w)))
        except ValueError:
            raise ValueError(f"not a layer key: {text!r} (expected op|sig|dtype|HxW|nN)") from None

    def label(self) -> str:
        """A short human-readable form, e.g. 'conv 64->128 k1x1 s1 +res @56x56 n256'."""
        s = self.sig
        at = f"@{self.hw[0]}x{self.hw[1]} n{self.n} {self.dtype}"
        if self.op == "conv_bn_act":
            g = f" g{s[8]}" if s[8] > 1 else ""
            res = " +res" if s[9] else ""
            return f"conv {s[1] * s[8]}->{s[0]} k{s[2]}x{s[3]} s{s[4]}{g}{res} {at}"
        if self.op == "aggregate":
            res = ("", " +res(c0)", " +res")[s[1]]
            return f"agg {'+'.join(map(str, s[2:]))}->{s[0]}{res} {at}"
        return f"maxpool k{s[1]} c{s[0]} {at}"


def conv_key(weight_shape: Sequence[int], stride, padding, groups: int, residual: bool, dtype, n: int,
             hw: Sequence[int]) -> LayerKey:
    cout, cin_g, kh, kw = (int(v) for v in weight_shape)
    sig = (cout, cin_g, kh, kw, int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(groups),
           int(bool(residual)))
    return LayerKey("conv_bn_act", sig, _dtype_name(dtype), int(n), (int(hw[0]), int(hw[1])))


def aggregate_key(split: Sequence[int], cout: int, residual_kind: int, dtype, n: int,
                  hw: Sequence[int]) -> LayerKey:
    return LayerKey("aggregate", (int(cout), int(residual_kind)) + tuple(int(c) for c in split),
                    _dtype_name(dtype), int(n), (int(hw[0]), int(hw[1])))


def max_pool_key(channels: int, k: int, dtype, n: int, hw: Sequence[int]) -> LayerKey:
    return LayerKey("max_pool", (int(channels), int(k)), _dtype_name(dtype), int(n), (int(hw[0]), int(hw[1])))


@dataclass(frozen=True)
class Plan:
    """What runs one call: a backend, its config (``()`` = the backend's own rule), where the choice came from
    (one of :data:`SOURCES`) and why."""

    backend: str
    config: Tuple[int, ...] = ()
    source: str = "rule"
    why: str = ""
    ms: Optional[float] = None
    # For a measured Triton winner: the fastest measured candidate that launches no Triton kernel, which a call
    # paced by its launches runs instead (a Triton launch costs the host several times the CUDA extension's).
    paced: Optional["Plan"] = None

    def describe(self, op: str = "conv_bn_act") -> str:
        detail = f" {describe_config(self.backend, self.config, op)}" if self.config else ""
        why = f": {self.why}" if self.why else ""
        return f"{self.backend}{detail} [{self.source}{why}]"

    def to_json(self) -> dict:
        d = {"backend": self.backend, "config": list(self.config)}
        if self.ms is not None:
            d["ms"] = round(float(self.ms), 5)
        if self.why:
            d["why"] = self.why
        if self.paced is not None:
            d["paced"] = self.paced.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict, source: str) -> "Plan":
        backend = d.get("backend") if isinstance(d, dict) else None
        config = d.get("config", []) if isinstance(d, dict) else None
        if backend not in _backends.NAMES or not isinstance(config, list) or \
                not all(isinstance(v, int) for v in config):
            raise ValueError(f"not a plan entry: {d!r}")
        ms = d.get("ms")
        paced = d.get("paced")
        if paced is not None:
            paced = cls.from_json(paced, source)
            if paced.backend == "triton" or paced.paced is not None:
                raise ValueError(f"not a plan entry: {d!r} (its paced plan must launch no Triton kernel)")
        return cls(backend, tuple(config), source, str(d.get("why", "")), float(ms) if ms is not None else None,
                   paced)


def describe_config(backend: str, config: Sequence[int], op: str) -> str:
    """``backend``'s name for ``config``, or the raw ints where this build cannot name it (it still runs: the
    backend falls back)."""
    mod = _backends.get(backend)
    try:
        return mod.describe(config, op)
    except Exception:
        return str(list(config))


# ----------------------------------------------------------------------------------------------- the rule

def _is_rgb_stem(key: LayerKey) -> bool:
    s = key.sig
    return key.op == "conv_bn_act" and s[:4] == (16, 3, 7, 7) and s[4:9] == (1, 1, 3, 3, 1) and not s[9]


def rule(key: LayerKey, available: Dict[str, bool], launch_bound: bool = False,
         small: Optional[bool] = None) -> Plan:
    """The plan when nothing was measured: the choices that hold on every GPU measured so far.

    ``available``: backend name -> whether it can run here. Eager is always available. ``small``: whether the
    model's call is small (:func:`small_call`); None: judged by the layer's batch alone.
    """
    def first(order: Iterable[str], why: str) -> Plan:
        for name in order:
            if name == "eager" or available.get(name):
                return Plan(name, (), "rule", why)
        return Plan("eager", (), "rule", why + "; no kernel backend can run here")

    if key.op == "max_pool":
        if launch_bound:
            return Plan("eager", (), "rule", "small batch without a CUDA graph: torch's launch is the cheapest")
        return first(("triton", "eager"), "the Triton max-pool (torch's NHWC max-pool is several times slower "
                                          "at small batches)")
    if launch_bound:
        return first(("cuda", "eager"), "small batch without a CUDA graph: the cheapest launches")
    if key.op == "conv_bn_act" and key.sig[1] * key.sig[8] < 8:
        if _is_rgb_stem(key):
            return first(("cuda", "eager"), "RGB stem: the CUDA backend's direct 7x7 kernel, else cuDNN")
        return Plan("eager", (), "rule", "fewer than 8 input channels: cuDNN (the implicit GEMMs gather them "
                                         "element by element)")
    if (key.n <= LAUNCH_BOUND_BATCH) if small is None else small:
        return first(("triton", "cuda"), "small batch: Triton splits K over the idle SMs")
    return first(("cuda", "triton"), "large batch: the CUDA tensor-core kernels")


# ------------------------------------------------------------------------------------------------ the prior

def _log_distance(a: int, b: int) -> float:
    return abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))


class _Store:
    """Plans by key text, with the batch sizes measured per family for nearest-batch lookups."""

    def __init__(self, entries: Dict[str, dict], source: str):
        self.source = source
        self.plans: Dict[str, Plan] = {}
        self.by_family: Dict[str, Dict[int, str]] = {}
        for text, d in entries.items():
            try:
                key = LayerKey.parse(text)
                plan = Plan.from_json(d, source)
            except ValueError:
                continue  # an entry of a format this version does not read: ignored, the rest still serve
            self.add(key, plan)

    def add(self, key: LayerKey, plan: Plan) -> None:
        text = key.text()
        self.plans[text] = plan
        self.by_family.setdefault(key.family(), {})[key.n] = text

    def nearest(self, key: LayerKey) -> Optional[Tuple[float, int, Plan]]:
        """(log distance, batch, plan) of the entry nearest ``key``'s batch size, or None."""
        sizes = self.by_family.get(key.family())
        if not sizes:
            return None
        n = min(sizes, key=lambda b: (_log_distance(b, key.n), b))
        return _log_distance(n, key.n), n, self.plans[sizes[n]]


def load_prior(capability: Tuple[int, int]) -> Tuple[Optional[dict], Optional[str]]:
    """(the prior shipped for ``capability``, or the one DLA_FAST_PRIOR names; None if none applies, with why)."""
    spec = _env.get("DLA_FAST_PRIOR")
    if spec is not None and spec.lower() in ("off", "0", "none"):
        return None, "DLA_FAST_PRIOR=off"
    path = spec or os.path.join(PRIOR_DIR, f"sm{capability[0]}{capability[1]}.json")
    if not os.path.isfile(path):
        if spec:
            raise FileNotFoundError(f"DLA_FAST_PRIOR={spec!r}: no such file (set it to a prior JSON or 'off')")
        return None, f"no prior is shipped for compute capability {capability[0]}.{capability[1]}"
    with open(path) as f:
        prior = json.load(f)
    cap = tuple(prior.get("capability") or ())
    if cap != tuple(capability):
        return None, f"{path} was measured on compute capability {cap}, this GPU is {tuple(capability)}"
    return prior, None


# ---------------------------------------------------------------------------------------------- the planner

@dataclass
class _DeviceState:
    available: Dict[str, bool]
    reasons: Dict[str, Optional[str]]
    prior: Optional[_Store]
    prior_note: Optional[str]
    cache: object  # PlanCache
    cached: Optional[_Store]
    tuned: _Store = field(default_factory=lambda: _Store({}, "tuned"))
    memo: Dict[Tuple[str, bool, Optional[bool], Optional[str]], Plan] = field(default_factory=dict)
    regimes: Dict[str, str] = field(default_factory=dict)   # call_key -> the call's measured regime (REGIMES)


class Planner:
    """Resolves :class:`LayerKey` s into :class:`Plan` s, once per key, device and launch regime."""

    def __init__(self):
        self._states: Dict[Tuple[str, int, str], _DeviceState] = {}

    def _state(self, device: torch.device, dtype: torch.dtype) -> _DeviceState:
        idx = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        sk = (device.type, idx, _dtype_name(dtype))
        st = self._states.get(sk)
        if st is not None:
            return st
        probe = torch.empty(0, device=torch.device(device.type, idx) if device.type == "cuda" else device,
                            dtype=dtype)
        reasons = {n: _backends.reason_unavailable(n, probe) for n in _backends.NAMES}
        available = {n: r is None for n, r in reasons.items()}
        prior = None
        note = None
        if device.type == "cuda":
            cap = tuple(torch.cuda.get_device_capability(idx))
            raw, note = load_prior(cap)
            if raw is not None:
                prior = _Store(raw.get("entries", {}), "prior")
        from .cache import PlanCache, environment_fingerprint
        cache = PlanCache(fingerprint=environment_fingerprint(probe.device))
        entries = cache.entries()
        cached = _Store(entries, "cached")
        st = _DeviceState(available, reasons, prior, note, cache, cached)
        for text, d in entries.items():
            verdict = regime_entry(d) if text.startswith(CALL_PREFIX) else None
            if verdict is not None:
                st.regimes[text] = verdict
        self._states[sk] = st
        return st

    def available(self, device: torch.device, dtype: torch.dtype) -> Dict[str, bool]:
        return dict(self._state(device, dtype).available)

    def cache(self, device: torch.device, dtype: torch.dtype):
        """The on-disk plan cache of ``device``'s model and this software's versions."""
        return self._state(device, dtype).cache

    def plan(self, key: LayerKey, device: torch.device, launch_bound: bool = False,
             small: Optional[bool] = None, measured: Optional[str] = None) -> Plan:
        """The plan of ``key`` on ``device``; ``launch_bound``: a small call run without a CUDA graph; ``small``:
        whether the model's call is small (:func:`small_call`; None: judged by the layer's batch), for the rule;
        ``measured``: the model call's regime as the tuner measured it (one of :data:`REGIMES`, or None)."""
        st = self._state(device, getattr(torch, key.dtype))
        mk = (key.text(), bool(launch_bound), small, measured)
        plan = st.memo.get(mk)
        if plan is None:
            plan = self._resolve(key, st, launch_bound, small, measured)
            st.memo[mk] = plan
        return plan

    def _resolve(self, key: LayerKey, st: _DeviceState, launch_bound: bool, small: Optional[bool] = None,
                 measured: Optional[str] = None) -> Plan:
        if not any(st.available[n] for n in ("triton", "cuda")):
            return rule(key, st.available, launch_bound, small)
        if launch_bound:
            if measured == "cuda" and st.available.get("cuda"):
                return Plan("cuda", (), "rule", "a call paced by its launches, fastest on the CUDA extension's "
                            "default kernels (the tuner timed the whole call)")
            if measured in ("paced", "cuda"):  # no Triton launches (for "cuda": the CUDA extension is missing here)
                return self._paced_plan(key, st)
            return rule(key, st.available, launch_bound, small)
        plan = self._measured(key, st)
        return plan if plan is not None else rule(key, st.available, small=small)

    def _paced_plan(self, key: LayerKey, st: _DeviceState) -> Plan:
        """The plan of a layer in a call paced by its launches: its measurement where that launches no Triton
        kernel, else the fastest measured candidate that does not, else the launch-bound rule."""
        plan = self._measured(key, st)
        if plan is not None:
            if plan.backend != "triton":
                return plan
            alt = plan.paced
            if alt is not None and st.available.get(alt.backend):
                triton = f" (Triton's {plan.ms:.4f} ms)" if plan.ms is not None else ""
                return Plan(alt.backend, alt.config, plan.source, "a call paced by its launches: the fastest "
                            f"measured candidate without a Triton launch{triton}", alt.ms)
        return rule(key, st.available, True, False)

    def _measured(self, key: LayerKey, st: _DeviceState) -> Optional[Plan]:
        """The measured plan of ``key`` (tuned, cached, then the prior; the nearest batch size), or None."""
        best = None
        for rank, store in enumerate((st.tuned, st.cached, st.prior)):
            if store is None:
                continue
            hit = store.nearest(key)
            if hit is None or not st.available.get(hit[2].backend):
                continue
            cand = (hit[0], rank, hit)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is not None:
            dist, _, (_, n, plan) = best
            if n != key.n:
                plan = Plan(plan.backend, plan.config, plan.source,
                            f"measured at batch {n}" + (f"; {plan.why}" if plan.why else ""), plan.ms, plan.paced)
            return plan
        return None

    def record(self, device: torch.device, dtype: torch.dtype, plans: Dict[LayerKey, Plan]) -> None:
        """Take freshly tuned plans (the tuner has written them to the cache as well)."""
        st = self._state(device, dtype)
        for key, plan in plans.items():
            st.tuned.add(key, Plan(plan.backend, plan.config, "tuned", plan.why, plan.ms, plan.paced))
        st.memo.clear()

    def regime(self, text: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """The measured regime (one of :data:`REGIMES`) of the model call ``text`` (:func:`call_key`) on
        ``device``, run without a CUDA graph; None when never measured."""
        return self._state(device, dtype).regimes.get(text)

    def record_regime(self, device: torch.device, dtype: torch.dtype, text: str, regime: str) -> None:
        """Take a freshly measured call regime (the tuner has written it to the cache as well)."""
        if regime not in REGIMES:
            raise ValueError(f"not a call regime: {regime!r} (one of {', '.join(REGIMES)})")
        self._state(device, dtype).regimes[text] = regime

    def known(self, key: LayerKey, device: torch.device) -> bool:
        """Whether ``key`` itself (this batch size) was measured on this GPU (in this process or in the cache)."""
        st = self._state(device, getattr(torch, key.dtype))
        return key.text() in st.tuned.plans or (st.cached is not None and key.text() in st.cached.plans)

    def reload(self) -> None:
        """Forget everything (the cache is re-read and the prior reloaded on next use)."""
        self._states.clear()

    def note(self, device: torch.device, dtype: torch.dtype) -> List[str]:
        """Why backends are unavailable or no prior applies here (for summaries)."""
        st = self._state(device, dtype)
        out = [f"{n} unavailable: {r}" for n, r in st.reasons.items() if r is not None]
        if st.prior_note and device.type == "cuda":
            out.append(f"no prior: {st.prior_note}")
        return out


PLANNER = Planner()
