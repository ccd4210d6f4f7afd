"""The per-layer plan of ``backend="auto"``: which backend, kernel and tile run each fused layer, and why.

- :mod:`.planner` resolves a layer call (:class:`LayerKey`) into a :class:`Plan` once per key and device: the
  user's own measurements (tuned in this process, or cached on disk), else the prior shipped for the GPU's
  compute capability, else the rules;
- :mod:`.tuner` measures the candidates of every layer on the GPU in use (:func:`tune`);
- :mod:`.cache` keeps the measurements on disk, one file per GPU model and software versions;
- :mod:`.timing` times candidates (CUDA events, interleaved rounds, medians).
"""
from .planner import PLANNER, LayerKey, Plan, Planner, aggregate_key, conv_key, max_pool_key, rule
from .tuner import TuneReport, tune

__all__ = ["PLANNER", "LayerKey", "Plan", "Planner", "aggregate_key", "conv_key", "max_pool_key", "rule", "tune",
           "TuneReport"]
