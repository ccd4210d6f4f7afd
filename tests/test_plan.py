"""The per-layer plan: keys, the rule, the prior, the planner's sources, the tuner (fake timer on the CPU) and the
plan cache shared by processes tuning at once."""
import json
import multiprocessing as mp
import os

import pytest
import torch

import dla_fast
from dla_fast import _env
from dla_fast.plan import PLANNER, LayerKey, Plan, aggregate_key, conv_key, max_pool_key, rule
from dla_fast.plan import planner as planner_mod
from dla_fast.plan import tuner
from dla_fast.plan.timing import FakeTimer
from helpers import randomize_bn

EVERY = {"eager": True, "triton": True, "cuda": True}
PRIOR = os.path.join(os.path.dirname(planner_mod.__file__), "prior", "sm90.json")
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory and a planner that has read nothing yet."""
    monkeypatch.setenv("DLA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DLA_FAST_PRIOR", raising=False)
    _env.reload()
    PLANNER.reload()
    yield
    _env.reload()
    PLANNER.reload()


# ------------------------------------------------------------------------------------------------- keys

def test_keys_round_trip_and_read_well():
    k = conv_key((128, 64, 1, 1), (1, 1), (0, 0), 1, True, torch.float16, 256, (56, 56))
    assert LayerKey.parse(k.text()) == k
    assert k.family() == k.text().rsplit("|", 1)[0]
    assert k.label() == "conv 64->128 k1x1 s1 +res @56x56 n256 float16"
    a = aggregate_key((128, 128, 64), 128, 1, torch.bfloat16, 8, (28, 28))
    assert LayerKey.parse(a.text()) == a and a.label() == "agg 128+128+64->128 +res(c0) @28x28 n8 bfloat16"
    g = conv_key((256, 8, 3, 3), (2, 2), (1, 1), 32, False, torch.float16, 1, (14, 14))
    assert g.label() == "conv 256->256 k3x3 s2 g32 @14x14 n1 float16"
    assert max_pool_key(64, 2, torch.float32, 4, (56, 56)).label() == "maxpool k2 c64 @56x56 n4 float32"
    for bad in ("conv|1,2|float16|1x1", "nope|1|float16|1x1|n1", "conv_bn_act|a|float16|1x1|n1"):
        with pytest.raises(ValueError, match="not a layer key"):
            LayerKey.parse(bad)


def test_plan_entries_are_checked():
    p = Plan("cuda", (1, 128, 2), "tuned", "why", 0.5)
    assert Plan.from_json(p.to_json(), "cached") == Plan("cuda", (1, 128, 2), "cached", "why", 0.5)
    # a Triton winner carries the candidate a call paced by its launches runs instead
    t = Plan("triton", (1, 64), "tuned", "why", 0.4, Plan("cuda", (1, 128, 2), "tuned", "0.5 ms", 0.5))
    back = Plan.from_json(json.loads(json.dumps(t.to_json())), "cached")
    assert back.paced == Plan("cuda", (1, 128, 2), "cached", "0.5 ms", 0.5) and back.config == (1, 64)
    for bad in ({"backend": "tensorrt", "config": []}, {"backend": "cuda", "config": "1,2"},
                {"backend": "cuda", "config": [1.5]}, {"backend": "triton", "config": [], "paced": [1]},
                {"backend": "triton", "config": [], "paced": {"backend": "triton", "config": []}}):
        with pytest.raises(ValueError, match="not a plan entry"):
            Plan.from_json(bad, "cached")


# ------------------------------------------------------------------------------------------------- rule

def test_rule():
    stem = conv_key((16, 3, 7, 7), (1, 1), (3, 3), 1, False, torch.float16, 256, (224, 224))
    assert rule(stem, EVERY).backend == "cuda" and "stem" in rule(stem, EVERY).why
    assert rule(stem, dict(EVERY, cuda=False)).backend == "eager"
    rgb3x3 = conv_key((32, 3, 3, 3), (2, 2), (1, 1), 1, False, torch.float16, 256, (224, 224))
    assert rule(rgb3x3, EVERY).backend == "eager"
    deep = conv_key((512, 512, 3, 3), (1, 1), (1, 1), 1, True, torch.float16, 256, (7, 7))
    assert rule(deep, EVERY).backend == "cuda"
    assert rule(deep, dict(EVERY, cuda=False)).backend == "triton"
    one = conv_key((512, 512, 3, 3), (1, 1), (1, 1), 1, True, torch.float16, 1, (7, 7))
    assert rule(one, EVERY).backend == "triton" and rule(one, dict(EVERY, triton=False)).backend == "cuda"
    assert rule(one, {"eager": True}).backend == "eager"
    assert all(p.source == "rule" and p.why for p in (rule(stem, EVERY), rule(one, EVERY)))


# ------------------------------------------------------------------------------------------------ prior

def test_prior_is_compact_and_its_keys_are_real_layer_calls():
    """Every prior entry is a call some variant makes at 224x224 (batch 1 or 256) and differs from the rule."""
    from dla_fast.plan.tuner import collect_calls
    with open(PRIOR) as f:
        prior = json.load(f)
    assert tuple(prior["capability"]) == (9, 0) and prior["entries"]
    families = set()  # the calls do not depend on the batch size or the dtype: collect each once
    for name in dla_fast.list_models():
        with torch.device("meta"):  # shapes only: no weights to draw
            model = dla_fast.create_model(name)
        fast = dla_fast.optimize(model, dtype=torch.float16)
        families |= {c.key.family() for c in collect_calls(fast, 1, (224, 224))}
    families |= {f.replace("|float16|", "|bfloat16|") for f in families}
    for text, entry in prior["entries"].items():
        assert LayerKey.parse(text).family() in families, text
        key, plan = LayerKey.parse(text), Plan.from_json(entry, "prior")
        assert (plan.backend, plan.config) != (rule(key, EVERY).backend, ()), text


def test_prior_applies_on_its_capability_only(monkeypatch, tmp_path):
    assert planner_mod.load_prior((9, 0))[0] is not None
    prior, why = planner_mod.load_prior((8, 6))
    assert prior is None and "8.6" in why
    monkeypatch.setenv("DLA_FAST_PRIOR", "off")
    _env.reload()
    assert planner_mod.load_prior((9, 0)) == (None, "DLA_FAST_PRIOR=off")
    monkeypatch.setenv("DLA_FAST_PRIOR", str(tmp_path / "missing.json"))
    _env.reload()
    with pytest.raises(FileNotFoundError, match="DLA_FAST_PRIOR="):
        planner_mod.load_prior((9, 0))


def test_store_takes_the_nearest_batch():
    fam = conv_key((512, 512, 3, 3), (1, 1), (1, 1), 1, False, torch.float16, 1, (7, 7))
    store = planner_mod._Store({fam.text(): {"backend": "triton", "config": []},
                                LayerKey(fam.op, fam.sig, fam.dtype, 256, fam.hw).text():
                                    {"backend": "cuda", "config": [1, 256, 2]}}, "prior")
    picks = {n: store.nearest(LayerKey(fam.op, fam.sig, fam.dtype, n, fam.hw))[2].backend
             for n in (1, 2, 16, 17, 64, 256, 4096)}
    assert picks == {1: "triton", 2: "triton", 16: "triton", 17: "cuda", 64: "cuda", 256: "cuda", 4096: "cuda"}
    other_hw = LayerKey(fam.op, fam.sig, fam.dtype, 1, (14, 14))
    assert store.nearest(other_hw) is None


# ---------------------------------------------------------------------------------------------- planner

def _planner_with(prior_entries, cached_entries, available=EVERY):
    """A planner for a pretend GPU with the given backends, prior and cache entries."""
    p = planner_mod.Planner()
    st = planner_mod._DeviceState(dict(available), {n: None for n in available},
                                  planner_mod._Store(prior_entries, "prior") if prior_entries is not None else None,
                                  None, None, planner_mod._Store(cached_entries, "cached"))
    p._state = lambda device, dtype: st
    return p


def test_planner_sources_in_order():
    k = conv_key((256, 256, 3, 3), (1, 1), (1, 1), 1, False, torch.float16, 256, (14, 14))
    k1 = LayerKey(k.op, k.sig, k.dtype, 1, k.hw)
    dev = torch.device("cuda", 0)
    p = _planner_with({k.text(): {"backend": "triton", "config": []}}, {})
    assert p.plan(k, dev).source == "prior" and p.plan(k, dev).backend == "triton"
    plan1 = p.plan(k1, dev)  # only batch 256 measured: it stands in, and says so
    assert plan1.source == "prior" and "measured at batch 256" in plan1.why
    p = _planner_with({k.text(): {"backend": "triton", "config": []}},
                      {k.text(): {"backend": "cuda", "config": [1, 128, 2]}})
    assert (p.plan(k, dev).source, p.plan(k, dev).config) == ("cached", (1, 128, 2))
    p.record(dev, torch.float16, {k: Plan("eager", (), "tuned", "x", 0.1)})
    assert p.plan(k, dev).source == "tuned" and p.plan(k, dev).backend == "eager"
    assert p.plan(k, dev, launch_bound=True).source == "rule"  # the host decides small eager batches
    # a measured backend this machine lacks is skipped
    p = _planner_with({k.text(): {"backend": "triton", "config": []}}, {}, dict(EVERY, triton=False))
    assert p.plan(k, dev).source == "rule" and p.plan(k, dev).backend == "cuda"
    # nothing measured: the rule
    p = _planner_with(None, {})
    assert p.plan(k, dev) == rule(k, EVERY)
    # a small batch of a large input (8 x 512x512) is not a small call: the rule's large-call choice, and what was
    # measured at that shape applies (it is not launch-bound)
    k8 = conv_key((256, 256, 3, 3), (1, 1), (1, 1), 1, False, torch.float16, 8, (32, 32))
    assert p.plan(k8, dev).backend == "triton" and "small batch" in p.plan(k8, dev).why
    assert p.plan(k8, dev, small=False).backend == "cuda" and p.plan(k8, dev, small=True).backend == "triton"
    p = _planner_with(None, {k8.text(): {"backend": "triton", "config": [1, 64, 2]}})
    assert (p.plan(k8, dev, small=False).source, p.plan(k8, dev, small=False).config) == ("cached", (1, 64, 2))


def test_a_paced_call_launches_no_triton_kernel():
    """A large call the tuner found paced by its launches (its verdict "paced") keeps what was measured, except
    that a Triton winner gives way to its fastest measured candidate without a Triton launch, and the launch-bound
    rule serves where nothing was measured; a small call takes the launch-bound rule whatever was measured."""
    dev = torch.device("cuda", 0)
    k8 = conv_key((256, 256, 3, 3), (1, 1), (1, 1), 1, False, torch.float16, 8, (64, 64))
    one = conv_key((256, 256, 1, 1), (1, 1), (0, 0), 1, False, torch.float16, 8, (64, 64))
    pool = max_pool_key(128, 2, torch.float16, 8, (128, 128))
    bare = conv_key((128, 128, 3, 3), (1, 1), (1, 1), 1, False, torch.float16, 8, (64, 64))
    p = _planner_with(None, {
        k8.text(): {"backend": "triton", "config": [1, 64], "ms": 0.2,
                    "paced": {"backend": "cuda", "config": [1, 128, 2], "ms": 0.25}},
        one.text(): {"backend": "eager", "config": [], "ms": 0.1},
        pool.text(): {"backend": "triton", "config": [], "ms": 0.02},  # an entry written before paced plans
    })
    assert p.plan(k8, dev, small=False).backend == "triton"  # not paced: the measured winner
    paced = p.plan(k8, dev, launch_bound=True, small=False, measured="paced")
    assert (paced.backend, paced.config, paced.source, paced.ms) == ("cuda", (1, 128, 2), "cached", 0.25)
    assert "without a Triton launch" in paced.why and "0.2000 ms" in paced.why
    assert p.plan(one, dev, launch_bound=True, small=False, measured="paced").backend == "eager"
    assert p.plan(pool, dev, launch_bound=True, small=False, measured="paced") == rule(pool, EVERY, True, False)
    assert p.plan(bare, dev, launch_bound=True, small=False, measured="paced") == rule(bare, EVERY, True, False)
    assert p.plan(k8, dev, launch_bound=True, small=True) == rule(k8, EVERY, True, True)
    # the paced candidate's backend missing on this machine: the launch-bound rule
    no_cuda = dict(EVERY, cuda=False)
    p = _planner_with(None, {k8.text(): {"backend": "triton", "config": [],
                                         "paced": {"backend": "cuda", "config": [1, 128, 2]}}}, no_cuda)
    assert p.plan(k8, dev, launch_bound=True, small=False, measured="paced") == rule(k8, no_cuda, True, False)


# ------------------------------------------------------------------------------------------------ tuner

def test_collect_calls_dedupes_and_keeps_layouts():
    fast = dla_fast.optimize(dla_fast.create_model("dla60_res2net"), dtype=torch.float32)
    calls = tuner.collect_calls(fast, 2, (64, 64))
    keys = [c.key.text() for c in calls]
    assert len(keys) == len(set(keys))
    names = [n for c in calls for n in c.names]
    assert set(names) == {n for n, _ in fast.fused_layers()}  # every fused layer is some call
    sliced = [c for c in calls if c.key.op == "conv_bn_act" and c.inputs[0][1][1] == 1
              and c.inputs[0][0][1] * 4 <= c.inputs[0][1][3]]
    assert sliced, "res2net's split convs read channel slices of a wider channels_last tensor"
    x = tuner._materialise(sliced[0].inputs[0], torch.float32, torch.device("cpu"), torch.Generator())
    assert (tuple(x.shape), tuple(x.stride()), x.storage_offset()) == sliced[0].inputs[0][:3]


def test_collect_calls_refuses_a_size_the_network_cannot_take():
    """A side that is neither 32k nor 32k-1 stops with the forward's own message, not a shape error deep inside
    a level."""
    fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32)
    with pytest.raises(ValueError, match="32k-1 or 32k"):
        tuner.collect_calls(fast, 3, (40, 72))
    assert tuner.collect_calls(fast, 3, (63, 96))


def _costs(table):
    """A FakeTimer charging each candidate by its backend (and config) instead of running it."""
    return FakeTimer(lambda fn: table.get((fn.backend, tuple(fn.config)), table.get(fn.backend, 1.0)) * 1e-3)


@pytest.mark.skipif(not INTERP, reason="needs the Triton interpreter (TRITON_INTERPRET=1) as a second backend")
def test_tuner_picks_the_fastest_checked_candidate_and_caches_it():
    fast = dla_fast.optimize(randomize_bn(dla_fast.create_model("dla34")).eval(), dtype=torch.float32,
                             backend="auto")
    calls = [c for c in tuner.collect_calls(fast, 1, (32, 32)) if c.key.op != "max_pool"][:4]
    dev = torch.device("cpu")
    rep = tuner.TuneReport("cpu", "float32", [(1, 32, 32)])
    plans = tuner.tune_calls(calls, dev, torch.float32, budget_s=None, timer=_costs({"eager": 0.5, "triton": 2.0}),
                             progress=False, report=rep)
    assert set(plans) == {c.key for c in calls} and all(p.backend == "eager" for p in plans.values())
    assert rep.measured == 4 and rep.reused == 0
    assert all(set(e["candidates"]) >= {"eager", "triton"} for e in rep.plans.values())
    # what was measured is now the plan, in this process and from the cache in a fresh planner
    assert all(PLANNER.plan(c.key, dev).source == "tuned" for c in calls)
    PLANNER.reload()
    assert all(PLANNER.plan(c.key, dev).source == "cached" for c in calls)
    # a second tuning reuses the cache and measures nothing
    rep2 = tuner.TuneReport("cpu", "float32", [(1, 32, 32)])
    assert tuner.tune_calls(calls, dev, torch.float32, budget_s=None, timer=_costs({}), progress=False,
                            report=rep2) == {}
    assert (rep2.measured, rep2.reused) == (0, 4)
    # the margin keeps the rule's choice (Triton at batch 1) when the other is barely faster
    PLANNER.reload()
    wide = [c for c in calls if c.key.sig[1] >= 8][:1]  # not the RGB stem, whose rule is the CUDA kernel/cuDNN
    plans = tuner.tune_calls(wide, dev, torch.float32, budget_s=None, force=True, progress=False,
                             timer=_costs({"eager": 0.99, "triton": 1.0}))
    won = next(iter(plans.values()))
    # a Triton winner keeps the fastest candidate without a Triton launch for calls paced by their launches, in
    # this process and in the cache; a winner of another backend needs none
    assert won.backend == "triton" and (won.paced.backend, won.paced.ms) == ("eager", 0.99)
    PLANNER.reload()
    assert PLANNER.plan(wide[0].key, dev).paced.backend == "eager"
    assert all(p.paced is None for p in tuner.tune_calls(calls, dev, torch.float32, budget_s=None, force=True,
                                                         progress=False, timer=_costs({"eager": 0.5})).values())


def test_small_calls_are_timed_by_graph_replay(monkeypatch):
    """The layers of a small model call (measured plans that run only under a CUDA graph or torch.compile) are timed
    by graph replay, a fresh graph timer per layer call; a larger call's by the eager event timer; a timer passed in
    times everything. tune() says which from the model call's size."""
    made = []

    def factory(kind):
        def make(device):
            made.append(kind)
            return _costs({})
        return make
    monkeypatch.setattr(tuner, "cuda_graph_timer", factory("graph"))
    monkeypatch.setattr(tuner, "cuda_event_timer", factory("event"))
    fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32)
    calls = [c for c in tuner.collect_calls(fast, 1, (32, 32)) if c.key.op == "conv_bn_act"][:3]
    dev = torch.device("cpu")
    tuner.tune_calls(calls, dev, torch.float32, budget_s=None, progress=False, replayed=True, force=True)
    assert made == ["graph"] * 3
    made.clear()
    tuner.tune_calls(calls, dev, torch.float32, budget_s=None, progress=False, force=True)
    assert made == ["event"]
    made.clear()
    tuner.tune_calls(calls, dev, torch.float32, budget_s=None, progress=False, replayed=True, force=True,
                     timer=_costs({}))
    assert made == []

    seen = []
    monkeypatch.setattr(tuner, "tune_calls", lambda calls, *a, replayed=False, **k: seen.append(replayed) or {})
    monkeypatch.setattr(tuner, "check_call", lambda *a, **k: None)
    dla_fast.tune(fast, (32, 32), [1, 64], timer=_costs({}), progress=False)
    monkeypatch.setattr(planner_mod, "LAUNCH_BOUND_PIXELS", 0)
    dla_fast.tune(fast, (32, 32), [1], timer=_costs({}), progress=False)
    assert seen == [True, False, False]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_the_graph_timer_times_the_gpu_not_the_host():
    """A candidate whose Python takes 2 ms to launch a tiny kernel: the event timer charges the host's 2 ms, a graph
    replay only the kernel; every replayed call runs (the counter), and a bad call count is refused."""
    import time as _time

    from dla_fast.plan.timing import cuda_event_timer, cuda_graph_timer
    x = torch.zeros(1, device="cuda")

    def slow_host():
        _time.sleep(0.002)
        x.add_(1)
    ev = cuda_event_timer()(slow_host, 3)
    timer = cuda_graph_timer(calls=5)
    first = timer(slow_host, 20)  # captures 5 calls (2 more run eagerly first), replays 4 times
    again = timer(slow_host, 20)
    torch.cuda.synchronize()
    assert ev >= 0.0019 and first < 2e-4 and again < 2e-4
    assert x.item() == 3 + 2 + 20 + 20  # the captured calls only record their kernel
    with pytest.raises(ValueError, match="at least 1"):
        cuda_graph_timer(calls=0)


