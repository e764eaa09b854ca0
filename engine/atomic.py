"""Atomic replacement of a local file or folder: a reader (or a resumed run) sees the old one or the
new one, never a half-written one, even after a kill or a power cut.

Why one helper: the store commits shards and records this way on local paths (engine/store/; on
object stores a whole-object PUT is atomic instead), the exports write their files this way, and the
trainer its checkpoint folders. The new content is written under a hidden temporary name in the same
folder (`.<name>.tmp-<pid>`, which the store's cleanup of killed writers recognises by TEMPORARY),
fsynced (a folder: every file in it), renamed over the target, then the parent folder is fsynced so
that the rename itself is durable.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Callable

TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")  # what atomic_write leaves behind when its process is killed


def temporary_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    if not os.path.isdir(path):
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def atomic_write(path: "str | os.PathLike", write: Callable[[str], object]) -> None:
    """`write(tmp)` creates a file or a folder at tmp; it then replaces `path` atomically. On any error
    (or KeyboardInterrupt) the temporary is removed and `path` is left as it was."""
    path = os.fspath(path)
    tmp = temporary_path(path)
    _remove(tmp)  # a leftover of a killed writer with this pid
    try:
        write(tmp)
        _fsync_tree(tmp)
        if os.path.isdir(tmp) and os.path.isdir(path):  # a folder is not renamed over a non-empty one
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync(os.path.dirname(path) or ".")


def atomic_write_bytes(path: "str | os.PathLike", data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
