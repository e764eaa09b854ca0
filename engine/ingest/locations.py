"""Local paths and fsspec URLs behind one small API, so every source type reads both.

Inputs are untrusted, so reading is defensive:
- only regular files (objects) are opened: a FIFO would block the run, /dev/zero never ends, a
  socket or device is not data. Local paths are stat'ed before open and fstat'ed after an open
  that cannot block (O_NONBLOCK), so a file swapped for a FIFO in between is refused too;
- a size cap is checked before reading (stat / listing / tar header) and enforced while reading
  (at most cap + 1 bytes are read: sizes can lie, /proc files say 0, files grow);
- names that are not valid UTF-8 are kept exactly: percent-escaped in text (`escape_name`), and
  a local file's location is then a file:// URL that `local_path` turns back into the same bytes;
- transient network errors are retried with backoff (`read_with_retries`), and a URL protocol
  whose package is missing is one error at listing time (`require_protocol`).
"""
from __future__ import annotations

import errno
import functools
import glob
import logging
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Callable, Iterator
from urllib.parse import unquote_to_bytes

from engine.ingest.quarantine import Quarantined

log = logging.getLogger(__name__)

READ_CHUNK = 16 << 20  # bytes per read() while enforcing a cap on a file whose size is unknown
RETRY_DELAYS = (0.25, 1.0, 4.0)  # seconds before the 2nd, 3rd and 4th attempt at a transient error
RETRY_BUDGET_S = 30.0  # no new attempt starts once one input has taken this long
# http(s) inputs: a server that accepts and never answers costs at most this per request (fsspec asks HEAD,
# then GET); with RETRY_BUDGET_S one input's deadline is RETRY_BUDGET_S + 2 * (connect + read) seconds.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 20.0
# One URL or S3 input's reading (every request of one attempt: HEAD, GETs of its blocks) ends after this many seconds:
# a server that drips a byte now and then never trips READ_TIMEOUT_S. It is past RETRY_BUDGET_S, so a
# timed-out attempt is not tried again: one URL input costs at most about INPUT_DEADLINE_S + READ_TIMEOUT_S.
INPUT_DEADLINE_S = 120.0


class InputError(ValueError):
    """A source that cannot be listed; the message names the file, the row / key or the prefix."""


# ---------------------------------------------------------------------------- names and locations
def is_url(s: str) -> bool:
    """True for non-local URLs (s3://, gs://, http://, memory://, ...); file:// counts as local."""
    return "://" in s and not s.startswith("file://")


def is_text(s: str) -> bool:
    """Can `s` be stored as UTF-8 (Arrow strings, JSON)? False for names decoded with surrogateescape."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name_bytes(name: str) -> bytes:
    try:
        return os.fsencode(name)  # the exact bytes of a name os.listdir / argv decoded with surrogateescape
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no file can have that name
        return name.encode("utf-8", "surrogatepass")


def escape_name(name: str) -> str:
    """`name` as valid UTF-8 text, losslessly: unchanged when it already is; otherwise the bytes that
    are not UTF-8, and '%' itself, are written %XX ("caf\\xe9.jpg" -> "caf%E9.jpg")."""
    if is_text(name):
        return name
    out = []
    for ch in _name_bytes(name).decode("utf-8", "surrogateescape"):
        if ch == "%":
            out.append("%25")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def location_of(path: str) -> str:
    """A location a reader on any worker reopens exactly: the path itself, or, for a local path that
    is not valid UTF-8, a file:// URL with the undecodable bytes and '%' percent-escaped."""
    if is_text(path):
        return path
    if is_url(path):  # object-store keys are UTF-8: such a key cannot exist, the reader says "missing"
        return escape_name(path)
    return "file://" + escape_name(os.path.abspath(local_path(path)))


MEMBER_SEPARATOR = "::"  # uri of a tar member: <tar uri>::<member name>


def input_uri(path: str) -> str:
    """The `uri` of a file input: location_of(path), except that a local name holding the member
    separator '::' becomes a file:// URL with ':' (and '%', and bytes that are not UTF-8) escaped, so
    a file named `shard.tar::evil.jpg` never shares its uri with the member `evil.jpg` of `shard.tar`."""
    location = location_of(path)
    if MEMBER_SEPARATOR not in location or is_url(location) or location.startswith("file://"):
        return location
    out = []
    for ch in _name_bytes(os.path.abspath(path)).decode("utf-8", "surrogateescape"):
        if ch in "%:":
            out.append(f"%{ord(ch):02X}")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "file://" + "".join(out)


