"""The on-disk plan cache (dla_fast/plan/cache.py) on the CPU: round trip, concurrent writer processes, the
inter-process lock, corrupt / stale files, an unwritable directory, the cache location and the fingerprint."""
import json
import multiprocessing
import os
import threading
import time
import warnings

import pytest
import torch

import dla_fast
from dla_fast.plan import cache as pc
from dla_fast.plan.cache import PlanCache, PlanCacheLockTimeout, PlanCacheWarning

FP = {"format": pc.CACHE_FORMAT, "device": "Test GPU 80GB", "capability": "9.0", "torch": "2.9.0", "cuda": "12.8",
      "triton": "3.5.0", "dla_fast": "0.1.0"}


def _cache(directory, fp=FP):
    return PlanCache(directory, fingerprint=fp)


def _write_json(path, doc):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)


def _valid_doc(entries=None, fp=FP):
    return {"format": pc.CACHE_FORMAT, "environment": dict(fp), "entries": entries or {"old": {"v": 1}}}


class _Recorded:
    """The PlanCacheWarnings raised inside the block (all of them: no once-per-location filtering)."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.all = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)

    @property
    def messages(self):
        return [str(w.message) for w in self.all if issubclass(w.category, PlanCacheWarning)]


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip(tmp_path):
    c = _cache(tmp_path)
    assert c.path == os.path.join(str(tmp_path), f"plans-{pc.fingerprint_id(FP)}.json")
    assert c.get("a") is None and c.entries() == {} and len(c) == 0
    assert not os.path.exists(c.path)  # reading creates nothing
    with _Recorded() as rec:
        c.update({"conv 1x64x56x56 f16": {"backend": "cuda", "ms": [0.1, 0.2], "cfg": (64, 2)},
                  "agg": {"backend": "triton", "note": None}})
        c.update({"agg": {"backend": "eager"}})  # replaces the entry
    assert rec.messages == []
    # what update() keeps is the JSON copy a later read gives back (the tuple becomes a list)
    expect = {"conv 1x64x56x56 f16": {"backend": "cuda", "ms": [0.1, 0.2], "cfg": [64, 2]},
              "agg": {"backend": "eager"}}
    assert c.entries() == expect and len(c) == 2 and "agg" in c and "nope" not in c
    fresh = _cache(tmp_path)
    assert fresh.entries() == expect and fresh.get("agg") == {"backend": "eager"}
    with open(c.path, encoding="utf-8") as f:
        doc = json.load(f)
    assert doc == {"format": pc.CACHE_FORMAT, "environment": FP, "entries": expect}
    # the caller's copies are its own
    got = fresh.get("agg")
    got["backend"] = "mutated"
    fresh.entries()["agg"]["backend"] = "mutated"
    assert fresh.get("agg") == {"backend": "eager"}
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(c.path), os.path.basename(c.lock_path)])


def test_entries_are_read_once_until_reload(tmp_path):
    a, b = _cache(tmp_path), _cache(tmp_path)
    assert a.entries() == {}
    b.update({"k": {"v": 1}})
    assert a.get("k") is None  # a read the file before b wrote it
    a.reload()
    assert a.get("k") == {"v": 1}


def test_update_keeps_what_another_writer_saved_since(tmp_path):
    a, b = _cache(tmp_path), _cache(tmp_path)
    a.update({"from_a": {"v": 1}})
    b.update({"from_b": {"v": 2}})  # b had not read a's entry: update re-reads the file under the lock
    a.update({"from_a2": {"v": 3}})
    expect = {"from_a": {"v": 1}, "from_b": {"v": 2}, "from_a2": {"v": 3}}
    assert a.entries() == expect and _cache(tmp_path).entries() == expect


def test_environments_have_their_own_files(tmp_path):
    other = dict(FP, device="Other GPU")
    a, b = _cache(tmp_path), _cache(tmp_path, other)
    assert a.path != b.path and a.lock_path != b.lock_path
    a.update({"k": {"v": "a"}})
    b.update({"k": {"v": "b"}})
    assert _cache(tmp_path).get("k") == {"v": "a"} and _cache(tmp_path, other).get("k") == {"v": "b"}
    a.clear()
    assert a.entries() == {} and not os.path.exists(a.path)
    assert _cache(tmp_path).entries() == {} and _cache(tmp_path, other).get("k") == {"v": "b"}


def test_clear_removes_leftover_temporary_files(tmp_path):
    c = _cache(tmp_path)
    c.update({"k": {}})
    leftover = os.path.join(str(tmp_path), f".{os.path.basename(c.path)}.abc123.tmp")  # a writer killed mid-write
    open(leftover, "w").close()
    c.clear()
    assert not os.path.exists(leftover) and not os.path.exists(c.path) and len(c) == 0
    _cache(tmp_path / "never_created").clear()  # nothing to clear: no error, no directory made
    assert not os.path.exists(tmp_path / "never_created")


def test_describe(tmp_path):
    c = _cache(tmp_path)
    c.update({"a": {}, "b": {}})
    text = c.describe()
    assert c.path in text and "entries: 2" in text and "device=Test GPU 80GB" in text and "torch=2.9.0" in text
    assert repr(c) == f"PlanCache({c.path!r})"


@pytest.mark.parametrize("entries, exc, match", [
    ([("k", {})], TypeError, "takes a dict of string key -> dict entry, got list"),
    ({1: {}}, TypeError, r"keys are strings, got 1 \(int\)"),
    ({"k": [1, 2]}, TypeError, r"entry 'k' is a list; entries are dicts"),
    ({"k": {"t": torch.zeros(1)}}, TypeError, r"entry 'k' cannot be stored as JSON .*Tensor"),
    ({"k": {"ms": float("inf")}}, ValueError, r"entry 'k' cannot be stored as JSON .*failed timing as None"),
    ({"k": {"ms": float("nan")}}, ValueError, "entry 'k' cannot be stored as JSON"),
])
def test_update_rejects_what_json_cannot_hold(tmp_path, entries, exc, match):
    c = _cache(tmp_path)
    c.update({"good": {"v": 1}})
    with pytest.raises(exc, match=match):
        c.update(entries)
    assert _cache(tmp_path).entries() == {"good": {"v": 1}}  # nothing of the bad update was written


def test_bad_fingerprint_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="fingerprint is a dict with string keys"):
        PlanCache(tmp_path, fingerprint=["gpu"])
    with pytest.raises(TypeError, match="fingerprint must hold JSON values"):
        PlanCache(tmp_path, fingerprint={"device": object()})


# ------------------------------------------------------------------------------------------ concurrency


def _tune_then_write(directory, fp, worker, n, go, outcome):
    """A spawned process: the tuner's tune-once pattern, then ``n`` updates of its own keys."""
    cache = PlanCache(directory, fingerprint=fp)
    read = cache._read_file

    def slow_read():
        # Widens the read-merge-write window of update(): without the lock, the two writers would lose each
        # other's entries within a few updates.
        entries = read()
        time.sleep(0.002)
        return entries

    cache._read_file = slow_read
    go.wait(120)
    with cache.lock():
        cache.reload()
        if cache.get("shared layer") is None:
            time.sleep(0.2)  # tuning
            cache.update({"shared layer": {"tuned_by": worker}})
            outcome.put((worker, "tuned"))
        else:
            outcome.put((worker, "reused"))
    for i in range(n):
        cache.update({f"w{worker}-{i}": {"worker": worker, "i": i}})


