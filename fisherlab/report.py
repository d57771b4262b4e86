"""Tables people compare: printed as aligned text and saved as CSV and JSON."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    """Write ``path.csv`` and ``path.json`` (the JSON also holds ``meta``); returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = path.with_suffix(".csv"), path.with_suffix(".json")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=2) + "\n")
    return [csv_path, json_path]
