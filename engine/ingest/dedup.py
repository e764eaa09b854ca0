"""Exact duplicates across ingest chunks: first occurrence in input order wins, on every runner.

Workers ingest chunks independently, so a file whose bytes also appear in an earlier chunk is
ingested twice. After all chunks are committed, one DuckDB pass over the `image_id` columns of
images/ (never the bytes; DuckDB spills to disk, so it scales past memory) finds every image_id
seen in an earlier chunk (chunk order, then row order = input order). Each chunk holding such
copies is rewritten by a TaskJob on the runner: the copies are added to quarantine/part-k as
`duplicate` (first, and only if not already there, so a killed rewrite can be redone) and then
removed from images/part-k; `inputs = images + quarantined + duplicates` holds again.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from engine.ingest.chunks import IMAGES, QUARANTINE

CROSS_CHUNK = "an earlier input chunk)"  # how a row this pass adds ends its detail

FIND_SQL = """
SELECT chunk, row, image_id, first_uri FROM (
    SELECT image_id, chunk, row,
           row_number() OVER w AS n,
           first_value(uri) OVER w AS first_uri
    FROM (SELECT image_id, uri, file_row_number AS row,
                 CAST(regexp_extract(filename, 'part-([0-9]+)\\.parquet$', 1) AS BIGINT) AS chunk
          FROM read_parquet({files}, filename = true, file_row_number = true))
    WINDOW w AS (PARTITION BY image_id ORDER BY chunk, row ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
) WHERE n > 1 ORDER BY chunk, row
"""


def find_cross_duplicates(store) -> dict[str, list[tuple[int, str, str]]]:
    """{images shard: [(row, image_id, uri of the first copy)]} of copies of an earlier chunk's image."""
    import duckdb

    files = store.shard_files(IMAGES)
    if len(files) < 2:
        return {}
    con = duckdb.connect()
    try:
        store.register_with(con)  # object stores: DuckDB reads through the store's fsspec filesystem
        con.execute("SET preserve_insertion_order = false")
        listing = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
        rows = con.execute(FIND_SQL.format(files=listing)).fetchall()
    finally:
        con.close()
    from engine.store import shard_name

    out: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for chunk, row, image_id, first_uri in rows:
        out[shard_name(int(chunk))].append((int(row), image_id, first_uri))
    return dict(out)


def drop_cross_duplicates(store, shard: str, duplicates: dict[str, list[tuple[int, str, str]]]) -> dict:
    """TaskJob function: move this chunk's copies of earlier images from images/ to quarantine/."""
    t0 = time.perf_counter()
    dups = duplicates[shard]
    images = store.read_shard(IMAGES, shard)
    rows = {r for r, _, _ in dups}
    copies = images.take(pa.array(sorted(rows), pa.int64())).select(["uri", "source", "image_id"]).to_pylist()
    first_of = {image_id: uri for _, image_id, uri in dups}
    quarantine = store.read_shard(QUARANTINE, shard)
    # Rows this pass added before (a killed rewrite is redone), counted: the same uri may be listed many
    # times, and its copies within the chunk are quarantine rows of their own already.
    already = Counter((u, i) for u, i, r, d in zip(quarantine.column("uri").to_pylist(),
                                                   quarantine.column("image_id").to_pylist(),
                                                   quarantine.column("reason").to_pylist(),
                                                   quarantine.column("detail").to_pylist())
                      if r == "duplicate" and d.endswith(CROSS_CHUNK))
    added = []
    for c in copies:
        key = (c["uri"], c["image_id"])
        if already[key] > 0:
            already[key] -= 1
            continue
        added.append({"uri": c["uri"], "source": c["source"], "reason": "duplicate",
                      "detail": f"{c['uri']}: exact copy of {first_of[c['image_id']]} (image_id "
                                f"{c['image_id'][:12]}..., {CROSS_CHUNK}",
                      "image_id": c["image_id"], "duplicate_of": c["image_id"]})
    q_rec = store.commit_record(QUARANTINE, shard)
    if added:
        quarantine = pa.concat_tables([quarantine, pa.Table.from_pylist(added, schema=quarantine.schema)])
        store.write_shard(QUARANTINE, shard, quarantine, {k: v for k, v in q_rec.items() if k in META_KEYS})
    keep = pc.invert(pc.is_in(pa.array(range(images.num_rows), pa.int64()), value_set=pa.array(sorted(rows), pa.int64())))
    i_rec = store.commit_record(IMAGES, shard)
    counters = dict(i_rec.get("counters") or {})
    n = len(rows)
    counters["images"] = counters.get("images", 0) - n
    counters["duplicates"] = counters.get("duplicates", 0) + n
    reasons = dict(counters.get("quarantine_reasons") or {})
    reasons["duplicate"] = reasons.get("duplicate", 0) + n
    counters["quarantine_reasons"] = dict(sorted(reasons.items()))
    meta = {k: v for k, v in i_rec.items() if k in META_KEYS}
    store.write_shard(IMAGES, shard, images.filter(keep), {**meta, "counters": counters,
                                                            "cross_duplicates": i_rec.get("cross_duplicates", 0) + n,
                                                            "seconds": round(time.perf_counter() - t0, 3)})
    return {"rows": n}


META_KEYS = ("config_hash", "input_sha256", "runner", "counters", "seconds", "cross_duplicates")
