"""The candidate timer (dla_fast/plan/timing.py) on the CPU, driven by a fake timer and a fake clock: medians,
sample sizing, interleaving with rotation, failed candidates, the wall-clock budget, pick() and Progress."""
import io
import math
import statistics
import time

import pytest
import torch

from dla_fast.plan import timing
from dla_fast.plan.timing import CandidateTiming, FakeClock, FakeTimer, Progress, pick, time_candidates


def _candidates(n, log=None):
    """n distinct no-argument candidates; each call appends ("call", i) to ``log`` when given."""
    def make(i):
        def fn():
            if log is not None:
                log.append(("call", i))
        fn.__name__ = f"candidate{i}"
        return fn
    return [make(i) for i in range(n)]


# ------------------------------------------------------------------------------------------- measuring


def test_median_of_the_samples_in_ms():
    fns = _candidates(3)
    ft = FakeTimer({fns[0]: 2e-3, fns[1]: 1e-3, fns[2]: 3e-3}, noise=0.2, seed=1)
    res = time_candidates(fns, timer=ft, rounds=5, iters=4)
    assert len(res) == 3 and res.rounds == res.rounds_requested == 5 and not res.stopped_early
    for r, cost in zip(res, (2.0, 1.0, 3.0)):
        assert r.ok and r.error is None and r.iters == 4 and len(r.samples) == 5
        assert r.ms == statistics.median(r.samples)
        assert all(0.8 * cost <= s <= 1.2 * cost for s in r.samples)
        assert len(set(r.samples)) == 5  # the noise really varies the samples
    assert pick(res) == 1


def test_noise_free_costs_come_back_exactly():
    fns = _candidates(2)
    res = time_candidates(fns, timer=FakeTimer({fns[0]: 0.5e-3, fns[1]: 0.25e-3}), rounds=3, iters=1)
    assert [r.ms for r in res] == [0.5, 0.25]
    assert [r.samples for r in res] == [[0.5] * 3, [0.25] * 3]


def test_samples_are_sized_from_the_warm_up():
    fns = _candidates(3)
    ft = FakeTimer({fns[0]: 1e-4, fns[1]: 3e-3, fns[2]: 0.0})
    res = time_candidates(fns, timer=ft, warmup=3, rounds=2, min_time_s=0.002, max_iters=500)
    # 2 ms per sample: 20 calls of 0.1 ms, 1 call of 3 ms; a zero-cost candidate gets the cap
    assert [r.iters for r in res] == [20, 1, 500]
    assert ft.calls[:3] == [(fns[0], 3), (fns[1], 3), (fns[2], 3)]  # the warm-up: `warmup` calls each
    assert sorted(n for _, n in ft.calls[3:]) == sorted([20, 1, 500] * 2)


def test_fixed_iters_and_no_warm_up():
    log = []
    fns = _candidates(2, log)
    ft = FakeTimer({fns[0]: 1e-3, fns[1]: 1e-3})
    res = time_candidates(fns, timer=ft, warmup=0, rounds=2, iters=7)
    assert [r.iters for r in res] == [7, 7]
    assert all(n == 7 for _, n in ft.calls) and len(ft.calls) == 4  # no warm-up timing, 2 rounds x 2
    assert log == [("call", 0), ("call", 1)]  # the plain first call still happens


def test_warm_up_then_interleaved_rounds_rotated_each_round():
    log = []
    fns = _candidates(3, log)

    def cost(fn):
        log.append(("time", fns.index(fn)))
        return 1e-3

    time_candidates(fns, timer=FakeTimer(cost), warmup=2, rounds=4, iters=1)
    warm, rounds = log[:6], log[6:]
    # each candidate: its plain first call, then its warm-up timing, before the next candidate
    assert warm == [("call", 0), ("time", 0), ("call", 1), ("time", 1), ("call", 2), ("time", 2)]
    order = [i for what, i in rounds]
    assert all(what == "time" for what, _ in rounds)
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]


def test_every_candidate_runs_first_equally_often():
    fns = _candidates(4)
    ft = FakeTimer(lambda fn: 1e-3)
    time_candidates(fns, timer=ft, warmup=1, rounds=8, iters=1)
    order = ft.order(fns)[4:]  # after the warm-up
    firsts = [order[r * 4] for r in range(8)]
    assert sorted(firsts) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(sorted(order[r * 4:(r + 1) * 4]) == [0, 1, 2, 3] for r in range(8))  # each round samples all


