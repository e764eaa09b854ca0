"""The store of OUT: a facade over its rooms, so `from engine.store import X` keeps working.

- shards.py: ShardStore (fsspec paths, object access, probe) and StoreSpec;
- errors.py: the store's errors, one line each;
- lease.py: the run lock (a lease renewed by a heartbeat, local or on object storage).
"""
from engine.store.errors import (
    DamagedShardError,
    RunLockedError,
    StoreError,
    StoreUnavailableError,
    one_line,
    write_error,
)
from engine.store.shards import (
    COMMITTED,
    MANIFEST,
    TAIL_BYTES,
    ShardStore,
    StoreSpec,
    package_versions,
    parquet_footer,
    shard_name,
)

__all__ = [
    "COMMITTED", "MANIFEST", "TAIL_BYTES", "DamagedShardError", "RunLockedError", "ShardStore", "StoreError",
    "StoreSpec", "StoreUnavailableError", "one_line", "package_versions", "parquet_footer", "shard_name",
    "write_error",
]