def test_the_paced_alternative_is_the_fastest_candidate_without_triton():
    from dla_fast.plan.timing import CandidateTiming as T
    cands = [("cuda", (1, 128, 2)), ("triton", (1, 64)), ("cuda", (1, 64, 1)), ("eager", ()), ("cuda", (2,))]
    results = [T(0.3), T(0.1), T(0.25), T(0.28), T(error="RuntimeError: no")]
    alt = tuner._paced_alternative(cands, results)
    assert (alt.backend, alt.config, alt.ms) == ("cuda", (1, 64, 1), 0.25)
    assert tuner._paced_alternative(cands[1:2], results[1:2]) is None


@pytest.mark.skipif(not INTERP, reason="needs the Triton interpreter (TRITON_INTERPRET=1) as a second backend")
def test_tuner_never_picks_a_wrong_candidate(monkeypatch):
    fast = dla_fast.optimize(randomize_bn(dla_fast.create_model("dla34")).eval(), dtype=torch.float32)
    calls = [c for c in tuner.collect_calls(fast, 1, (32, 32)) if c.key.op == "conv_bn_act"][:2]
    real = tuner._runner

    def broken(call, backend, config, args):
        fn = real(call, backend, config, args)
        if backend != "triton":
            return fn

        def wrong():
            return fn() * 1.5
        wrong.backend, wrong.config = fn.backend, fn.config
        return wrong
    monkeypatch.setattr(tuner, "_runner", broken)
    plans = tuner.tune_calls(calls, torch.device("cpu"), torch.float32, budget_s=None, progress=False,
                             timer=_costs({"eager": 5.0, "triton": 0.1}))
    assert all(p.backend == "eager" for p in plans.values())