def test_two_processes_tune_once_and_never_lose_entries(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    go, outcome = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_tune_then_write, args=(str(tmp_path), FP, w, 20, go, outcome)) for w in range(2)]
    for p in procs:
        p.start()
    go.set()
    path = _cache(tmp_path).path
    reads = 0
    while any(p.is_alive() for p in procs):
        # a reader never sees half a file: every read while the two write is a whole, valid cache file
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            time.sleep(0.001)
            continue
        assert set(doc) == {"format", "environment", "entries"} and doc["environment"] == FP
        reads += 1
        time.sleep(0.001)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = sorted(outcome.get(timeout=10) for _ in procs)
    assert sorted(what for _, what in got) == ["reused", "tuned"]  # one tuned; the other waited and reused it
    tuner = next(w for w, what in got if what == "tuned")
    entries = _cache(tmp_path).entries()
    expect = {f"w{w}-{i}": {"worker": w, "i": i} for w in range(2) for i in range(20)}
    expect["shared layer"] = {"tuned_by": tuner}
    assert entries == expect
    assert reads > 0
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert leftovers == []


def _hold_lock(directory, fp, held, release, leaving):
    cache = PlanCache(directory, fingerprint=fp)
    with cache.lock():
        held.set()
        release.wait(120)
        leaving.set()