def test_candidate_failing_in_warm_up_is_inf_with_the_error_and_skipped():
    fns = _candidates(3)

    def broken():
        raise RuntimeError("boom: no kernel for this shape\nsecond line")

    fns[1] = broken
    ft = FakeTimer({fns[0]: 2e-3, fns[2]: 1e-3})
    res = time_candidates(fns, timer=ft, rounds=3, iters=1)
    bad = res[1]
    assert not bad.ok and bad.ms == math.inf and bad.samples == [] and bad.iters == 0
    assert bad.error == "RuntimeError: boom: no kernel for this shape"
    assert isinstance(bad.exception, RuntimeError) and bad.exception.__traceback__ is None
    assert "boom" in bad.traceback and "in broken" in bad.traceback
    assert broken not in [f for f, _ in ft.calls]  # never timed
    assert [r.ms for r in (res[0], res[2])] == [2.0, 1.0] and res[0].ok and res[2].ok
    assert pick(res) == 2


def test_candidate_failing_in_a_later_round_is_dropped_from_the_rest():
    fns = _candidates(3)
    n_timed = {"c": 0}

    def cost(fn):
        if fn is fns[2]:
            n_timed["c"] += 1
            if n_timed["c"] == 3:  # warm-up and round 1 succeed; round 2 fails (e.g. out of memory)
                raise RuntimeError("CUDA out of memory")
        return 1e-3

    ft = FakeTimer(cost)
    res = time_candidates(fns, timer=ft, rounds=4, iters=1)
    assert res[2].ms == math.inf and res[2].error == "RuntimeError: CUDA out of memory"
    assert res[2].samples == [1.0]  # what it measured before failing is kept
    assert [len(r.samples) for r in res[:2]] == [4, 4] and res[0].ok and res[1].ok
    assert ft.order(fns).count(2) == 3  # not timed after its failure
    assert res.rounds == 4


def test_failing_timer_results_are_caught():
    fns = _candidates(3)
    res = time_candidates(fns, timer=FakeTimer({fns[0]: float("nan"), fns[1]: -1.0, fns[2]: ValueError("bad")}),
                          rounds=2, iters=1)
    assert all(r.ms == math.inf for r in res)
    assert "returned nan seconds per call for candidate 0" in res[0].error
    assert "returned -1.0 seconds" in res[1].error
    assert res[2].error == "ValueError: bad"
    with pytest.raises(ValueError, match=r"every candidate failed \(0: ValueError: the timer returned nan"):
        pick(res)


def test_error_without_a_message_is_named_by_its_type():
    def broken():
        raise KeyError()

    res = time_candidates([broken], timer=FakeTimer(lambda fn: 1e-3))
    assert res[0].error == "KeyError" and res.rounds == 0


def test_keyboard_interrupt_is_not_swallowed():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        time_candidates([interrupted], timer=FakeTimer(lambda fn: 1e-3))


def test_fake_timer_call_fn_runs_the_candidate():
    log = []
    fns = _candidates(2, log)
    time_candidates(fns, timer=FakeTimer(lambda fn: 1e-3, call_fn=True), warmup=1, rounds=2, iters=1)
    # plain first call + warm-up timing + 2 samples, each candidate
    assert sorted(log) == [("call", 0)] * 4 + [("call", 1)] * 4


# ---------------------------------------------------------------------------------------------- budget


def test_budget_stops_after_the_round_that_spends_it():
    clock = FakeClock(100.0)
    fns = _candidates(2)
    ft = FakeTimer({fns[0]: 1e-3, fns[1]: 1e-3}, clock=clock)
    # no warm-up timing: each round of 2 samples x 10 calls x 1 ms spends 0.02 s of the fake clock
    res = time_candidates(fns, timer=ft, warmup=0, rounds=7, iters=10, budget_s=0.05, clock=clock)
    assert res.stopped_early and res.rounds == 3 and res.rounds_requested == 7
    assert [len(r.samples) for r in res] == [3, 3] and all(r.ms == 1.0 for r in res)
    assert res.elapsed_s == pytest.approx(0.06)


