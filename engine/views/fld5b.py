"""FLD-5B's Table 2 (annotation counts and lengths) and Table 3 (spaCy text statistics) computed
on our data, one column per annotation folder (each step, each refinement round), beside the
paper's numbers (Florence-2, P Tables 2 and 3; see docs/florence2.md).

What is counted: KEPT annotations (what an export would ship; FLD-5B is the filtered set).
- Table 2: texts per tier and their mean token length; region-text pairs, "phrase" text = the
  region's `label` (object category or OCR string), "brief" text = its `brief`; regions per image
  over all images of the folder; text-phrase-region triplets per caption tier (the tier of the
  grounding's caption), per kept caption of that tier, and the mean tokens of their phrases.
  Tokens are Florence-2's BPE tokens (engine.views.tokens), over every annotation.
- Table 3: per tier, mean objects / attributes / actions / proper nouns per caption and mean
  object / action complexity, from schemas.text_stats (the text filter's own definitions).
  spaCy is the expensive part, so at most `sample` captions per tier are parsed: the first by
  md5(image_id, ann_id), the same captions on every call and every machine.
A cell the paper does not give (or our notes do not carry) is None / "-".
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from engine.views.query import open_views
from engine.views.tokens import token_counter
from schemas.records import TIERS

DEFAULT_SAMPLE = 2000
M = 1_000_000
COUNT_MEASURES = ("images", "annotations", "regions")

# (key, annotation type, text type, measure): the rows of Table 2 in the paper's order.
TABLE2_ROWS: list[tuple[str, str, str, str]] = [("images", "images", "", "images")]
for _tier in TIERS:
    TABLE2_ROWS += [(f"text.{_tier}.annotations", "text", _tier, "annotations"),
                    (f"text.{_tier}.avg_tokens", "text", _tier, "avg tokens")]
for _kind, _what in (("phrase", "phrase (label)"), ("brief", "brief")):
    TABLE2_ROWS += [(f"region.{_kind}.regions", "region-text", _what, "regions"),
                    (f"region.{_kind}.per_image", "region-text", _what, "regions per image"),
                    (f"region.{_kind}.avg_tokens", "region-text", _what, "avg tokens per region text")]
for _tier in TIERS:
    TABLE2_ROWS += [(f"triplet.{_tier}.regions", "text-phrase-region", _tier, "regions"),
                    (f"triplet.{_tier}.per_text", "text-phrase-region", _tier, "regions per text"),
                    (f"triplet.{_tier}.avg_tokens", "text-phrase-region", _tier, "avg tokens per phrase")]

PAPER_TABLE2: dict[str, float | None] = {
    "images": 126 * M,
    "text.brief.annotations": 235 * M, "text.brief.avg_tokens": 7.95,
    "text.detailed.annotations": 126 * M, "text.detailed.avg_tokens": 31.65,
    "text.more_detailed.annotations": 126 * M, "text.more_detailed.avg_tokens": 70.53,
    "region.phrase.regions": 681 * M, "region.phrase.per_image": 5.42, "region.phrase.avg_tokens": 1.19,
    "region.brief.regions": 681 * M, "region.brief.per_image": 5.42, "region.brief.avg_tokens": 2.55,
    "triplet.brief.regions": 1007 * M, "triplet.brief.per_text": 4.27,
    "triplet.detailed.regions": 1289 * M, "triplet.detailed.per_text": 10.25,
    "triplet.more_detailed.regions": 1278 * M, "triplet.more_detailed.per_text": 10.17,
}

TABLE3_MEASURES = ("objects", "attributes", "actions", "proper_nouns", "object_complexity", "action_complexity")
TABLE3_ROWS = [(f"{tier}.{m}", tier, m.replace("_", " ")) for tier in TIERS for m in ("captions", *TABLE3_MEASURES)]
_PAPER3 = {  # brief, detailed, more detailed; the paper's proper-noun counts are not in our notes
    "objects": (3.23, 13.31, 28.06), "attributes": (2.80, 7.27, 16.25), "actions": (0.58, 4.21, 8.76),
    "object_complexity": (2.80, 4.00, 4.02), "action_complexity": (1.14, 3.63, 4.38),
}
PAPER_TABLE3: dict[str, float | None] = {f"{tier}.{m}": v[i] for m, v in _PAPER3.items() for i, tier in enumerate(TIERS)}


def _grouped_token_sums(con, sql: str) -> dict[str, list[int]]:
    """{group: [n, token sum]} over the (group, text) rows of `sql`, tokenized in streamed batches."""
    counter = token_counter()
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    reader = con.sql(sql).to_arrow_reader(10_000)
    for batch in reader:
        groups = batch.column(0).to_pylist()
        for group, n in zip(groups, counter.count(batch.column(1).to_pylist())):
            out[group][0] += 1
            out[group][1] += n
    return out


def _avg(total: float, n: int) -> float | None:
    return round(total / n, 4) if n else None


def table2_values(con) -> dict[str, Any]:
    """Table 2 measures of the step whose views `con` holds (engine.views.query.open_views)."""
    images = con.execute("SELECT count(*) FROM records").fetchall()[0][0]
    v: dict[str, Any] = {"images": images}
    texts = _grouped_token_sums(con, "SELECT tier, text FROM texts WHERE status = 'kept'")
    for tier in TIERS:
        n, tokens = texts.get(tier, (0, 0))
        v[f"text.{tier}.annotations"] = n
        v[f"text.{tier}.avg_tokens"] = _avg(tokens, n)
    regions = _grouped_token_sums(con, """
        SELECT 'phrase', label FROM regions WHERE status = 'kept' AND trim(coalesce(label, '')) <> ''
        UNION ALL
        SELECT 'brief', brief FROM regions WHERE status = 'kept' AND trim(coalesce(brief, '')) <> ''""")
    for kind in ("phrase", "brief"):
        n, tokens = regions.get(kind, (0, 0))
        v[f"region.{kind}.regions"] = n
        v[f"region.{kind}.per_image"] = _avg(n, images)
        v[f"region.{kind}.avg_tokens"] = _avg(tokens, n)
    triplets = _grouped_token_sums(con, """
        SELECT t.tier, g.phrase FROM groundings g
        JOIN texts t ON t.image_id = g.image_id AND t.ann_id = g.text_ann_id
        WHERE g.status = 'kept'""")
    for tier in TIERS:
        n, tokens = triplets.get(tier, (0, 0))
        v[f"triplet.{tier}.regions"] = n
        v[f"triplet.{tier}.per_text"] = _avg(n, v[f"text.{tier}.annotations"])
        v[f"triplet.{tier}.avg_tokens"] = _avg(tokens, n)
    return v


class CaptionParser:
    """spaCy statistics of captions, parsed once per distinct text (steps share most captions)."""

    def __init__(self) -> None:
        from engine.models import load_spacy

        self.nlp = load_spacy()
        self.memo: dict[str, Any] = {}
        meta = self.nlp.meta
        self.model = f"spaCy {meta.get('lang', '')}_{meta.get('name', '?')} {meta.get('version', '')}".strip()

    def stats(self, texts: list[str]) -> list:
        from schemas.text_stats import text_stats

        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        for text, doc in zip(todo, self.nlp.pipe(todo, batch_size=64)):
            self.memo[text] = text_stats(doc)
        return [self.memo[t] for t in texts]


def table3_values(con, parser: CaptionParser, sample: int) -> dict[str, Any]:
    """Table 3 measures of one step: at most `sample` kept captions per tier (deterministic)."""
    rows = con.execute(f"""
        SELECT tier, text, count(*) OVER (PARTITION BY tier) AS total FROM texts WHERE status = 'kept'
        QUALIFY row_number() OVER (PARTITION BY tier ORDER BY md5(image_id || ann_id), ann_id) <= {int(sample)}
    """).fetchall()
    by_tier: dict[str, list[str]] = defaultdict(list)
    totals: dict[str, int] = {}
    for tier, text, total in rows:
        by_tier[tier].append(text or "")
        totals[tier] = total
    v: dict[str, Any] = {}
    for tier in TIERS:
        stats = parser.stats(by_tier.get(tier, []))
        v[f"{tier}.captions"] = len(stats)
        v[f"{tier}.captions_total"] = totals.get(tier, 0)
        for m in TABLE3_MEASURES:
            v[f"{tier}.{m}"] = _avg(sum(getattr(s, m) for s in stats), len(stats))
    return v


def _cell(value: Any, key: str) -> str:
    """Counts as integers (the paper's in millions), means with two decimals, missing as "-"."""
    if value is None:
        return "-"
    if key.rsplit(".", 1)[-1] in COUNT_MEASURES:
        return f"{value // M:,}M" if value >= M and value % M == 0 else f"{int(value):,}"
    return f"{value:.2f}"


def _steps(folders: list[str]) -> list[str]:
    return [f.split("/", 1)[1] if f.startswith("annotations/") else f for f in folders]


def fld5b_tables(out, folders: list[str], sample: int = DEFAULT_SAMPLE) -> dict[str, dict]:
    """{"table2": ..., "table3": ...}: titled tables (rows = measures, columns = paper + each step)
    with the raw numbers under "paper" and "values" {step: {key: value}} for --format json."""
    steps = _steps(folders)
    values2: dict[str, dict] = {}
    values3: dict[str, dict] = {}
    parser = CaptionParser()
    for folder, step in zip(folders, steps):
        con = open_views(out, folder)
        try:
            values2[step] = table2_values(con)
            values3[step] = table3_values(con, parser, sample)
        finally:
            con.close()
    rows2 = [[kind, what, measure, _cell(PAPER_TABLE2.get(key), key), *(_cell(values2[s].get(key), key) for s in steps)]
             for key, kind, what, measure in TABLE2_ROWS]
    rows3 = []
    for key, tier, measure in TABLE3_ROWS:
        if measure == "captions":
            cells = [f"{values3[s][key]:,} of {values3[s][f'{tier}.captions_total']:,}" for s in steps]
            rows3.append([tier, "captions parsed", "-", *cells])
        else:
            rows3.append([tier, measure, _cell(PAPER_TABLE3.get(key), key), *(_cell(values3[s].get(key), key) for s in steps)])
    tokenizer = token_counter().name
    return {
        "table2": {
            "title": f"FLD-5B Table 2: kept annotations; tokens = {tokenizer}",
            "columns": ["annotation", "text", "measure", "FLD-5B (paper)", *steps],
            "rows": rows2, "paper": PAPER_TABLE2, "values": values2, "tokenizer": tokenizer,
        },
        "table3": {
            "title": f"FLD-5B Table 3: {parser.model} over kept captions, at most {sample:,} per tier "
                     "(a fixed sample: first by md5 of the ids); means per caption",
            "columns": ["tier", "measure", "FLD-5B (paper)", *steps],
            "rows": rows3, "paper": PAPER_TABLE3, "values": values3, "sample": sample,
        },
    }
