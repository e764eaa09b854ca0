"""The errors of the store (engine/store/) and its lease (engine/store/lease.py), one line each.

Their own module so that the lease, which the store takes on object stores, needs nothing of the store.
"""
from __future__ import annotations

import errno


class StoreError(RuntimeError):
    pass


class RunLockedError(StoreError):
    """Another run holds OUT."""


class StoreUnavailableError(StoreError):
    """OUT cannot be reached: bad endpoint, credentials, missing bucket or protocol package."""


class DamagedShardError(StoreError):
    """A committed shard no longer matches its commit record."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (300 characters at most), or its type's name."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def write_error(target: str, exc: OSError) -> StoreError:
    """One line for a failed write; disk full says so."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left writing {target} (disk full); nothing was committed for it: "
                          "free space and rerun to resume")
    return StoreError(f"cannot write {target}: {one_line(exc)}")
