"""fld-engine core: config, stage contract, shard store, ingest, runners, query, CLI.

Only engine.runners imports ray or apache_beam; stages import engine.stage and schemas.
"""
__version__ = "0.1.0"
