"""Single-writer guard for OUT on an object store: a lease object instead of flock.

`OUT/.lease.json` holds the writer's host, pid, start time and expiry. It is created with a
conditional PUT (`If-None-Match: *`), so of two runs starting together exactly one creates it;
the holder renews it from a background thread (every third of its lifetime) and deletes it at
the end. A run that finds a live lease is refused with a message naming the holder.

A lease whose expiry has passed (its run died without releasing it), or whose holder is a dead
pid on this very machine, may be taken over. Taking over must have exactly one winner, and
SeaweedFS 4.48 does not apply `If-Match` atomically (measured: two concurrent PUTs with the same
If-Match ETag both succeed about one time in three), so the takeover does not rely on it:
the taker first creates a claim object named after the stale lease's content hash with
`If-None-Match: *` (atomic on SeaweedFS and S3; only one taker can create it), re-reads the
lease to check it is still the stale one, then replaces it (with `If-Match` too, where the
backend supports it), reads it back and deletes the claim. A holder that could not renew
before its own expiry treats the lease as lost and refuses further writes (`check()`), so two
writers never both believe they hold OUT.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from engine.store.errors import RunLockedError, StoreError, one_line
from engine.store.manifest import utc_now

log = logging.getLogger(__name__)

LEASE = ".lease.json"
DEFAULT_SECONDS = 60.0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def host_key() -> str:
    """This machine and pid namespace: a pid is only comparable when they match."""
    parts = [socket.gethostname()]
    for p in ("/proc/sys/kernel/random/boot_id",):
        try:
            parts.append(open(p).read().strip())
        except OSError:
            pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return ":".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _precondition_failed(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in {"PreconditionFailed", "ConditionalRequestConflict", "412"} or "pre-condition" in str(exc).lower()


class Lease:
    def __init__(self, store, what: str, seconds: float | None = None):
        self.store = store
        self.fs = store.fs
        self.what = what
        self.seconds = float(seconds or os.environ.get("FLD_LEASE_SECONDS") or DEFAULT_SECONDS)
        self.token = uuid.uuid4().hex
        self.path = store._p(LEASE)
        self.since = time.time()
        self.expires = 0.0
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ objects
    def _payload(self) -> bytes:
        now = time.time()
        self.expires = now + self.seconds
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                           "since": _iso(self.since), "renewed": _iso(now), "expires": _iso(self.expires),
                           "expires_at": self.expires, "host_key": host_key()}).encode()

    def _create(self, path: str, data: bytes) -> bool:
        """PUT only if absent; False when it exists."""
        try:
            self.fs.pipe_file(path, data, mode="create")
        except Exception as exc:  # noqa: BLE001 - classified below
            if _precondition_failed(exc):
                return False
            raise StoreError(f"cannot create {self.store.url(LEASE)}: {one_line(exc)}") from None
        finally:
            self.fs.invalidate_cache(path)
        return True

    def _replace(self, data: bytes, etag: str | None) -> bool:
        kwargs = {"IfMatch": etag} if etag and hasattr(self.fs, "call_s3") else {}
        try:
            self.fs.pipe_file(self.path, data, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True

    def _read(self) -> tuple[bytes, dict, str | None] | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None
        try:
            content = json.loads(data)
        except ValueError:
            content = {}
        return data, content, info.get("ETag") or info.get("etag")

    def _confirm(self) -> bool:
        """Read back: is the lease ours (a backend that ignored the condition shows up here)."""
        cur = self._read()
        if cur is None or cur[1].get("token") != self.token:
            return False
        self.etag = cur[2]
        return True

    # ------------------------------------------------------------ protocol
    def acquire(self) -> None:
        for _ in range(3):  # the holder may release between our create and read
            if self._create(self.path, self._payload()):
                if not self._confirm():
                    raise RunLockedError(f"{self.store.out}: another run took the lease at the same moment; retry")
                self._start()
                return
            cur = self._read()
            if cur is None:
                continue
            data, holder, etag = cur
            stale = self._stale(holder)
            if stale is None:
                raise RunLockedError(self._held_message(holder))
            self._take_over(data, etag, holder, stale)
            self._start()
            return
        raise RunLockedError(f"{self.store.out}: could not acquire the lease {self.store.url(LEASE)}; retry")

    def _stale(self, holder: dict) -> str | None:
        """Why the lease may be taken over, or None while its holder may still be running."""
        if not holder.get("token"):
            return "unreadable lease"
        if float(holder.get("expires_at", 0)) < time.time():
            return f"expired at {holder.get('expires')}"
        pid = holder.get("pid")
        if holder.get("host_key") == host_key() and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            return f"pid {pid} on this host has exited"
        return None

    def _held_message(self, holder: dict) -> str:
        return (f"{self.store.out} is being written by another run: pid {holder.get('pid')} on {holder.get('host')} "
                f"({holder.get('what')}), since {holder.get('since')}, lease expires {holder.get('expires')} unless renewed; "
                "wait for it to finish or stop it (a dead run's lease is taken over once it expires)")

    def _take_over(self, data: bytes, etag: str | None, holder: dict, why: str) -> None:
        claim = self.store._p(f".lease-takeover-{hashlib.sha256(data).hexdigest()[:24]}")
        if not self._create(claim, self.token.encode()):
            raise RunLockedError(f"{self.store.out}: another run is taking over the stale lease of pid "
                                 f"{holder.get('pid')} on {holder.get('host')} right now")
        try:
            cur = self._read()
            if cur is None or cur[0] != data:  # changed since we decided: someone else won earlier
                raise RunLockedError(self._held_message(cur[1] if cur else holder))
            if not self._replace(self._payload(), etag) or not self._confirm():
                raise RunLockedError(f"{self.store.out}: lost the race to take over the stale lease; retry")
            log.warning("took over the lease of %s from pid %s on %s (%s)", self.store.out, holder.get("pid"),
                        holder.get("host"), why)
        finally:
            try:
                self.fs.rm(claim)
            except FileNotFoundError:
                pass

    def renew(self) -> None:
        if self.lost:
            return
        if time.time() >= self.expires:
            self.lost = f"the lease expired at {_iso(self.expires)} before it could be renewed"
            return
        expires_before = self.expires
        try:
            ok = self._replace(self._payload(), self.etag) and self._confirm()
        except Exception as exc:  # noqa: BLE001 - a transient error: retried at the next tick, lost at expiry
            self.expires = expires_before
            log.warning("could not renew the lease of %s: %s", self.store.out, one_line(exc))
            return
        if not ok:
            self.lost = "another run took the lease over"

    def check(self) -> None:
        """Refuse to write once the lease is lost (e.g. this process was paused past its expiry)."""
        if self.lost is None and time.time() >= self.expires:
            self.lost = f"the lease expired at {_iso(self.expires)} before it could be renewed"
        if self.lost:
            raise RunLockedError(f"{self.store.out}: this run lost its writer lease ({self.lost}); stopped before writing")

    def _start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.seconds / 3):
                self.renew()
                if self.lost:
                    log.error("%s: writer lease lost: %s", self.store.out, self.lost)
                    return

        self._thread = threading.Thread(target=loop, name="fld-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost:
            return
        cur = self._read()
        if cur is not None and cur[1].get("token") == self.token:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
            self.fs.invalidate_cache(self.path)


class Locking:
    """One writer per OUT: a flock on local paths, a Lease on object stores (a mixin of ShardStore)."""

    @contextmanager
    def lock(self, what: str = "run", lease_seconds: float | None = None) -> Iterator[None]:
        """One writer per OUT: flock locally (released by the kernel even after SIGKILL), a lease
        object on object stores (Lease above). Temporaries of a killed run are removed once held."""
        if not self.local:
            lease = Lease(self, what, lease_seconds)
            lease.acquire()
            self._lease = lease
            try:
                self.remove_temporaries()
                yield
            finally:
                self._lease = None
                lease.release()
            return
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self._p(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise RunLockedError(
                    f"{self.out} is being written by another run ({holder}); wait for it to finish or stop it"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, {what} since {utc_now()}".encode(), 0)
            self.remove_temporaries()
            yield
        finally:
            os.close(fd)

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()
