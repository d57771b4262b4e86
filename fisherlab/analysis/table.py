"""One table writer: :class:`FigureData`, the numbers behind a figure, saved as CSV and JSON."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fisherlab.files import replacing, write_text


def _column_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str"


_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": lambda s: s == "True",
    "int": int,
    "float": float,
    "str": str,
}


@dataclass
class FigureData:
    """The numbers behind one figure: named tables of rows (dicts with equal keys) and settings.

    Attributes:
        name: The figure family, e.g. ``"spectra"``.
        tables: ``{table_name: rows}``; each table is saved as ``{stem}-{table_name}.csv``.
        meta: Settings and labels (model, layer, damping, …), saved in ``{stem}.json``.
    """

    name: str
    tables: dict[str, list[dict[str, Any]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """The rows of one table."""
        if table not in self.tables:
            raise KeyError(f"{self.name} data has no table {table!r}; it has {list(self.tables)}")
        return self.tables[table]

    def save(self, folder: str | Path, stem: str) -> list[Path]:
        """Write ``{stem}-{table}.csv`` per table and ``{stem}.json`` (settings, column types).

        Floats are written with 8 significant digits, enough to redraw any figure.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths, types = [], {}
        for key, rows in self.tables.items():
            columns = list(rows[0]) if rows else []
            types[key] = {c: _column_type(rows[0][c]) for c in columns}
            path = folder / f"{stem}-{key}.csv"
            with replacing(path) as tmp, tmp.open("w", newline="") as f:  # whole or not at all
                writer = csv.writer(f)
                writer.writerow(columns)
                for row in rows:
                    writer.writerow(
                        [
                            format(row[c], ".8g") if isinstance(row[c], float) else row[c]
                            for c in columns
                        ]
                    )
            paths.append(path)
        path = folder / f"{stem}.json"
        info = {"name": self.name, "meta": self.meta, "tables": types}
        write_text(path, json.dumps(info, indent=2) + "\n")
        return [*paths, path]

    @classmethod
    def load(cls, folder: str | Path, stem: str) -> FigureData:
        """Read what :meth:`save` wrote (the same rows, floats to 8 significant digits)."""
        folder = Path(folder)
        info = json.loads((folder / f"{stem}.json").read_text())
        tables = {}
        for key, types in info["tables"].items():
            with (folder / f"{stem}-{key}.csv").open(newline="") as f:
                reader = csv.DictReader(f)
                tables[key] = [{c: _PARSERS[types[c]](row[c]) for c in types} for row in reader]
        return cls(info["name"], tables, info["meta"])


def matrix_rows(matrices: Mapping[str, Tensor], key: str = "matrix") -> list[dict[str, Any]]:
    """Square matrices of one size as wide rows ``{key, row, c0, c1, …}`` (for CSV)."""
    rows = []
    for name, m in matrices.items():
        values = m.detach().double().cpu().tolist()
        for i, line in enumerate(values):
            rows.append({key: name, "row": i, **{f"c{j}": v for j, v in enumerate(line)}})
    return rows


def rows_to_matrices(rows: Sequence[Mapping[str, Any]], key: str = "matrix") -> dict[str, Tensor]:
    """Inverse of :func:`matrix_rows`: ``{name: Tensor[n, n]}`` (float64)."""
    out: dict[str, list[list[float]]] = {}
    for row in rows:
        columns = [c for c in row if c.startswith("c") and c[1:].isdigit()]
        out.setdefault(row[key], []).append([row[c] for c in columns])
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items()}


__all__ = ["FigureData", "matrix_rows", "rows_to_matrices"]