def test_a_process_holding_the_lock_makes_others_wait(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    held, release, leaving = ctx.Event(), ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), FP, held, release, leaving))
    p.start()
    try:
        assert held.wait(120), "the lock-holding process did not start"
        c = _cache(tmp_path)
        t = time.monotonic()
        with pytest.raises(PlanCacheLockTimeout) as e:
            with c.lock(timeout=0.2):
                pass
        assert time.monotonic() - t >= 0.2
        msg = str(e.value)
        assert c.lock_path in msg and f"process {p.pid} holds it" in msg and "longer timeout" in msg
        assert isinstance(e.value, TimeoutError)
        with pytest.raises(PlanCacheLockTimeout):
            with c.lock(timeout=0):
                pass
        # without a timeout, lock() waits as long as the holder holds it
        threading.Timer(0.5, release.set).start()
        t = time.monotonic()
        with c.lock():
            waited = time.monotonic() - t
            assert leaving.is_set()  # the holder was on its way out of its lock
            c.update({"after": {"v": 1}})
        assert waited >= 0.4
    finally:
        release.set()
        p.join(120)
    assert p.exitcode == 0
    assert _cache(tmp_path).get("after") == {"v": 1}


def test_lock_is_reentrant_in_one_thread(tmp_path):
    c, other = _cache(tmp_path), _cache(tmp_path)
    with c.lock(timeout=1):
        with c.lock(timeout=0):
            c.update({"inner": {}})  # update takes the lock too
        with other.lock(timeout=0):  # another object on the same file, same thread: no self-deadlock
            other.update({"other": {}})
        c.update({"outer": {}})
    assert sorted(_cache(tmp_path).entries()) == ["inner", "other", "outer"]
    with c.lock(timeout=0):  # fully released
        pass


@pytest.mark.parametrize("impl", ["default", "exclusive_file"])
def test_another_thread_waits_for_the_lock(tmp_path, monkeypatch, impl):
    if impl == "exclusive_file":
        monkeypatch.setattr(pc, "_LOCK_IMPL", pc._ExclusiveFileLock)
    c = _cache(tmp_path)
    events = []
    entered = threading.Event()

    def other_thread():
        with pytest.raises(PlanCacheLockTimeout) as e:
            with _cache(tmp_path).lock(timeout=0.1):
                pass
        events.append(("timed out", str(e.value)))
        entered.set()
        with _cache(tmp_path).lock():
            events.append(("entered", None))

    with c.lock():
        th = threading.Thread(target=other_thread)
        th.start()
        assert entered.wait(30)
        time.sleep(0.2)
        assert [what for what, _ in events] == ["timed out"]  # still waiting for us
        events.append(("released", None))
    th.join(30)
    assert [what for what, _ in events] == ["timed out", "released", "entered"]
    msg = events[0][1]
    assert f"process {os.getpid()} holds it" in msg
    if impl == "exclusive_file":
        assert "delete it" in msg  # its lock file outlives a crashed holder
        assert not os.path.exists(c.lock_path)  # released = removed
    else:
        assert "delete it" not in msg


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_does_not_inherit_the_lock(tmp_path):
    c = _cache(tmp_path)
    with c.lock():
        pid = os.fork()
        if pid == 0:  # the child: it must wait for the parent's lock, not re-enter it
            code = 1
            try:
                with _cache(tmp_path).lock(timeout=0.05):
                    pass
            except PlanCacheLockTimeout:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_bad_lock_timeout(tmp_path):
    with pytest.raises(ValueError, match=r"timeout=-1\): the timeout is seconds >= 0"):
        with _cache(tmp_path).lock(timeout=-1):
            pass


