"""Ingest: list the user's inputs, decode and check each image once, import human annotations.

sources.list_inputs -> decode.ingest_shard (images/ + quarantine/ rows) -> human.human_annotations
(the image record a pipeline starts from). The driver (engine.execute) decides shards and resume.
"""
from engine.ingest.decode import QUARANTINE_REASONS, decode_input, ingest_shard
from engine.ingest.human import human_annotations
from engine.ingest.sources import InputError, InputItem, list_inputs

__all__ = [
    "QUARANTINE_REASONS",
    "InputError",
    "InputItem",
    "decode_input",
    "human_annotations",
    "ingest_shard",
    "list_inputs",
]