def test_tuner_budget_leaves_the_rest_to_the_rule():
    fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32)
    calls = tuner.collect_calls(fast, 1, (32, 32))[:5]
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]
    rep = tuner.TuneReport("cpu", "float32", [(1, 32, 32)])
    plans = tuner.tune_calls(calls, torch.device("cpu"), torch.float32, budget_s=3.0, progress=False,
                             timer=_costs({}), clock=clock, report=rep)
    assert 0 < len(plans) < 5 and rep.skipped == 5 - len(plans)


def test_tune_needs_a_gpu_without_a_fake_timer():
    with pytest.raises(RuntimeError, match="tuning times kernels on a GPU"):
        dla_fast.tune(dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32), 64, [1])
    fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32)
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        dla_fast.tune(fast, 64, [0], timer=_costs({}))
    with pytest.raises(ValueError, match="32k-1 or 32k"):
        dla_fast.tune(fast, 65, [1], timer=_costs({}))
    with pytest.raises(ValueError, match="computes in torch.float32, not torch.float16"):
        dla_fast.tune(fast, 64, [1], torch.float16, timer=_costs({}))


def test_tune_end_to_end_with_fake_timer(capsys, monkeypatch):
    real = planner_mod._backends.reason_unavailable
    monkeypatch.setattr(planner_mod._backends, "reason_unavailable",  # eager alone: quick under the interpreter
                        lambda name, x: "off in this test" if name != "eager" else real(name, x))
    fast = dla_fast.optimize(dla_fast.create_model("dla46_c"), dtype=torch.float32)
    rep = dla_fast.tune(fast, (32, 64), [1, 2], timer=_costs({}), budget_s=None)
    assert rep.layers == rep.measured + rep.reused and rep.measured > 20
    assert "tuned" in capsys.readouterr().err
    again = dla_fast.tune(fast, (32, 64), [2, 1], timer=_costs({}), progress=False)
    assert again.measured == 0 and again.reused == rep.layers


