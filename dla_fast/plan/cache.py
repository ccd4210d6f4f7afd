"""The on-disk plan cache: tuned per-layer choices, filed under the environment they were measured in.

One JSON file per environment fingerprint, ``plans-<id>.json`` in the cache directory::

    {"format": 1, "environment": {"device": ..., "torch": ..., ...}, "entries": {"<key>": {...}, ...}}

What a key and an entry mean is the planner's business; this module stores string keys and JSON-able dicts.

* Where: :func:`default_cache_dir` (``$DLA_FAST_CACHE_DIR``, else the user's cache directory).
* Which file: the fingerprint (:func:`environment_fingerprint`) holds the device, its compute capability and the
  torch / CUDA / triton / dla_fast versions, so an upgrade or another GPU gets a fresh file instead of timings
  measured elsewhere.
* Concurrency: :meth:`PlanCache.update` holds an inter-process lock while it re-reads, merges and atomically
  replaces the file, so concurrent writers keep each other's entries and a reader never sees half a file.
  :meth:`PlanCache.lock` exposes that lock so that of N processes starting together one tunes and the others
  wait, then reuse its results.
* Failures never reach the caller: a corrupt or stale file is ignored with one warning (and replaced at the next
  update); in an unwritable directory the PlanCache keeps its updates in memory, with one warning at the first
  update that cannot be saved.

Only the standard library is imported at module level; torch and dla_fast are imported when a fingerprint is
computed.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, Iterator, Mapping, Optional, Union

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

# 3: a call's entry names the fastest of three regimes (planner.REGIMES); format 2 held a two-way "paced" verdict
# and format 1 one timed against other plans. Older files are not read (a new file per fingerprint).
CACHE_FORMAT = 3
ENV_VAR = "DLA_FAST_CACHE_DIR"

PathLike = Union[str, "os.PathLike[str]"]


class PlanCacheWarning(UserWarning):
    """A plan-cache file was ignored, or the cache cannot be saved; tuning results then stay in memory."""


class PlanCacheLockTimeout(TimeoutError):
    """The plan cache's inter-process lock did not come free within the timeout."""


# --------------------------------------------------------------------------------------------- fingerprint


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown cpu"


def _triton_version() -> Optional[str]:
    """The installed triton's version, or None. Read from the package metadata rather than by importing triton:
    an import here would fix triton's mode before a caller has set TRITON_INTERPRET."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:  # a source checkout on sys.path has no metadata
        import triton
        return str(getattr(triton, "__version__", None))
    except Exception:
        return None


def _resolve_device(device):
    import torch

    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    if isinstance(device, int):
        device = torch.device("cuda", device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"environment_fingerprint: {device!r} is not a torch device ({e}); pass e.g. 'cuda', "
                         "'cuda:1', a torch.device or None for the current one") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"environment_fingerprint: device {dev} was asked for but CUDA is not available "
                               "here; fingerprint the device that will run the model (None picks it)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def environment_fingerprint(device=None) -> Dict[str, Any]:
    """What makes a tuned plan valid: the device's name and compute capability (``"9.0"``; ``"cpu"`` on the
    CPU), the torch, CUDA (``torch.version.cuda``), triton (None when absent) and dla_fast versions, and the cache
    format. ``device``: a torch device, a string like ``"cuda:1"``, a CUDA index, or None for the current CUDA
    device (the CPU when there is no GPU)."""
    import torch

    import dla_fast

    dev = _resolve_device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        major, minor = torch.cuda.get_device_capability(dev)
        capability = f"{major}.{minor}"
    elif dev.type == "cpu":
        name, capability = _cpu_name(), "cpu"
    else:
        name, capability = dev.type, dev.type
    return {"format": CACHE_FORMAT, "device": str(name), "capability": capability, "torch": str(torch.__version__),
            "cuda": torch.version.cuda, "triton": _triton_version(), "dla_fast": str(dla_fast.__version__)}


def _normalised_fingerprint(fp) -> Dict[str, Any]:
    if not isinstance(fp, Mapping) or not all(isinstance(k, str) for k in fp):
        raise TypeError(f"a plan-cache fingerprint is a dict with string keys (see environment_fingerprint()), "
                        f"got {type(fp).__name__}")
    try:
        # the JSON round trip makes it compare equal to the copy read back from a file
        return json.loads(json.dumps(dict(fp), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"a plan-cache fingerprint must hold JSON values (strings, numbers, None): {e}") from None


def fingerprint_id(fp: Mapping[str, Any]) -> str:
    """A short hash of the fingerprint, stable across processes and machines; it names the cache file."""
    blob = json.dumps(_normalised_fingerprint(fp), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ location


def _on_windows() -> bool:
    return os.name == "nt"


def default_cache_dir() -> str:
    """``$DLA_FAST_CACHE_DIR`` when set; else ``%LOCALAPPDATA%\\dla_fast`` on Windows; else
    ``$XDG_CACHE_HOME/dla_fast`` (an absolute XDG_CACHE_HOME only, as the XDG spec says); else
    ``~/.cache/dla_fast``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    if _on_windows():
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dla_fast")