def local_path(s: str) -> str:
    """The path of a local location; a file:// URL is percent-decoded (RFC 8089) to the exact bytes."""
    if s.startswith("file://"):
        return os.fsdecode(unquote_to_bytes(s[len("file://"):]))
    return s


# ---------------------------------------------------------------------------- protocols
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
             "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs", "sftp": "paramiko", "ssh": "paramiko",
             "hf": "huggingface_hub", "oci": "ocifs", "webdav": "webdav4", "smb": "smbprotocol"}


@functools.lru_cache(maxsize=None)
def _protocol_problem(protocol: str) -> str | None:
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        package = _PACKAGES.get(protocol)
        fix = f"pip install {package}" if package else "install the fsspec backend for it"
        return f"reading {protocol}:// URLs needs a package that is not installed ({exc}): {fix}"
    except ValueError as exc:
        return f"{protocol}:// is not a protocol fsspec knows ({exc})"
    return None


def require_protocol(location: str, where: str) -> None:
    """InputError (one line naming the package to install) when `location` is a URL whose fsspec
    backend cannot be loaded; checked once per protocol, at listing time, not once per file."""
    if not is_url(location):
        return
    for part in location.split("::"):  # chained URLs: simplecache::s3://...
        protocol = part.split("://", 1)[0] if "://" in part else part
        problem = _protocol_problem(protocol)
        if problem:
            raise InputError(f"{where}: {problem}")


def _storage_options(location: str) -> dict:
    """Connect / read timeouts for the protocols whose defaults wait for minutes (aiohttp: 5 min)."""
    protocol = location.split("://", 1)[0].lower()
    if MEMBER_SEPARATOR in location:
        return {}
    if protocol in ("s3", "s3a"):
        # botocore waits 60 s to connect and per read, and retries inside s3fs's own attempts (a silent endpoint
        # took 67 s per input with 1 s timeouts): one botocore request per call, read_with_retries retries.
        # FSSPEC_S3_* settings still win. An input's reads also meet INPUT_DEADLINE_S (_read_s3).
        from fsspec.config import conf

        configured = conf.get("s3") or {}
        config = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S, "retries": {"max_attempts": 1},
                  **(configured.get("config_kwargs") or {})}
        return {"config_kwargs": config}
    if protocol not in ("http", "https"):
        return {}
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=INPUT_DEADLINE_S, connect=CONNECT_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S,
                                    sock_read=READ_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout}}


def _fs(location: str):
    import fsspec

    require_protocol(location, location)
    return fsspec.core.url_to_fs(location, **_storage_options(location))


