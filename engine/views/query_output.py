"""How `fld query` writes streamed rows: csv / json / table sinks with bounded output.

Rows arrive FETCH_BATCH at a time from engine.views.query (on its worker thread, inside its
timeout). Nothing is held beyond one batch for csv / json; the table holds --max-rows rows.
Bounds, each cut said once on stderr:
- a cell longer than `max_cell` characters (text, bytes, or a nested value's JSON) is cut and
  ends with "...[cut: N chars]"; table cells are cut at TABLE_CELL characters;
- csv / json stop after `max_bytes` of output, at a row boundary (json stays a valid array).
JSON is strict: NaN / Infinity become null, same-named columns stay distinct ("n", "n_2"), and
it is ASCII (every control, C1 or bidi character escaped by JSON itself). CSV is data and keeps
its bytes, except on a terminal, where the CLI passes `escape` (engine.cli.shown).
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Callable, TextIO

DEFAULT_MAX_CELL = 1 << 20  # characters per cell, csv / json
DEFAULT_MAX_BYTES = 1 << 30  # bytes of csv / json output
TABLE_CELL = 2000  # characters per table cell: rich lays out every character


def distinct_names(columns: list[str]) -> list[str]:
    """Column names made unique: the second "n" becomes "n_2" (then "n_3", skipping taken names)."""
    seen: set[str] = set()
    out = []
    for name in columns:
        candidate, k = name, 1
        while candidate in seen:
            k += 1
            candidate = f"{name}_{k}"
        seen.add(candidate)
        out.append(candidate)
    return out


def strict_json(value):
    """A value json.dumps(allow_nan=False) writes: non-finite floats -> None, containers walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _dumps(value) -> str:
    return json.dumps(strict_json(value), default=str, allow_nan=False)  # ASCII: no raw C1 / bidi character


class Limits:
    """Counts what was cut, for the one stderr note."""

    def __init__(self, max_cell: int, say: Callable[[str], None]):
        self.max_cell, self.say, self.cells_cut = max_cell, say, 0

    def cut(self, text: str) -> str:
        if len(text) <= self.max_cell:
            return text
        self.cells_cut += 1
        return f"{text[:self.max_cell]}...[cut: {len(text)} chars]"

    def note(self, unit: str = "characters", option: str = "--max-cell") -> None:
        if self.cells_cut:
            self.say(f"{self.cells_cut} cells cut to {self.max_cell} {unit} ({option})")


class _Stream:
    """csv / json: rows written a batch at a time, stopped at max_bytes on a row boundary."""

    def __init__(self, out: TextIO, say: Callable[[str], None], max_bytes: int, max_cell: int,
                 escape: Callable[[str], str] | None = None):
        self.out, self.say, self.max_bytes, self.escape = out, say, max_bytes, escape
        self.limits = Limits(max_cell, say)
        self.written = self.rows = 0
        self.full = False

    def _size(self, text: str) -> int:
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

    def _emit_rows(self, texts: list[str]) -> bool:
        """Write whole rows while they fit in max_bytes; False once one does not."""
        size = sum(self._size(t) for t in texts)
        if self.written + size <= self.max_bytes:
            self.out.write("".join(texts))
            self.written += size
            self.rows += len(texts)
            return True
        for text in texts:
            size = self._size(text)
            if self.written + size > self.max_bytes:
                self.full = True
                return False
            self.out.write(text)
            self.written += size
            self.rows += 1
        return True

    def _emit_batch(self, text: str, rows: int) -> bool:
        """A batch already known to fit (see the callers' fast paths)."""
        self.out.write(text)
        self.written += self._size(text)
        self.rows += rows
        return True

    def _end(self, total: int | None) -> None:
        self.limits.note()
        if self.full:
            self.say(f"output cut at {self.written} bytes after {self.rows} rows (--max-bytes {self.max_bytes})")
        self.out.flush()