# ---------------------------------------------------------------------------------------- inter-process lock


def _read_holder(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return int(f.read(32).strip())
    except (OSError, ValueError):
        return None


class _FdLock:
    """A lock on an open lock file, held by the OS for this process: the OS drops it when its holder exits or
    dies, so a crashed tuner never leaves the cache locked. Subclasses lock and unlock the descriptor."""

    stale_hint = ""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def _lock(self) -> None:
        raise NotImplementedError

    def _unlock(self) -> None:
        raise NotImplementedError

    def try_acquire(self) -> bool:
        try:
            self._lock()
        except OSError:  # held elsewhere: EWOULDBLOCK, or EACCES on some systems
            return False
        return True

    def release(self) -> None:
        try:
            self._unlock()
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _FlockLock(_FdLock):
    """``fcntl.flock`` on the lock file (POSIX); the file keeps the last holder's pid for the timeout message."""

    def _lock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):  # the pid only serves the timeout message
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def _unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class _MsvcrtLock(_FdLock):
    """``msvcrt.locking`` on the lock file's first byte (Windows)."""

    def _lock(self) -> None:
        os.lseek(self.fd, 0, os.SEEK_SET)
        msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)

    def _unlock(self) -> None:
        os.lseek(self.fd, 0, os.SEEK_SET)
        msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)


class _ExclusiveFileLock:
    """Where neither flock nor msvcrt exists: the lock is the lock file's existence (created with O_EXCL). A
    holder that dies leaves the file behind, hence the hint in the timeout message."""

    stale_hint = "; if no dla_fast process is running, the lock file is left over from a crash: delete it"

    def __init__(self, path: str):
        self.path = path

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError:
            pass
        finally:
            os.close(fd)
        return True

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        pass


_LOCK_IMPL = _FlockLock if fcntl is not None else _MsvcrtLock if msvcrt is not None else _ExclusiveFileLock

# Lock files this process holds: path -> [thread id, depth]. A second OS-level lock on a file the process already
# holds would block forever (flock treats two open() of one file as two owners), so the holding thread re-enters
# instead, and other threads take the OS lock and wait like another process would.
_held: Dict[str, list] = {}
_held_guard = threading.Lock()


def _forget_held_locks() -> None:
    # A forked child does not own its parent's locks (nor a guard some other parent thread held at the fork).
    global _held_guard
    _held.clear()
    _held_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_locks)


# ---------------------------------------------------------------------------------------------- file format