# ---------------------------------------------------------------------------- reading
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat_regular(path: str) -> os.stat_result:
    """stat of a regular file (symlinks followed), else Quarantined('not_a_file'); FileNotFoundError
    for a path that is not there at all."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise Quarantined("not_a_file", f"a symbolic link to {os.readlink(path)!r}, which does not exist") from None
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Quarantined("not_a_file", "a symbolic link loop (it never reaches a file)") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        via = f" (through the symbolic link to {os.path.realpath(path)!r})" if os.path.islink(path) else ""
        raise Quarantined("not_a_file", f"{_kind(st.st_mode)}{via}, not a regular file; not opened")
    return st


@contextmanager
def open_regular(location: str) -> Iterator[tuple[IO[bytes], int | None]]:
    """(binary file, size in bytes or None) of a regular local file or an fsspec object.

    Anything else raises Quarantined('not_a_file') before an open that could block or never end."""
    if is_url(location):
        fs, path = _fs(location)
        info = fs.info(path)
        kind = info.get("type")
        if kind not in (None, "file"):
            raise Quarantined("not_a_file", f"a {kind}, not a file")
        with fs.open(path, "rb") as f:
            yield f, info.get("size")
        return
    path = local_path(location)
    _stat_regular(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: a FIFO swapped in since the stat cannot block the open
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Quarantined("not_a_file", f"{_kind(st.st_mode)} (replaced since it was checked), not read")
        yield f, st.st_size


def too_large(size: int, limit: int, how: str = "") -> Quarantined:
    return Quarantined("too_large", f"{size} bytes{how}, over ingest.max_file_bytes = {limit}; not read")


def read_capped(f: IO[bytes], limit: int | None, size: int | None = None, deadline: float | None = None) -> bytes:
    """All of `f`, or Quarantined('too_large') when `size` or the bytes actually read exceed `limit`
    (at most limit + 1 bytes are ever read); TimeoutError when still reading at `deadline` (monotonic)."""
    if limit is None:
        return f.read()
    if size is not None and size > limit:
        raise too_large(size, limit)
    want = limit + 1
    parts = [f.read(min(want, size + 1 if size is not None else READ_CHUNK))]
    total = len(parts[0])
    while parts[-1] and total < want:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"still reading after {INPUT_DEADLINE_S:g} s ({total} bytes so far)")
        parts.append(f.read(min(want - total, READ_CHUNK)))
        total += len(parts[-1])
    if total > limit:
        raise Quarantined("too_large", f"more than ingest.max_file_bytes = {limit} bytes while reading, although "
                                       f"its size said {size}; not used")
    return parts[0] if len(parts) == 1 else b"".join(parts)


class Reader:
    """A picklable reader of one input (shipped to multiprocessing / Ray / Beam workers).
    Called with the byte cap; raises Quarantined for an input that must not be read."""

    def __call__(self, max_bytes: int | None = None) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True)
class LocationReader(Reader):
    """A whole local file or fsspec object."""

    location: str

    def __call__(self, max_bytes: int | None = None) -> bytes:
        deadline = time.monotonic() + INPUT_DEADLINE_S if is_url(self.location) else None
        if deadline is not None and _is_s3(self.location):
            return _read_s3(self.location, max_bytes, deadline)
        with open_regular(self.location) as (f, size):
            return read_capped(f, max_bytes, size, deadline)


def _is_s3(location: str) -> bool:
    return location.split("://", 1)[0].lower() in ("s3", "s3a") and MEMBER_SEPARATOR not in location


def _read_s3(location: str, max_bytes: int | None, deadline: float) -> bytes:
    """One S3 object (HEAD, then one ranged GET up to the cap) within one deadline: s3fs's blocking
    calls cannot be interrupted and it tries a timed-out call 5 times itself (15.5 s with 1 s
    timeouts, minutes with the defaults), so its coroutines run on its loop under asyncio.wait_for,
    and a call that outlives the deadline is cancelled: TimeoutError, reason `timeout`."""
    from fsspec.asyn import sync
    from fsspec.exceptions import FSTimeoutError

    fs, path = _fs(location)

    def call(func, *args, **kwargs):
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise FSTimeoutError
            return sync(fs.loop, func, *args, timeout=left, **kwargs)
        except FSTimeoutError:
            raise TimeoutError(f"no answer within the input deadline of {INPUT_DEADLINE_S:g} s") from None

    info = call(fs._info, path)
    kind = info.get("type")
    if kind not in (None, "file"):
        raise Quarantined("not_a_file", f"a {kind}, not a file")
    size = info.get("size")
    if max_bytes is not None and size is not None and size > max_bytes:
        raise too_large(size, max_bytes)
    if size == 0:
        return b""
    data = call(fs._cat_file, path, start=0, end=None if max_bytes is None else max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise Quarantined("too_large", f"more than ingest.max_file_bytes = {max_bytes} bytes while reading, although "
                                       f"its size said {size}; not used")
    return data


@dataclass(frozen=True)
class ListingProblem(Reader):
    """An input the listing already found unusable (a folder that cannot be listed, a cut tar, a bad
    caption): it is quarantined with this reason, like any input, instead of silently vanishing."""

    reason: str
    detail: str

    def __call__(self, max_bytes: int | None = None) -> bytes:
        raise Quarantined(self.reason, self.detail)


def reader(location: str) -> Callable[..., bytes]:
    """A function that reads the whole object when called (lazily: listing never reads bytes)."""
    return LocationReader(location_of(location))


_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EAGAIN", "EBUSY", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ENETDOWN", "ENETUNREACH",
    "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "EPIPE", "EREMOTEIO") if hasattr(errno, name))
_TRANSIENT_WORDS = ("timeout", "connect", "disconnect", "throttl", "temporar", "payload", "incompleteread")


def is_transient(exc: BaseException | None) -> bool:
    """Worth another attempt: connection and timeout errors, 5xx / 429 / 408 statuses, the errnos s3fs
    and sockets use for them (EBUSY for SlowDown / 503, EREMOTEIO for 500), also when chained."""
    for _ in range(5):
        if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None and is_transient(exc.__cause__):
            return True  # fsspec's http info() says "not found" for a timeout or a refused connection
        if exc is None or isinstance(exc, (Quarantined, FileNotFoundError, PermissionError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        status = next((v for v in (getattr(exc, a, None) for a in ("status", "status_code", "code"))
                       if isinstance(v, int) and not isinstance(v, bool)), None)
        if status is not None and (status in (408, 429) or (500 <= status <= 599 and status not in (501, 505))):
            return True
        if any(word in type(exc).__name__.lower() for word in _TRANSIENT_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class RetriesExhausted(OSError):
    """A transient error that outlived every retry; the message says how many attempts were made."""


def network_reason(exc: BaseException | None) -> str:
    """The quarantine reason of a read that failed on the network: 'timeout', 'connection_refused', or
    'unreadable' (anything else), from the exception and what it was raised from."""
    for _ in range(8):
        if exc is None:
            break
        name = type(exc).__name__.lower()
        if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED \
                or "refused" in str(exc).lower():
            return "connection_refused"
        if isinstance(exc, TimeoutError) or "timeout" in name or getattr(exc, "errno", None) == errno.ETIMEDOUT:
            return "timeout"
        exc = exc.__cause__ or exc.__context__
    return "unreadable"


def read_with_retries(read: Callable[..., bytes], *args) -> bytes:
    """read(*args), attempted again after RETRY_DELAYS on a transient error (bounded by RETRY_BUDGET_S)."""
    start = time.monotonic()
    for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            return read(*args)
        except Exception as exc:  # noqa: BLE001 - classified below; anything else goes up unchanged
            if not is_transient(exc):
                raise
            spent = time.monotonic() - start
            if delay is None or spent + delay > RETRY_BUDGET_S:
                raise RetriesExhausted(f"{type(exc).__name__}: {exc} (after {attempt} attempts over "
                                       f"{spent:.1f} s)") from exc
            log.info("transient read error (%s: %s); attempt %d in %.2f s", type(exc).__name__, exc, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def open_binary(location: str) -> IO[bytes]:
    """A seekable binary file object for a local path or an fsspec URL (no type check: use
    open_regular for inputs)."""
    if is_url(location):
        fs, path = _fs(location)
        return fs.open(path, "rb")
    return open(local_path(location), "rb")


def local_fingerprint(location: str) -> str | None:
    """size:mtime of a local file (one stat, no read), None for URLs and paths that cannot be stat'ed:
    what tells a rerun that a list-file or COCO row names a file that changed."""
    if is_url(location):
        return None
    try:
        st = os.stat(local_path(location_of(location)))
    except (OSError, ValueError):  # not there, or a name no file can have (NUL)
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------------------- listing
def exists(location: str) -> bool:
    if is_url(location):
        fs, path = _fs(location)
        return fs.exists(path)
    return os.path.exists(local_path(location))


def has_glob(location: str) -> bool:
    return any(ch in location for ch in "*?[")


def expand_glob(pattern: str) -> list[str]:
    """Sorted matches of a local or fsspec glob (URLs keep their protocol)."""
    if is_url(pattern):
        fs, path = _fs(pattern)
        # Keep the user's spelling of the URL: prefix before the first glob character + the rest.
        cut = pattern[: min(pattern.find(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
        stripped = fs._strip_protocol(cut).rstrip("/")
        try:
            matches = fs.glob(path)
        except Exception as exc:  # noqa: BLE001 - a listing that fails is an error, never an empty match
            raise InputError(f"{pattern}: the glob cannot be expanded ({type(exc).__name__}: {exc})") from exc
        return sorted(cut + m[len(stripped):] if m.startswith(stripped + "/") else fs.unstrip_protocol(m) for m in matches)
    return sorted(glob.glob(local_path(pattern)))


def is_dir(location: str) -> bool:
    if is_url(location):
        fs, path = _fs(location)
        return fs.isdir(path)
    return os.path.isdir(local_path(location))


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


Listed = tuple[str, "str | None", "tuple[str, str] | None"]  # (path, fingerprint, (reason, detail) of a problem)


def iter_files(root: str) -> Iterator[Listed]:
    """(path or URL, fingerprint, problem) of every file below a local folder or a URL prefix, streamed
    in a deterministic order (a directory's entries by name, depth first; a bucket's keys in key
    order), so a listing of millions of files is never held in memory at once. The fingerprint (size
    and mtime / ETag, from the listing itself: no extra request) changes when the file changes.

    A local folder that cannot be listed, or a symlink back to a folder above it, is yielded as a
    problem (quarantined with its reason: never a silent loss). A URL prefix whose listing fails is an
    InputError naming it. Hidden files and folders (".git", ".ipynb_checkpoints", "._x.jpg") are left
    out: tool artefacts, not data, and a source of duplicates.
    """
    if is_url(root):
        yield from _iter_url_files(root)
        return
    yield from _iter_local_files(local_path(root))


def _scan(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _dir_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unlistable(exc: OSError) -> tuple[str, str]:
    return "unreadable", f"a folder that cannot be listed ({exc.strerror or exc}); its files are not ingested"


def _iter_local_files(root: str) -> Iterator[Listed]:
    try:
        top, entries = _dir_key(root), _scan(root)
    except OSError as exc:
        yield root, None, _unlistable(exc)
        return
    stack = [(iter(entries), frozenset({top}))]  # depth first without recursion: any depth of folders
    while stack:
        entries_left, ancestors = stack[-1]
        entry = next(entries_left, None)
        if entry is None:
            stack.pop()
            continue
        try:
            is_folder = entry.is_dir()  # follows symlinks
        except OSError:  # a symlink loop: listed as a file, then quarantined by the worker
            is_folder = False
        if is_folder:
            try:
                key = _dir_key(entry.path)
                if key in ancestors:
                    yield entry.path, None, ("not_a_file", "a symbolic link to a folder above it (a loop); not followed")
                    continue
                sub = _scan(entry.path)
            except OSError as exc:
                yield entry.path, None, _unlistable(exc)
                continue
            stack.append((iter(sub), ancestors | {key}))
            continue
        try:
            st = entry.stat()
            fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            fingerprint = None  # a dangling link: listed anyway, the worker quarantines it
        yield entry.path, fingerprint, None


def _url_fingerprint(info: dict) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
    return f"{info.get('size')}:{tag}"


def _iter_url_files(root: str) -> Iterator[Listed]:
    fs, path = _fs(root)
    base = path.rstrip("/") + "/"
    stem = root.rstrip("/") + "/"

    def named(p: str) -> str:
        return stem + p[len(base):] if p.startswith(base) else root

    if hasattr(fs, "_iterdir") and hasattr(fs, "split_path"):  # s3fs: pages of keys, in key order
        infos = _iter_s3(fs, base, root)
    else:
        infos = _walk_url(fs, path, named)
    for info in infos:
        name = info["name"]
        if info.get("type") == "directory" or not name.startswith(base):
            continue
        rel = name[len(base):]
        if not _hidden(rel):
            yield stem + rel, _url_fingerprint(info), None


def _listing_failed(prefix: str, exc: Exception, after: int | None = None) -> InputError:
    done = f" after {after} entries" if after is not None else ""
    return InputError(f"{prefix}: this prefix cannot be listed{done} ({type(exc).__name__}: {exc}); "
                      "the run stops rather than miss its files (fix the access and rerun)")


def _walk_url(fs, path: str, named: Callable[[str], str]) -> Iterator[dict]:
    """Files below `path`, one directory listing at a time, by name, depth first. Unlike fs.find
    (whose walk omits a sub-prefix it fails to list), a failed listing is an error naming it."""

    def listing(p: str) -> list[dict]:
        try:
            entries = fs.ls(p, detail=True)
        except Exception as exc:  # noqa: BLE001 - permissions, network: the whole listing is in doubt
            raise _listing_failed(named(p), exc) from exc
        return sorted((e for e in entries if e["name"].rstrip("/") != p.rstrip("/")), key=lambda e: e["name"])

    seen = {path.rstrip("/")}
    stack = [iter(listing(path))]
    while stack:
        info = next(stack[-1], None)
        if info is None:
            stack.pop()
        elif info.get("type") == "directory":
            name = info["name"].rstrip("/")
            if name not in seen:
                seen.add(name)
                stack.append(iter(listing(name)))
        else:
            yield info


def _iter_s3(fs, prefix_path: str, root: str) -> Iterator[dict]:
    """Every object under a bucket prefix, one ListObjectsV2 page at a time (s3fs's async pager)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(prefix_path)
    pages = fs._iterdir(bucket, delimiter="", prefix=key.rstrip("/") + "/" if key else "")
    n = 0
    while True:
        try:
            info = sync(fs.loop, pages.__anext__())
        except StopAsyncIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a failed page: an error, not a shorter listing
            raise _listing_failed(root, exc, n) from exc
        n += 1
        yield info


def join(base_dir: str, location: str) -> str:
    """Resolve a relative entry of a list / COCO file against that file's folder."""
    if is_url(location) or os.path.isabs(local_path(location)):
        return location
    if is_url(base_dir):
        return base_dir.rstrip("/") + "/" + location
    return os.path.normpath(os.path.join(local_path(base_dir), location))


def dirname(location: str) -> str:
    if is_url(location):
        return location.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(local_path(location)))


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def folder_name(location: str) -> str:
    """Name of a folder given as a path or URL ("data/coco/" -> "coco", "." -> the cwd's name)."""
    if is_url(location):
        return basename(location)
    return os.path.basename(os.path.abspath(local_path(location)))


def stem(location: str) -> str:
    """File name up to its first dot ("shard-0001.tar" -> "shard-0001")."""
    name = basename(location)
    return name if name.startswith(".") else name.split(".", 1)[0]