# --------------------------------------------------------------------------------------- corrupt files


def _truncated(fp):
    text = json.dumps(_valid_doc(fp=fp))
    return text[: len(text) // 2].encode()


CORRUPT = {
    "garbage": (lambda fp: b"\x00\xff\xfe garbage \x80", "it is not UTF-8 text"),
    "not json": (lambda fp: b"{plans: yes}", "it is not valid JSON"),
    "truncated": (_truncated, "it is not valid JSON"),
    "empty": (lambda fp: b"", "it is not valid JSON"),
    "list": (lambda fp: b"[1, 2]", "its top level is a JSON list, not an object"),
    "missing keys": (lambda fp: json.dumps({"format": pc.CACHE_FORMAT}).encode(),
                     "it lacks the key(s) environment, entries"),
    "wrong format": (lambda fp: json.dumps(dict(_valid_doc(fp=fp), format=pc.CACHE_FORMAT + 1)).encode(),
                     f"it has cache format {pc.CACHE_FORMAT + 1} and this dla_fast reads format {pc.CACHE_FORMAT}"),
    "entries not an object": (lambda fp: json.dumps(dict(_valid_doc(fp=fp), entries=[1])).encode(),
                              "its entries are a JSON list, not an object"),
    "entry not an object": (lambda fp: json.dumps(_valid_doc({"k": "cuda"}, fp=fp)).encode(),
                            "its entry 'k' is a JSON str, not an object"),
    "environment not an object": (lambda fp: json.dumps(dict(_valid_doc(fp=fp), environment="gpu")).encode(),
                                  "its environment is a JSON str, not an object"),
    "stale": (lambda fp: json.dumps(_valid_doc(fp=dict(fp, torch="2.1.0", triton=None))).encode(),
              "it is stale, written for another environment (torch: '2.1.0' in the file, '2.9.0' here; "
              "triton: None in the file, '3.5.0' here)"),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_or_stale_file_warns_once_reads_empty_and_is_rewritten(tmp_path, kind):
    make, reason = CORRUPT[kind]
    c = _cache(tmp_path)
    with open(c.path, "wb") as f:
        f.write(make(FP))
    with _Recorded() as rec:
        assert c.entries() == {} and c.get("old") is None
        c.reload()  # the tuner's reload() + update() see the same problem: still one warning
        c.update({"new": {"v": 1}})
    assert len(rec.messages) == 1, rec.messages
    msg = rec.messages[0]
    assert f"ignoring {c.path}: {reason}" in msg and "the next update replaces it" in msg
    first = next(w for w in rec.all if issubclass(w.category, PlanCacheWarning))
    assert first.filename == __file__  # the warning points at the caller's line
    with _Recorded() as rec:
        fresh = _cache(tmp_path)
        assert fresh.entries() == {"new": {"v": 1}}  # the clean rewrite
    assert rec.messages == []
    with open(c.path, encoding="utf-8") as f:
        assert json.load(f)["environment"] == FP


def test_unreadable_file_warns_and_goes_memory_only(tmp_path):
    c = _cache(tmp_path)
    os.mkdir(c.path)  # a directory where the file should be: neither readable nor replaceable
    with _Recorded() as rec:
        assert c.entries() == {}
        c.update({"k": {"v": 1}})
        c.update({"k2": {"v": 2}})
    assert len(rec.messages) == 2, rec.messages
    assert rec.messages[0].startswith(f"dla_fast plan cache: cannot read {c.path}")
    assert f"cannot write {c.path}" in rec.messages[1] and "in memory only" in rec.messages[1]
    assert c.memory_only and c.entries() == {"k": {"v": 1}, "k2": {"v": 2}}


def test_unwritable_directory_warns_once_and_works_in_memory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    c = _cache(blocker / "cache")  # cannot be created, even by root
    with _Recorded() as rec:
        assert c.entries() == {}
        c.update({"k": {"v": 1}})
        with c.lock(timeout=0):  # nothing on disk to guard: no lock, no error
            c.update({"k2": {"v": 2}})
        c.reload()  # the in-memory entries survive a reload
        c.clear()
        c.update({"k3": {"v": 3}})
    assert len(rec.messages) == 1, rec.messages
    msg = rec.messages[0]
    assert c.lock_path in msg and "kept in memory only" in msg and pc.ENV_VAR in msg
    assert c.memory_only and c.entries() == {"k3": {"v": 3}}
    assert "in memory only" in c.describe()


def test_memory_only_keeps_reading_an_existing_file(tmp_path, monkeypatch):
    c = _cache(tmp_path)
    c.update({"tuned": {"v": 1}})
    reader = _cache(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pc.tempfile, "mkstemp", refuse)  # a read-only cache directory, even for root
    with _Recorded() as rec:
        reader.update({"new": {"v": 2}})
        reader.reload()
    assert len(rec.messages) == 1 and "Permission denied" in rec.messages[0]
    assert reader.entries() == {"tuned": {"v": 1}, "new": {"v": 2}}
    assert _cache(tmp_path).entries() == {"tuned": {"v": 1}}  # the file is untouched


def test_read_only_cache_serves_its_plans_without_a_word(tmp_path, monkeypatch):
    _cache(tmp_path).update({"tuned": {"v": 1}})

    def read_only(path):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pc, "_LOCK_IMPL", read_only)
    c = _cache(tmp_path)
    with _Recorded() as rec:
        with c.lock(timeout=0):  # the tuner's pattern: nothing is missing, nothing is tuned
            c.reload()
            assert c.get("tuned") == {"v": 1}
    assert rec.messages == [] and c.memory_only
    with _Recorded() as rec:
        c.update({"new": {"v": 2}})  # only now is something lost
        c.clear()
    assert len(rec.messages) == 2, rec.messages
    assert "cannot create the lock file" in rec.messages[0] and "Read-only file system" in rec.messages[0]
    assert rec.messages[1].startswith(f"dla_fast plan cache: cannot delete {c.path}")
    assert c.entries() == {}
    c.reload()
    assert c.entries() == {"tuned": {"v": 1}}  # still on disk


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    c = _cache(tmp_path)
    c.update({"old": {"v": 1}})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pc.os, "fsync", full_disk)
    with _Recorded() as rec:
        c.update({"new": {"v": 2}})
    monkeypatch.undo()
    assert len(rec.messages) == 1 and "No space left on device" in rec.messages[0]
    assert _cache(tmp_path).entries() == {"old": {"v": 1}}
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------- location, fingerprint