def _eager_only(monkeypatch):
    real = planner_mod._backends.reason_unavailable
    monkeypatch.setattr(planner_mod._backends, "reason_unavailable",
                        lambda name, x: "off in this test" if name != "eager" else real(name, x))


def test_check_call_keeps_the_fastest_regime_and_caches_it(monkeypatch):
    """The whole call timed on its measured plans, on its plans without Triton launches and on the CUDA extension's
    defaults: another regime displaces the measured plans only when faster by more than the margin; the verdict is
    cached (in this process and on disk) and decides the regime the forward's layers see; a small call is not
    checked (the launch-bound rule is its regime already)."""
    from dla_fast import fuse
    from dla_fast.plan.cache import PlanCache, environment_fingerprint
    _eager_only(monkeypatch)
    fast = dla_fast.optimize(dla_fast.create_model("dla46_c", features_only=True, out_indices=(2, 3, 4, 5)),
                             dtype=torch.float32)
    cpu = torch.device("cpu")
    assert tuner.check_call(fast, 2, (32, 64), timer=_costs({})) is None  # small by its pixels
    monkeypatch.setattr(planner_mod, "LAUNCH_BOUND_PIXELS", 0)  # every call large: checked
    text = fast.call_key(2, (32, 64))
    assert text == "call|dla46_c-f2345|float32|32x64|n2"
    rep = tuner.TuneReport("cpu", "float32", [(2, 32, 64)])
    assert tuner.check_call(fast, 2, (32, 64), report=rep, timer=_costs(
        {"measured plans": 2.0, "no Triton launches": 1.0, "the CUDA extension's defaults": 1.5})) == "paced"
    assert PLANNER.regime(text, cpu, torch.float32) == "paced"
    assert rep.calls[text] == {"regime": "paced", "measured_ms": 2.0, "paced_ms": 1.0, "cuda_ms": 1.5}
    assert "the whole call at 32x64 batch 2: 2.000 ms measured plans, 1.000 ms no Triton launches, 1.500 ms the " \
           "CUDA extension's defaults; no Triton launches kept" in rep.summary()
    assert PlanCache(fingerprint=environment_fingerprint(cpu)).get(text)["regime"] == "paced"
    seen = []
    hook = fast.level2.register_forward_pre_hook(lambda m, a: seen.append(fuse._REGIME.get()))
    with torch.no_grad():
        fast(torch.randn(2, 3, 32, 64))
        fast(torch.randn(3, 3, 32, 64))  # another size: not measured, the pixel rule (large: not launch-bound)
    hook.remove()
    assert seen == [(True, False, "paced"), (False, False, None)]
    # cached: not measured again unless forced; within the margin the measured plans stay, and each candidate
    # runs its own regime even when the cached verdict is the other one
    assert tuner.check_call(fast, 2, (32, 64), timer=_costs({"measured plans": 9.0})) is None
    seen.clear()
    hook = fast.level2.register_forward_pre_hook(lambda m, a: seen.append(fuse._REGIME.get()))
    assert tuner.check_call(fast, 2, (32, 64), force=True, timer=_costs(
        {"measured plans": 1.01, "no Triton launches": 1.0, "the CUDA extension's defaults": 1.0})) == "measured"
    hook.remove()
    assert seen == [(False, False, "measured"), (True, False, "paced"), (True, False, "cuda")]
    PLANNER.reload()  # a new process reads the verdict from disk
    assert PLANNER.regime(text, cpu, torch.float32) == "measured"
    # the CUDA extension's defaults faster than both by more than the margin: kept, and the forward takes them
    assert tuner.check_call(fast, 2, (32, 64), force=True, timer=_costs(
        {"measured plans": 2.0, "no Triton launches": 1.9, "the CUDA extension's defaults": 1.0})) == "cuda"
    seen.clear()
    hook = fast.level2.register_forward_pre_hook(lambda m, a: seen.append(fuse._REGIME.get()))
    with torch.no_grad():
        fast(torch.randn(2, 3, 32, 64))
    hook.remove()
    assert seen == [(True, False, "cuda")]
    with pytest.raises(ValueError, match="not a call regime"):
        PLANNER.record_regime(cpu, torch.float32, text, "fast")