def _parse(raw: bytes, fingerprint: Dict[str, Any]):
    """(problem, entries): problem is None for a valid file of this environment, else why it is ignored."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "it is not UTF-8 text", {}
    except ValueError as e:
        return f"it is not valid JSON ({e})", {}
    if not isinstance(doc, dict):
        return f"its top level is a JSON {type(doc).__name__}, not an object", {}
    missing = [k for k in ("format", "environment", "entries") if k not in doc]
    if missing:
        return f"it lacks the key(s) {', '.join(missing)}", {}
    if doc["format"] != CACHE_FORMAT:
        return f"it has cache format {doc['format']!r} and this dla_fast reads format {CACHE_FORMAT}", {}
    env = doc["environment"]
    if env != fingerprint:
        if not isinstance(env, dict):
            return f"its environment is a JSON {type(env).__name__}, not an object", {}
        diff = [f"{k}: {env.get(k)!r} in the file, {fingerprint.get(k)!r} here"
                for k in sorted(set(env) | set(fingerprint)) if env.get(k) != fingerprint.get(k)]
        return f"it is stale, written for another environment ({'; '.join(diff)})", {}
    entries = doc["entries"]
    if not isinstance(entries, dict):
        return f"its entries are a JSON {type(entries).__name__}, not an object", {}
    for k, v in entries.items():
        if not isinstance(v, dict):
            return f"its entry {k!r} is a JSON {type(v).__name__}, not an object", {}
    return None, entries


def _checked_entries(entries) -> Dict[str, dict]:
    if not isinstance(entries, Mapping):
        raise TypeError(f"PlanCache.update() takes a dict of string key -> dict entry, got {type(entries).__name__}")
    out = {}
    for k, v in entries.items():
        if not isinstance(k, str):
            raise TypeError(f"plan-cache keys are strings, got {k!r} ({type(k).__name__}); build the key as a "
                            "string (e.g. with json.dumps) before storing")
        if not isinstance(v, Mapping):
            raise TypeError(f"plan-cache entry {k!r} is a {type(v).__name__}; entries are dicts of JSON values")
        try:
            # a JSON copy: what update() keeps in memory is exactly what a later read of the file returns
            out[k] = json.loads(json.dumps(dict(v), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise type(e)(f"plan-cache entry {k!r} cannot be stored as JSON ({e}); use strings, ints, finite "
                          "floats, bools, None, lists and dicts (store a failed timing as None, not inf)") from None
    return out


def _replace(src: str, dst: str) -> None:
    # Windows refuses to replace a file that another process has open for reading: retry briefly.
    for attempt in range(10):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not _on_windows() or attempt == 9:
                raise
            time.sleep(0.01 * (attempt + 1))


def _fsync_dir(directory: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    if _on_windows():
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside this module (and contextlib, which runs lock()), so
    that a warning points at the caller's line whichever path inside the cache raised it."""
    level, f = 1, sys._getframe(1)
    while f is not None and f.f_code.co_filename in (__file__, contextlib.__file__):
        f = f.f_back
        level += 1
    return level


# ------------------------------------------------------------------------------------------------ the cache


