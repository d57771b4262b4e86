"""Tables people compare: printed as aligned text and saved as CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fisherlab.files import write_text


def format_table(rows: Sequence[dict[str, Any]], floatfmt: str = ".4g") -> str:
    """Rows of equal keys as an aligned plain-text table."""
    if not rows:
        return "(empty table)"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    cells = [[cell(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = "  ".join(k.rjust(w) for k, w in zip(keys, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def save_table(
    rows: Sequence[dict[str, Any]], path: str | Path, meta: dict | None = None
) -> list[Path]:
    """Write ``path.csv`` and ``path.json`` (the JSON also holds ``meta``); returns the paths.

    Each file is written whole or not at all (:func:`fisherlab.files.write_text`): a failed
    write leaves the previous file as it was and raises a one-line
    :class:`~fisherlab.files.WriteError`.
    """
    path = Path(path)
    csv_path, json_path = path.with_suffix(".csv"), path.with_suffix(".json")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    payload = json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=2) + "\n"
    write_text(csv_path, buffer.getvalue())
    write_text(json_path, payload)
    return [csv_path, json_path]