def test_tune_checks_the_whole_call_of_a_large_input(monkeypatch):
    _eager_only(monkeypatch)
    monkeypatch.setattr(planner_mod, "LAUNCH_BOUND_PIXELS", 0)
    fast = dla_fast.optimize(dla_fast.create_model("dla46_c"), dtype=torch.float32)
    rep = dla_fast.tune(fast, (32, 32), [1], timer=_costs({}), budget_s=None, progress=False)
    assert list(rep.calls) == ["call|dla46_c|float32|32x32|n1"] and rep.calls[fast.call_key(1, (32, 32))]["regime"] \
        == "measured"  # equal times: the measured plans stay
    again = dla_fast.tune(fast, (32, 32), [1], timer=_costs({}), progress=False)
    assert again.measured == 0 and again.calls == {}


def _tune_in_process(cache_dir, out, delay):
    os.environ["DLA_FAST_CACHE_DIR"] = cache_dir
    import time
    import torch as t
    import dla_fast as d
    from dla_fast.plan import tuner as tn
    from dla_fast.plan.timing import FakeTimer as FT

    def slow(fn):
        time.sleep(delay)
        return 1e-3
    fast = d.optimize(d.create_model("dla46_c"), dtype=t.float32)
    calls = tn.collect_calls(fast, 1, (32, 32))
    rep = tn.TuneReport("cpu", "float32", [(1, 32, 32)])
    tn.tune_calls(calls, t.device("cpu"), t.float32, budget_s=None, timer=FT(slow), progress=False, report=rep,
                  rounds=1)
    with open(out, "w") as f:
        json.dump({"measured": rep.measured, "reused": rep.reused, "calls": len(calls)}, f)


