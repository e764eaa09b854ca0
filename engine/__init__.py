"""fld-engine core: config, stage contract, shard store, ingest, runners, query, CLI.

Only engine.runners imports ray or apache_beam; stages import engine.stage and schemas.
"""
__version__ = "0.1.0"

import sys as _sys
from pathlib import Path as _Path

from engine.own_packages import ShadowedPackageError as _Shadowed
from engine.own_packages import check_own_packages as _check_own_packages

try:
    _check_own_packages(_Path(__file__).resolve().parent.parent)
except _Shadowed as _exc:
    if _Path(_sys.argv[0]).name == "fld":  # the console script: one line and exit 2, like every CLI error
        print(f"error: {_exc}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise
