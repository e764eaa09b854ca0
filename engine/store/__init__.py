"""The store of OUT: a facade over its rooms, so `from engine.store import X` keeps working.

- shards.py: ShardStore (fsspec paths, object access, probe) and StoreSpec; its rooms are mixins:
- commits.py: the commit protocol (a shard counts once its record is written);
- integrity.py: damaged / committed / verify (shards changed after their commit);
- manifest.py: manifest.json (per-folder summaries, package versions);
- errors.py: the store's errors, one line each;
- lease.py: one writer per OUT (a flock locally, a lease renewed by a heartbeat on object storage).
"""
from engine.store.errors import (
    DamagedShardError,
    RunLockedError,
    StoreError,
    StoreUnavailableError,
    one_line,
    write_error,
)
from engine.store.commits import COMMITTED
from engine.store.integrity import TAIL_BYTES, parquet_footer
from engine.store.manifest import MANIFEST, package_versions
from engine.store.shards import ShardStore, StoreSpec, shard_name

__all__ = [
    "COMMITTED", "MANIFEST", "TAIL_BYTES", "DamagedShardError", "RunLockedError", "ShardStore", "StoreError",
    "StoreSpec", "StoreUnavailableError", "one_line", "package_versions", "parquet_footer", "shard_name",
    "write_error",
]