@pytest.mark.slow
def test_processes_tuning_at_once_measure_once(tmp_path):
    """Two processes tune the same model at once: one measures under the cache lock, the other waits and reuses."""
    ctx = mp.get_context("spawn")
    env_before = os.environ.get("TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)  # eager only: the point is the lock, not the kernels
    try:
        procs = [ctx.Process(target=_tune_in_process, args=(str(tmp_path / "c"), str(tmp_path / f"{i}.json"), 0.002))
                 for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before
    r = [json.load(open(tmp_path / f"{i}.json")) for i in range(2)]
    n = r[0]["calls"]
    assert sorted((x["measured"], x["reused"]) for x in r) == [(0, n), (n, 0)]
    files = [f for f in os.listdir(tmp_path / "c") if f.endswith(".json")]
    assert len(files) == 1 and len(json.load(open(tmp_path / "c" / files[0]))["entries"]) == n


# ---------------------------------------------------------------------------------------- plan printing

def test_summary_prints_sources(monkeypatch):
    # On a GPU machine the Triton kernels run on the GPU (the CPU interpreter is off there).
    dev = "cuda" if torch.cuda.is_available() else None
    fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32, backend="triton", device=dev)
    s = fast.summary(batch=1, hw=(64, 64))
    assert "triton [requested]" in s and "batch 1, 64x64" in s
    rows = fast.plans(1, (64, 64))
    front = {"front"} if fast.front is not None and fast.front.when == "always" else set()  # on a GPU
    assert {p.source for _, _, p in rows} == {"requested"} | front and len(rows) == len(fast.fused_layers())


# -------------------------------------------------------------------------------------------- compile ahead

class _NeverLaunched:
    """A stand-in kernel that fails the test if anything tries to launch it."""

    params = ()

    def __getitem__(self, grid):
        raise AssertionError("a launch ran while launches were being recorded")


@pytest.mark.skipif(not INTERP, reason="needs the Triton backend importable (TRITON_INTERPRET=1 on the CPU)")
def test_compile_ahead_records_launches_and_compiles_each_kernel_once(monkeypatch):
    """The tuner's compile-ahead: the candidates' launches are recorded, none run; each distinct kernel (kernel,
    constexprs, argument specialisation) is compiled once, in threads; a kernel that fails to compile is left to
    its real launch; on the CPU nothing is compiled."""
    import threading
    from dla_fast.backends import triton as tb
    from dla_fast.backends.triton import _launch
    fake = _NeverLaunched()
    kernels = pytest.MonkeyPatch()  # undone before the tuner runs below (the cache directory's patch stays)
    for name in ("_conv_gemm_kernel", "_conv_direct_kernel", "_aggregate_kernel", "_splitk_epilogue_kernel"):
        kernels.setattr(_launch, name, fake)
    try:
        fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32, backend="auto")
        dev = torch.device("cpu")

        def triton_runs(calls):
            runs = []
            for call in calls:
                args = tuner._args(call, dev, torch.float32, None)
                runs += [tuner._runner(call, b, c, args) for b, c in tuner._candidates(call, args, {"triton": True})
                         if b == "triton"]
            return runs
        calls = [c for c in tuner.collect_calls(fast, 2, (32, 32)) if c.key.op != "max_pool"][:6]
        runs = triton_runs(calls)
        launches = _launch.record_launches(runs)
        assert len(launches) >= len(runs) > len(calls) and all(k is fake for k, _, _ in launches)
        distinct = _launch.distinct_launches(launches)
        assert len(distinct) > 1 and _launch.distinct_launches(launches + launches) == distinct
        # the same layers at batch 4 compile to the same kernels (M differs, a multiple of 16 either way)
        at4 = _launch.record_launches(triton_runs([c for c in tuner.collect_calls(fast, 4, (32, 32))
                                                   if c.key.op != "max_pool"][:6]))
        assert len(at4) == len(launches) and len(_launch.distinct_launches(launches + at4)) == len(distinct)
        with pytest.raises(AssertionError, match="launch ran"):
            runs[0]()  # outside the recording the launch is real
        # the specialisation: ints by == 1 / multiple of 16, tensors by dtype and 16-byte alignment, constexprs exactly
        x = torch.zeros(64)
        same = [(fake, (x, 32), {"B": 4}), (fake, (torch.zeros(64), 48), {"B": 4})]
        other = [(fake, (x, 33), {"B": 4}), (fake, (x[1:], 32), {"B": 4}), (fake, (x, 32), {"B": 8}),
                 (fake, (x.half(), 32), {"B": 4}), (fake, (x, 1), {"B": 4})]
        assert len(_launch.distinct_launches(same)) == 1 and len(_launch.distinct_launches(same + other)) == 6
        # compile: each distinct kernel once, on worker threads; one that fails is not counted and stops nothing
        seen, threads = [], set()

        def warm(k, a, kw):
            threads.add(threading.current_thread().name)
            seen.append((a, kw))
            if len(seen) == 1:
                raise RuntimeError("out of shared memory")
        assert tb.compile_ahead(runs, dev, threads=3, warm=warm) == len(distinct) - 1
        assert len(seen) == len(distinct) and all(t.startswith("dla_fast_compile") for t in threads)
        assert tb.compile_ahead(runs, dev) == 0  # the CPU: the kernels do not run compiled here
    finally:
        kernels.undo()
    # the tuner compiles every COMPILE_AHEAD_CALLS calls' Triton candidates before timing them
    asked = []
    monkeypatch.setattr(tb, "compiled", lambda device: True)
    monkeypatch.setattr(tb, "compile_ahead", lambda runs, device: asked.append(runs) or 5)
    monkeypatch.setattr(tuner, "COMPILE_AHEAD_CALLS", 2)
    rep = tuner.TuneReport("cpu", "float32", [(2, 32, 32)])
    tuner.tune_calls(calls[:3], dev, torch.float32, budget_s=None, progress=False, report=rep, rounds=1,
                     timer=_costs({}))
    assert len(asked) == 2 and all(fn.backend == "triton" for runs in asked for fn in runs)
    assert rep.compiled == 10 and "10 Triton kernels compiled" in rep.summary()