def test_cache_dir_env_var_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("DLA_FAST_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pc.default_cache_dir() == str(tmp_path / "mine")
    c = PlanCache(fingerprint=FP)
    c.update({"k": {}})
    assert c.path.startswith(str(tmp_path / "mine") + os.sep) and os.path.isfile(c.path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLA_FAST_CACHE_DIR", "rel")
    assert pc.default_cache_dir() == str(tmp_path / "rel")  # made absolute: a later chdir does not move it


def test_default_cache_dir_fallbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("DLA_FAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pc.default_cache_dir() == str(tmp_path / "xdg" / "dla_fast")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says to ignore it
    assert pc.default_cache_dir() == str(tmp_path / "home" / ".cache" / "dla_fast")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("DLA_FAST_CACHE_DIR", "")  # empty counts as unset
    assert pc.default_cache_dir() == str(tmp_path / "home" / ".cache" / "dla_fast")
    monkeypatch.setattr(pc, "_on_windows", lambda: True)
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "appdata"))
    assert pc.default_cache_dir() == str(tmp_path / "appdata" / "dla_fast")


def test_cpu_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the default of a machine without a GPU
    fp = pc.environment_fingerprint()
    assert set(fp) == {"format", "device", "capability", "torch", "cuda", "triton", "dla_fast"}
    assert fp["capability"] == "cpu" and fp["device"] and fp["format"] == pc.CACHE_FORMAT
    assert fp["torch"] == torch.__version__ and fp["cuda"] == torch.version.cuda
    assert fp["dla_fast"] == dla_fast.__version__
    assert pc.environment_fingerprint("cpu") == fp
    assert pc.fingerprint_id(fp) == pc.fingerprint_id(dict(reversed(list(fp.items()))))  # order-free
    assert len(pc.fingerprint_id(fp)) == 16 and int(pc.fingerprint_id(fp), 16) >= 0
    assert PlanCache(tmp_path).fingerprint == fp  # the default fingerprint is this environment's


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA A100-SXM4-80GB"}
    caps = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: names[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: caps[torch.device(d).index])


def test_cuda_fingerprint(fake_gpu):
    fp = pc.environment_fingerprint()
    assert (fp["device"], fp["capability"]) == ("NVIDIA H100 80GB HBM3", "9.0")
    assert pc.environment_fingerprint("cuda") == fp == pc.environment_fingerprint(0)
    fp1 = pc.environment_fingerprint(torch.device("cuda", 1))
    assert (fp1["device"], fp1["capability"]) == ("NVIDIA A100-SXM4-80GB", "8.0")
    assert pc.environment_fingerprint("cuda:1") == fp1 and pc.fingerprint_id(fp1) != pc.fingerprint_id(fp)


# ids spelled out: a test whose keywords include a bare "cuda" is taken for a GPU test by conftest.py
@pytest.mark.parametrize("what", ["torch", "cuda", "triton", "dla_fast", "format", "device", "capability"],
                         ids=lambda w: f"{w}-changes")
def test_fingerprint_changes_with_every_version(fake_gpu, monkeypatch, what):
    before = pc.environment_fingerprint()
    assert pc.environment_fingerprint() == before  # stable
    change = {
        "torch": lambda: monkeypatch.setattr(torch, "__version__", "99.0"),
        "cuda": lambda: monkeypatch.setattr(torch.version, "cuda", "99.9"),
        "triton": lambda: monkeypatch.setattr(pc, "_triton_version", lambda: "99.1"),
        "dla_fast": lambda: monkeypatch.setattr(dla_fast, "__version__", "99.2"),
        "format": lambda: monkeypatch.setattr(pc, "CACHE_FORMAT", pc.CACHE_FORMAT + 1),
        "device": lambda: monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H200"),
        "capability": lambda: monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 1)),
    }
    change[what]()
    after = pc.environment_fingerprint()
    assert [k for k in before if before[k] != after[k]] == [what]
    assert pc.fingerprint_id(after) != pc.fingerprint_id(before)


def test_a_version_change_starts_a_new_cache(tmp_path, fake_gpu, monkeypatch):
    old = PlanCache(tmp_path)
    old.update({"k": {"backend": "cuda"}})
    monkeypatch.setattr(torch, "__version__", "99.0")
    with _Recorded() as rec:
        new = PlanCache(tmp_path)
        assert new.path != old.path and new.entries() == {}
    assert rec.messages == []  # a new environment is not a problem: it just has no plans yet
    assert PlanCache(tmp_path, fingerprint=old.fingerprint).get("k") == {"backend": "cuda"}


def test_fingerprint_of_a_bad_device_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        pc.environment_fingerprint("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device cuda:0 was asked for but CUDA is not available"):
        pc.environment_fingerprint("cuda:0")


def test_triton_version_without_triton(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert pc._triton_version() is None