class PlanCache:
    """The tuned plans of one environment, in ``<directory>/plans-<fingerprint id>.json``.

    ``directory``: default :func:`default_cache_dir`. ``fingerprint``: default :func:`environment_fingerprint`
    of the current device; tests and tools may pass their own dict of JSON values.

    Reads are lazy and cached: the file is read at the first :meth:`get` / :meth:`entries` and again only on
    :meth:`reload` (or inside :meth:`update`, which merges into what is on disk at that moment). The tuner's
    pattern, with which N processes starting together tune once::

        with cache.lock():          # the others wait here
            cache.reload()          # and then see what the first one tuned
            missing = [k for k in keys if cache.get(k) is None]
            cache.update(tune(missing))
    """

    def __init__(self, directory: Optional[PathLike] = None, fingerprint: Optional[Mapping[str, Any]] = None):
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory))) if directory is not None \
            else default_cache_dir()
        self.fingerprint = _normalised_fingerprint(environment_fingerprint() if fingerprint is None
                                                   else fingerprint)
        self.id = fingerprint_id(self.fingerprint)
        self.path = os.path.join(self.directory, f"plans-{self.id}.json")
        self.lock_path = os.path.join(self.directory, f"plans-{self.id}.lock")
        self._entries: Optional[Dict[str, dict]] = None
        self._pending: Dict[str, dict] = {}  # updates that could not be written (in-memory mode)
        self._memory_only: Optional[str] = None  # why, once the directory proved unwritable
        self._warned: set = set()
        self._guard = threading.Lock()  # in-memory state only; never held while waiting for the file lock

    # ------------------------------------------------------------------ reading

    def get(self, key: str) -> Optional[dict]:
        """The entry stored under ``key`` (a copy), or None."""
        v = self._loaded().get(key)
        return None if v is None else copy.deepcopy(v)

    def entries(self) -> Dict[str, dict]:
        """All entries (a copy)."""
        return copy.deepcopy(self._loaded())

    def reload(self) -> None:
        """Read the file again now (another process may have added entries since)."""
        with self._guard:
            self._entries = None
        self._loaded()

    def __len__(self) -> int:
        return len(self._loaded())

    def __contains__(self, key: str) -> bool:
        return key in self._loaded()

    @property
    def memory_only(self) -> bool:
        """True once the directory proved unwritable: updates then last only as long as this object."""
        return self._memory_only is not None

    # ------------------------------------------------------------------ writing

    def update(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Add or replace entries, and save them: under the lock, re-read the file (keeping what other processes
        wrote), merge, write a temporary file beside it, fsync, and atomically replace the file with it.

        Keys must be strings and entries dicts of JSON values with finite floats (TypeError / ValueError
        otherwise, before anything is written). A corrupt or stale file is replaced; an unwritable directory
        gives one warning and the entries are kept in memory."""
        new = _checked_entries(entries)
        if not new:
            return
        if self._memory_only is None:
            try:
                with self.lock():
                    if self._memory_only is None:  # lock() itself may have found the directory unwritable
                        merged = self._read_file()
                        merged.update(new)
                        self._write(merged)
                        with self._guard:
                            self._entries = {**merged, **self._pending}
                        return
            except PlanCacheLockTimeout:
                raise
            except OSError as e:
                self._go_memory_only(f"cannot write {self.path} ({e})")
        self._warn(f"{self._memory_only}; tuning results are kept in memory only, for this process. Point "
                   f"{ENV_VAR} at a writable directory to keep them")
        with self._guard:
            self._pending.update(new)
        current = self._loaded()
        with self._guard:
            current.update(new)

    def clear(self) -> None:
        """Forget every entry of this environment and delete its file (other environments' files stay)."""
        with self._guard:
            self._pending.clear()
        if os.path.isdir(self.directory):
            try:
                with self.lock():
                    if self._memory_only is not None and os.path.exists(self.path):
                        raise PermissionError(self._memory_only)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    # temporary files of writers killed mid-write (no live writer has one: we hold the lock)
                    for tmp in glob.glob(os.path.join(glob.escape(self.directory),
                                                      f".{os.path.basename(self.path)}.*.tmp")):
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
            except PlanCacheLockTimeout:
                raise
            except OSError as e:
                self._warn(f"cannot delete {self.path} ({e}); this PlanCache forgets its entries, but a reload() "
                           "or another process still finds them")
        with self._guard:
            self._entries = {}

    @contextlib.contextmanager
    def lock(self, timeout: Optional[float] = None) -> Iterator["PlanCache"]:
        """An exclusive inter-process lock on this cache file, for "tune once, the others wait".

        ``timeout``: seconds to wait (None: as long as it takes; 0: one try); past it
        :class:`PlanCacheLockTimeout` names the lock file and its holder's pid.

        Within one process the lock is re-entrant per thread, whichever PlanCache object takes it (so
        :meth:`update` inside ``with cache.lock():`` works); another thread of the process waits like another
        process. In-memory mode (unwritable directory) has nothing on disk to guard and takes no lock.

        The lock is advisory: it orders dla_fast processes (flock on a sibling ``.lock`` file on POSIX, msvcrt on
        Windows, an O_EXCL lock file elsewhere); it does not stop others from editing the file."""
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"PlanCache.lock(timeout={timeout!r}): the timeout is seconds >= 0, or None to wait "
                             "as long as it takes")
        me = threading.get_ident()
        with _held_guard:
            rec = _held.get(self.lock_path)
            reenter = rec is not None and rec[0] == me
            if reenter:
                rec[1] += 1
        if reenter:
            try:
                yield self
            finally:
                with _held_guard:
                    rec[1] -= 1
            return
        if self._memory_only is not None:
            yield self
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            impl = _LOCK_IMPL(self.lock_path)
        except OSError as e:
            # A read-only directory can still serve plans tuned earlier: say nothing until an update is lost.
            self._go_memory_only(f"cannot create the lock file {self.lock_path} ({e})")
            yield self
            return
        try:
            acquired = self._acquire(impl, timeout)
        except BaseException:
            impl.close()
            raise
        if not acquired:
            impl.close()
            holder = _read_holder(self.lock_path)
            who = f"process {holder}" if holder is not None else "another process"
            raise PlanCacheLockTimeout(
                f"could not take the dla_fast plan-cache lock {self.lock_path} within {timeout:g} s: {who} holds "
                f"it (tuning, or writing {os.path.basename(self.path)}). Wait for it or pass a longer timeout "
                f"(timeout=None waits as long as it takes){impl.stale_hint}")
        with _held_guard:
            _held[self.lock_path] = [me, 1]
        try:
            yield self
        finally:
            with _held_guard:
                del _held[self.lock_path]
            impl.release()

    @staticmethod
    def _acquire(impl, timeout: Optional[float]) -> bool:
        # Polling rather than a blocking call: the same loop serves every lock kind and honours Ctrl-C at once.
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while not impl.try_acquire():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            time.sleep(delay if deadline is None else min(delay, deadline - now))
            delay = min(delay * 2, 0.05)
        return True

    # ------------------------------------------------------------------ description

    def describe(self) -> str:
        """Where the cache is, how many entries it holds, and the environment it belongs to."""
        env = ", ".join(f"{k}={v}" for k, v in self.fingerprint.items())
        lines = [f"plan cache: {self.path}", f"  entries: {len(self._loaded())}", f"  environment: {env}"]
        if self._memory_only is not None:
            lines.append(f"  in memory only: {self._memory_only}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PlanCache({self.path!r})"

    # ------------------------------------------------------------------ internals

    def _loaded(self) -> Dict[str, dict]:
        entries = self._entries
        if entries is None:
            entries = self._read_file()
            with self._guard:
                entries.update(self._pending)
                self._entries = entries
        return entries

    def _warn(self, msg: str) -> None:
        # once per problem and object: the tuner's reload() + update() must not repeat a warning per step
        if msg in self._warned:
            return
        self._warned.add(msg)
        warnings.warn(f"dla_fast plan cache: {msg}", PlanCacheWarning, stacklevel=_caller_level())

    def _read_file(self) -> Dict[str, dict]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):  # no file yet (or no directory: the writer says so)
            return {}
        except OSError as e:
            self._warn(f"cannot read {self.path} ({e}); treating the cache as empty")
            return {}
        problem, entries = _parse(raw, self.fingerprint)
        if problem is not None:
            then = "the next update replaces it" if self._memory_only is None else "it is left as it is"
            self._warn(f"ignoring {self.path}: {problem}. The cache starts empty and {then}")
            return {}
        return entries

    def _write(self, entries: Dict[str, dict]) -> None:
        doc = {"format": CACHE_FORMAT, "environment": self.fingerprint, "entries": entries}
        data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(OSError):
                # mkstemp makes it 0600; a cache shared through DLA_FAST_CACHE_DIR is read by other users too
                os.chmod(tmp, 0o644)
            _replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.directory)

    def _go_memory_only(self, why: str) -> None:
        if self._memory_only is None:
            self._memory_only = why