@pytest.mark.cuda
@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_compile_ahead_on_the_gpu_leaves_nothing_to_compile():
    """On a GPU the tuner's compile-ahead leaves every Triton candidate of its calls compiled: their real launches
    afterwards add nothing to Triton's in-memory kernel caches."""
    from dla_fast.backends import triton as tb
    from dla_fast.backends.triton import _kernels
    dev = torch.device("cuda", torch.cuda.current_device())
    fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float16, device=dev)
    calls = [c for c in tuner.collect_calls(fast, 3, (63, 96)) if c.key.op != "max_pool"]
    gen = torch.Generator().manual_seed(0)
    runs = []
    for call in calls:
        args = tuner._args(call, dev, torch.float16, gen)
        runs += [tuner._runner(call, b, c, args) for b, c in tuner._candidates(call, args, {"triton": True})
                 if b == "triton"]
    kernels = [_kernels._conv_gemm_kernel, _kernels._conv_direct_kernel, _kernels._aggregate_kernel,
               _kernels._splitk_epilogue_kernel]

    def cached():
        return sum(len(k.device_caches[dev.index][0]) for k in kernels)
    before = cached()
    assert tb.compile_ahead(runs, dev) > 0
    ahead = cached()
    ran = 0
    for fn in runs:
        try:
            fn()
            ran += 1
        except Exception:  # a config this call cannot take (the tuner's check skips it the same way)
            pass
    torch.cuda.synchronize()
    assert ahead >= before and ran > 0 and cached() == ahead