class CsvSink(_Stream):
    def _cell(self, v) -> str:
        if v is None:
            return ""
        text = self.limits.cut(_dumps(v) if isinstance(v, (dict, list, tuple)) else str(v))
        return self.escape(text) if self.escape else text  # on a terminal: engine.cli.shown

    def _lines(self, rows) -> list[str]:
        buf = io.StringIO()
        writer = csv.writer(buf)
        lines = []
        for row in rows:
            writer.writerow(row)
            lines.append(buf.getvalue())
            buf.seek(0)
            buf.truncate()
        return lines

    def start(self, columns: list[str]) -> None:
        self._emit_rows(self._lines([[self.escape(c) if self.escape else c for c in columns]]))
        self.rows = 0

    def write(self, rows: list[tuple]) -> bool:
        if self.escape is None and not any(isinstance(v, (dict, list, tuple)) for row in rows for v in row):
            buf = io.StringIO()
            csv.writer(buf).writerows(rows)  # None is written as "" like _cell does
            text = buf.getvalue()
            if len(text) <= self.limits.max_cell and self.written + self._size(text) <= self.max_bytes:
                return self._emit_batch(text, len(rows))  # the fast path: no cell can be over a limit
        return self._emit_rows(self._lines([self._cell(v) for v in row] for row in rows))

    def finish(self, total: int | None) -> None:
        self._end(total)


class JsonSink(_Stream):
    """A JSON array of objects, one per line; valid however it ends (finish closes it)."""

    def _cell(self, v) -> str:
        text = _dumps(v)
        if len(text) <= self.limits.max_cell:
            return text
        return _dumps(self.limits.cut(text if not isinstance(v, str) else v))

    def _object(self, row: tuple) -> str:
        whole = json.dumps(dict(zip(self.names, strict_json(list(row)))), default=str, allow_nan=False)
        if len(whole) <= self.limits.max_cell:  # no cell can be over the limit: the fast path
            return whole
        return "{" + ", ".join(f"{k}: {self._cell(v)}" for k, v in zip(self.keys, row)) + "}"

    def start(self, columns: list[str]) -> None:
        self.names = distinct_names(columns)
        self.keys = [_dumps(c) for c in self.names]
        self.out.write("[")

    def write(self, rows: list[tuple]) -> bool:
        objects = [dict(zip(self.names, row)) for row in rows]
        try:
            text = json.dumps(objects, default=str, allow_nan=False)
        except ValueError:  # NaN / Infinity somewhere
            text = json.dumps(strict_json(objects), default=str, allow_nan=False)
        body = ("\n" if self.rows == 0 else ",\n") + text[1:-1]
        if len(text) <= self.limits.max_cell and self.written + len(body) <= self.max_bytes:
            return self._emit_batch(body, len(rows))  # the fast path: no cell can be over a limit
        texts = []
        for row in rows:
            texts.append(("\n" if self.rows + len(texts) == 0 else ",\n") + self._object(row))
        return self._emit_rows(texts)

    def finish(self, total: int | None) -> None:
        self.out.write("\n]\n" if self.rows else "]\n")
        self._end(total)


class TableSink:
    """At most max_rows rows held (cells cut at TABLE_CELL characters), the rest counted;
    `render(columns, rows)` draws them on the worker thread, inside the timeout."""

    def __init__(self, max_rows: int, render: Callable[[list[str], list[list]], None], say: Callable[[str], None]):
        self.max_rows, self.render, self.say = max_rows, render, say
        self.limits = Limits(TABLE_CELL, say)
        self.columns: list[str] = []
        self.rows: list[list] = []

    def _cell(self, v):
        if v is None:
            return None
        return self.limits.cut(v if isinstance(v, str) else str(v))

    def start(self, columns: list[str]) -> None:
        self.columns = columns

    def write(self, rows: list[tuple]) -> bool:
        for row in rows[:max(0, self.max_rows - len(self.rows))]:
            self.rows.append([self._cell(v) for v in row])
        return True

    def finish(self, total: int | None) -> None:
        self.render(self.columns, self.rows)
        self.limits.note(option="table cells; --format csv / json for whole cells")
        cut = (total or 0) - len(self.rows)
        if cut > 0:
            self.say(f"{cut} more rows not shown ({total} in all; --max-rows {self.max_rows}, "
                     "or --format csv / json for every row)")