def test_budget_counts_the_warm_up_and_always_runs_one_round():
    clock = FakeClock()
    fns = _candidates(2)
    ft = FakeTimer({fns[0]: 1.0, fns[1]: 1.0}, clock=clock)
    res = time_candidates(fns, timer=ft, warmup=3, rounds=5, iters=1, budget_s=1.0, clock=clock)
    assert res.stopped_early and res.rounds == 1 and [len(r.samples) for r in res] == [1, 1]
    res = time_candidates(fns, timer=ft, warmup=0, rounds=5, iters=1, budget_s=0, clock=clock)
    assert res.stopped_early and res.rounds == 1


def test_budget_not_reached_runs_every_round():
    clock = FakeClock()
    fns = _candidates(2)
    ft = FakeTimer({fns[0]: 1e-3, fns[1]: 1e-3}, clock=clock)
    res = time_candidates(fns, timer=ft, rounds=4, iters=1, budget_s=10.0, clock=clock)
    assert not res.stopped_early and res.rounds == 4
    res = time_candidates(fns, timer=ft, rounds=1, iters=1, budget_s=0.0, clock=clock)
    assert not res.stopped_early and res.rounds == 1  # one round was all that was asked for


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": 0}, r"rounds=0\): an integer >= 1"),
    ({"warmup": -1}, r"warmup=-1\): an integer >= 0"),
    ({"iters": 0}, r"iters=0\): an integer >= 1"),
    ({"iters": 2.5}, r"iters=2.5\): an integer >= 1"),
    ({"max_iters": 0}, r"max_iters=0\): an integer >= 1"),
    ({"min_time_s": 0}, r"min_time_s=0\): seconds > 0"),
    ({"budget_s": -1}, r"budget_s=-1\): seconds >= 0"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    fns = _candidates(1)
    with pytest.raises(ValueError, match=match):
        time_candidates(fns, timer=FakeTimer(lambda fn: 1e-3), **kwargs)


def test_non_callable_candidate_is_a_clear_error():
    with pytest.raises(TypeError, match="candidate 1 is a int, not a callable"):
        time_candidates([lambda: None, 3], timer=FakeTimer(lambda fn: 1e-3))


def test_no_candidates_gives_an_empty_result():
    res = time_candidates([], timer=FakeTimer(lambda fn: 1e-3))
    assert list(res) == [] and res.rounds == 0 and not res.stopped_early


def test_fake_timer_bad_input():
    with pytest.raises(TypeError, match="FakeTimer costs must be"):
        FakeTimer(3)
    with pytest.raises(ValueError, match=r"noise=1\.5"):
        FakeTimer({}, noise=1.5)
    fn = _candidates(1)[0]
    with pytest.raises(KeyError, match="no cost for candidate"):
        FakeTimer({})(fn, 1)


# ------------------------------------------------------------------------------------------------ pick


def test_pick_keeps_the_default_within_the_margin():
    assert pick([1.0, 0.97], margin=0.05) == 0  # 3% faster: noise, keep the rule's choice
    assert pick([1.0, 0.90], margin=0.05) == 1  # 11% faster: switch
    assert pick([1.0, 1.0 / 1.05], margin=0.05) == 0  # exactly at the margin: not *more* than it
    assert pick([1.0, 0.999]) == 1  # no margin: the fastest
    assert pick([1.0, 1.0, 1.0]) == 0  # ties keep the default
    assert pick([0.5, 0.4, 0.4]) == 1  # ... then the lower index


def test_pick_with_another_default():
    assert pick([0.9, 1.0, 2.0], default_index=1, margin=0.2) == 1
    assert pick([0.7, 1.0, 2.0], default_index=1, margin=0.2) == 0
    assert pick([0.7, 1.0, 0.5], default_index=2, margin=0.2) == 2


def test_pick_when_the_default_failed_or_others_failed():
    ok = CandidateTiming(ms=3.0, samples=[3.0], iters=1)
    failed = CandidateTiming(error="RuntimeError: no kernel")
    assert pick([failed, ok], margin=0.5) == 1
    assert pick([ok, failed]) == 0
    assert pick([math.inf, 2.0, float("nan"), 1.0]) == 3  # nan counts as failed too
    with pytest.raises(ValueError, match=r"every candidate failed \(0: RuntimeError: no kernel; 1: RuntimeError"):
        pick([failed, failed])
    with pytest.raises(ValueError, match="every candidate failed$"):
        pick([math.inf])


def test_pick_bad_input():
    with pytest.raises(ValueError, match="no candidates"):
        pick([])
    with pytest.raises(ValueError, match=r"default_index=2\): not the index of one of the 2"):
        pick([1.0, 2.0], default_index=2)
    with pytest.raises(ValueError, match=r"margin=-0.1\): a relative margin >= 0"):
        pick([1.0, 2.0], margin=-0.1)
    with pytest.raises(TypeError, match="CandidateTiming results or milliseconds, got str"):
        pick(["1.0"])


def test_noise_never_flips_the_choice_between_equal_candidates():
    fns = _candidates(3)
    for seed in range(20):
        ft = FakeTimer({f: 1e-3 for f in fns}, noise=0.04, seed=seed)
        res = time_candidates(fns, timer=ft, rounds=7, iters=1)
        assert pick(res, margin=0.1) == 0
    # while a real 2x difference wins through the same noise
    ft = FakeTimer({fns[0]: 1e-3, fns[1]: 1e-3, fns[2]: 0.5e-3}, noise=0.04)
    assert pick(time_candidates(fns, timer=ft, rounds=7, iters=1), margin=0.1) == 2


# ------------------------------------------------------------------------------------------ real timers


def test_wall_timer_calls_fn_iters_times():
    n = {"c": 0}

    def fn():
        n["c"] += 1

    s = timing.wall_timer(fn, 5)
    assert n["c"] == 5 and s >= 0


def test_wall_timer_ranks_a_sleep_behind_a_no_op():
    res = time_candidates([lambda: time.sleep(0.003), lambda: None], warmup=1, rounds=3, iters=2)
    assert res[0].ms >= 2.5 and res[1].ms < res[0].ms / 10  # sleeps last at least as long as asked
    assert pick(res, margin=0.05) == 1


def test_cuda_event_timer_rejects_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA events time CUDA devices only; use wall_timer for cpu"):
        timing.cuda_event_timer("cpu")


@pytest.mark.cuda
def test_cuda_event_timer_ranks_a_bigger_matmul_behind():
    a = torch.randn(256, 256, device="cuda")
    b = torch.randn(2048, 2048, device="cuda")
    timer = timing.cuda_event_timer()
    small = timer(lambda: a @ a, 10)
    big = timer(lambda: b @ b, 10)
    assert 0 < small < big
    res = time_candidates([lambda: b @ b, lambda: a @ a], timer=timing.cuda_event_timer(0), rounds=3)
    assert all(r.ok and r.iters >= 1 for r in res) and pick(res, margin=0.1) == 1


# -------------------------------------------------------------------------------------------- progress


def test_progress_lines_are_throttled_and_end_with_a_final_line():
    clock = FakeClock()
    out = io.StringIO()
    p = Progress(5, prefix="tune dla34 ", stream=out, clock=clock)
    for t, label in zip((0.0, 0.1, 0.6, 0.7, 1.2), "abcde"):
        clock.now = t
        p.step(label)
    clock.now = 1.3
    p.close()
    p.close()  # once only
    assert out.getvalue().splitlines() == [
        "tune dla34 [1/5] a ... (0.0s elapsed)",
        "tune dla34 [3/5] c ... (0.6s elapsed, eta 0.9s)",  # 2 finished in 0.6 s, 3 to go
        "tune dla34 [5/5] e ... (1.2s elapsed, eta 0.3s)",
        "tune dla34 [5/5] done in 1.3s",
    ]


def test_progress_disabled_prints_nothing(capsys):
    with Progress(3, enabled=False) as p:
        for _ in range(3):
            p.step("x")
    assert p.k == 3
    assert capsys.readouterr() == ("", "")


def test_progress_goes_to_stderr_and_reports_a_stop(capsys):
    clock = FakeClock()
    with pytest.raises(RuntimeError):
        with Progress(200, clock=clock) as p:
            p.step("first")
            clock.now = 75.0
            raise RuntimeError("cut off")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["[1/200] first ... (0.0s elapsed)", "[1/200] stopped (RuntimeError) in 1m15s"]


def test_progress_durations_and_bad_total():
    assert timing._duration(3725) == "1h02m" and timing._duration(59.94) == "59.9s"
    with pytest.raises(ValueError, match=r"Progress\(total=-1\)"):
        Progress(-1)