@pytest.mark.cuda
@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_check_call_on_the_gpu_times_every_regime_and_all_agree():
    """A detection call large enough for its measured plans (4 x 512x512): the tuner times it in each regime and
    caches a verdict; every regime gives the same feature maps (different kernels, the same numbers)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    model = dla_fast.create_model("dla34", features_only=True, out_indices=(2, 3, 4, 5))
    randomize_bn(model)
    fast = dla_fast.optimize(model, dtype=torch.float16, device=dev)
    rep = dla_fast.tune(fast, (512, 512), [4], budget_s=None, progress=False)
    entry = rep.calls[fast.call_key(4, (512, 512))]
    assert entry["measured_ms"] > 0 and entry["paced_ms"] > 0 and entry["cuda_ms"] > 0
    assert PLANNER.regime(fast.call_key(4, (512, 512)), dev, torch.float16) == entry["regime"]
    x = torch.randn(4, 3, 512, 512, device=dev)
    outs = []
    with torch.no_grad():
        for regime in ("measured", "paced", "cuda"):
            fast.forget_plans()
            fast._regime_memo[(4, 512, 512)] = regime
            outs.append([f.float() for f in fast(x)])
    fast.forget_plans()
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_a_forced_backend_keeps_its_own_tuned_config(monkeypatch):
    """backend="cuda" runs a layer on the CUDA extension whatever won it, with the tuned config the CUDA backend
    measured there: the winner's, or the paced candidate's where Triton won; else the backend's own rule."""
    from dla_fast import fuse
    layer = fuse.FusedConvBnAct(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), None, True, "cuda",
                                torch.float16)
    monkeypatch.setattr(layer, "device", lambda: torch.device("cuda", 0))
    measured = {}
    monkeypatch.setattr(fuse.PLANNER, "plan", lambda key, dev, lb=False, small=None: measured["plan"])
    measured["plan"] = Plan("triton", (1, 64), "cached", "", 0.2, Plan("cuda", (1, 128, 2), "cached", "", 0.25))
    p = layer.plan_for(8, (64, 64), False)
    assert (p.backend, p.config, p.source, p.ms) == ("cuda", (1, 128, 2), "requested", 0.25)
    measured["plan"] = Plan("cuda", (1, 64, 1), "tuned", "", 0.1)
    assert layer.plan_for(8, (64, 64), False).config == (1, 64, 1)
    measured["plan"] = Plan("triton", (1, 64), "cached", "", 0.2, Plan("eager", (), "cached", "", 0.25))
    assert layer.plan_for(8, (64, 64), False) == Plan("cuda", (), "requested")
    measured["plan"] = Plan("cuda", (1, 64, 1), "prior")  # the prior is not this GPU's measurement
    assert layer.plan_for(8, (64, 64), False) == Plan("cuda", (), "requested")


def test_a_call_measured_as_paced_launches_no_triton_kernel(monkeypatch):
    """Every layer measured fastest on Triton, with a slower candidate on another backend: the call whose whole-call
    verdict is "paced" runs those candidates and launches no Triton kernel; the same layers keep Triton otherwise.
    (A pretend GPU: the planner's state says every backend runs, the layers plan as if on cuda:0.)"""
    from dla_fast import fuse
    from dla_fast.backends import triton as tb
    monkeypatch.setattr(planner_mod, "LAUNCH_BOUND_PIXELS", 0)  # every call large: the measured plans apply
    fast = dla_fast.optimize(dla_fast.create_model("dla46_c", features_only=True, out_indices=(2, 3, 4, 5)),
                             dtype=torch.float32)
    gpu = torch.device("cuda", 0)
    fake = _planner_with(None, {})
    st = fake._state(gpu, torch.float32)
    monkeypatch.setattr(fuse.PLANNER, "_state", lambda device, dtype: st)
    for _, layer in fast.fused_layers():
        monkeypatch.setattr(layer, "device", lambda: gpu)
    calls = tuner.collect_calls(fast, 2, (32, 64))
    fuse.PLANNER.record(gpu, torch.float32, {c.key: Plan("triton", (), "tuned", "", 0.5,
                                                         Plan("eager", (), "tuned", "", 1.0)) for c in calls})
    fuse.PLANNER.record_regime(gpu, torch.float32, fast.call_key(2, (32, 64)), "paced")
    fast.forget_plans()

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched in a call paced by its launches")
    for op in ("conv_bn_act", "aggregate", "max_pool", "front"):
        monkeypatch.setattr(tb, op, refuse)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        outs = fast(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(8, 16), (4, 8), (2, 4), (1, 2)]
    paced = [p for _, _, p in fast.plans(2, (32, 64), replayed=False)]
    assert len(paced) == len(fast.fused_layers()) and {p.backend for p in paced} == {"eager"}
    assert all("without a Triton launch" in p.why and p.source == "tuned" for p in paced)
    assert {p.backend for _, _, p in fast.plans(2, (32, 64), replayed=True)} == {"triton"}  # a graph hides launches
    # a call measured fastest on the CUDA extension's defaults: every layer there, max-pools included
    fuse.PLANNER.record_regime(gpu, torch.float32, fast.call_key(2, (32, 64)), "cuda")
    fast.forget_plans()
    ruled = {(label.split()[0], p.backend, p.source, p.config) for _, label, p in fast.plans(2, (32, 64), False)}
    assert ruled == {("conv", "cuda", "rule", ()), ("agg", "cuda", "rule", ()), ("maxpool", "cuda", "rule", ())}
    assert {p.backend for _, _, p in fast.plans(2, (32, 64), replayed=True)} == {"triton"}
