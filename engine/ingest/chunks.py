"""Ingest on the runner: the driver only lists inputs into chunks; workers read, decode and commit them.

Driver (`plan_chunks`): the streamed listing (engine.ingest.sources.iter_inputs) is cut into
chunks of `shard_size` inputs in listing order; chunk k is written as inputs/part-k (uri, where to
read it, imported annotations, the listing's fingerprint) and committed like any shard. A chunk
whose entries are unchanged since the last run is not rewritten; one that changed is, and the
images/part-k made from the old one is then no longer current, so it is ingested again (and the
steps after it redo that shard, because every commit record names the sha256 of its input).

Worker (`ingest_chunk`, a TaskJob function): reads inputs/part-k, reads + hashes + checks every
input (engine.ingest.decode.ingest_shard; exact duplicates within the chunk are found there), and
commits quarantine/part-k then images/part-k. Exact duplicates ACROSS chunks are resolved after
all chunks are in, by engine.ingest.dedup.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Iterable, Iterator

import pyarrow as pa

from engine.identity import digest
from engine.ingest.decode import MAX_JPEG_SCANS, ingest_shard
from engine.ingest.locations import ListingProblem, LocationReader, escape_name, location_of
from engine.ingest.sources import InputItem
from engine.ingest.webdataset import MemberReader
from schemas.records import INPUTS_SCHEMA

log = logging.getLogger(__name__)

INPUTS, IMAGES, QUARANTINE = "inputs", "images", "quarantine"
WRITES_IN_FLIGHT = 8  # chunk files the driver writes concurrently (object stores: latency-bound PUTs)


class EmptyInputError(ValueError):
    """The input lists no image at all: a mistake to report, not an empty success."""


def shard_name(index: int) -> str:
    from engine.store import shard_name as name

    return name(index)


def item_row(item: InputItem) -> dict:
    """An input as a row of inputs/part-k: what a worker on any machine needs to read it again.
    Every string is valid UTF-8 (Arrow refuses others): a name that is not stays exact in its
    escaped form (engine.ingest.locations.location_of), never a crash of the listing."""
    read = item.read
    location = offset = length = reason = detail = None
    if isinstance(read, MemberReader):
        location, offset, length = location_of(read.tar_path), read.offset, read.size
    elif isinstance(read, LocationReader):
        location = location_of(read.location)
    elif isinstance(read, ListingProblem):
        reason, detail = read.reason, escape_name(read.detail)
    else:
        raise TypeError(f"{escape_name(item.uri)}: its reader {type(read).__name__} cannot be sent to a worker")
    return {"uri": location_of(item.uri), "source": escape_name(item.source), "location": location,
            "offset": offset, "length": length,
            "human": json.dumps(item.human, sort_keys=True) if item.human is not None else None,
            "fingerprint": item.fingerprint, "reason": reason, "detail": detail}


def row_item(row: dict) -> InputItem:
    if row.get("reason") is not None:
        read = ListingProblem(row["reason"], row["detail"])
    elif row["offset"] is not None:
        read = MemberReader(row["location"], int(row["offset"]), int(row["length"]))
    else:
        read = LocationReader(row["location"])
    human = json.loads(row["human"]) if row["human"] is not None else None
    return InputItem(uri=row["uri"], source=row["source"], read=read, human=human, fingerprint=row["fingerprint"])


def _batched(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def plan_chunks(store, items: Iterable[InputItem], shard_size: int, ingest_hash: str) -> tuple[list[str], list[str]]:
    """Write inputs/part-k for the listing, holding one chunk (plus a few being written) at a time.

    Returns (every chunk of the listing, the chunks written now because they are new or changed).
    Chunks committed by an earlier run beyond the end of the listing are uncommitted (the inputs shrank).
    """
    committed = store.committed(INPUTS)
    shards: list[str] = []
    written: list[str] = []
    with ThreadPoolExecutor(4) as pool:
        pending: deque = deque()
        for k, rows in enumerate(_batched((item_row(it) for it in items), shard_size)):
            shard = shard_name(k)
            shards.append(shard)
            h = digest(rows)
            rec = committed.get(shard)
            if rec is not None and rec.get("inputs_hash") == h and rec.get("config_hash") == ingest_hash:
                continue
            if rec is not None:
                log.warning("ingest: the inputs of chunk %s changed since it was ingested (files added, removed or "
                            "modified); it is ingested again", shard)
            written.append(shard)
            table = pa.Table.from_pylist(rows, schema=INPUTS_SCHEMA)
            pending.append(pool.submit(store.write_shard, INPUTS, shard, table,
                                       {"config_hash": ingest_hash, "inputs_hash": h}))
            while len(pending) > WRITES_IN_FLIGHT:
                pending.popleft().result()
        for fut in pending:
            fut.result()
    if not shards:
        raise EmptyInputError("the input lists no image (no file with an image extension, no list row, no tar sample)")
    gone = sorted(set(committed) - set(shards))
    if gone:
        log.warning("ingest: the input now has %d chunks, %d fewer than the last run; their shards are removed",
                    len(shards), len(gone))
        store.uncommit(INPUTS, gone)
    return shards, written


def ingest_chunk(store, shard: str, settings: dict, ingest_hash: str, runner: str = "local") -> dict:
    """TaskJob function: inputs/part-k -> quarantine/part-k + images/part-k, committed on this worker.
    `settings`: the pipeline's ingest settings (engine.config.IngestConfig as a dict)."""
    t0 = time.perf_counter()
    inputs = store.commit_record(INPUTS, shard)
    items = [row_item(r) for r in store.read_shard(INPUTS, shard).to_pylist()]
    images, quarantine, counters = ingest_shard(items, settings["min_side"], settings["max_pixels"], set(),
                                                workers=settings["read_threads"], verify=settings["verify"],
                                                max_bytes=settings["max_file_bytes"],
                                                max_scans=settings.get("max_jpeg_scans", MAX_JPEG_SCANS))
    meta = {"config_hash": ingest_hash, "input_sha256": inputs["sha256"], "runner": runner}
    store.write_shard(QUARANTINE, shard, quarantine, meta)
    store.write_shard(IMAGES, shard, images, {**meta, "counters": counters, "cross_duplicates": 0,
                                             "seconds": round(time.perf_counter() - t0, 3)})
    return {"rows": len(items), **counters}
