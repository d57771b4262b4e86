"""Fingerprints of what a run's results depend on besides its config: model code and data.

A finished run is reused only when these match (:data:`~fisherlab.experiments.runlog.REUSE_KEYS`):

* the model: for ``path/to/file.py:factory``, the SHA-256 of that file *and* of every module it
  imports from its own folder (or package), followed transitively through ``import x``,
  ``from x import y`` and relative imports (:func:`model_sources`); for a registered model
  (``mlp``, ``cnn``, ``3c1f``), the source of its builder;
* the data: the content of every file the data set is read from, default folders included
  (:func:`fisherlab.data.fingerprint`).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
from pathlib import Path

from fisherlab import data, models


def _module_files(base: Path, parts: list[str]) -> list[Path]:
    """The files that importing ``parts`` below ``base`` runs: packages' ``__init__``, module."""
    found = []
    for i in range(1, len(parts) + 1):
        stem = base.joinpath(*parts[:i])
        for candidate in (stem / "__init__.py", stem.with_suffix(".py")):
            if candidate.is_file():
                found.append(candidate)
    return found


def _imports(file: Path, root: Path) -> list[Path]:
    """Local files ``file`` imports: resolved under ``root`` (absolute) or its package."""
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except (SyntaxError, ValueError):
        return []  # its bytes are hashed; importing it will say what is wrong
    found: list[Path] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += _module_files(root, alias.name.split("."))
        elif isinstance(node, ast.ImportFrom):
            base = root
            if node.level:
                base = file.parent
                for _ in range(node.level - 1):
                    base = base.parent
            parts = node.module.split(".") if node.module else []
            found += _module_files(base, parts) if parts else []
            for alias in node.names:  # `from pkg import mod` imports a module too
                found += _module_files(base, [*parts, alias.name])
    return found


def model_sources(file: str | os.PathLike) -> list[Path]:
    """The model file and every local module it imports, transitively, sorted.

    Local means under the file's folder (put on ``sys.path`` when it is imported), or, for
    relative imports, its package.
    """
    file = Path(file).resolve()
    root = file.parent
    seen: set[Path] = set()
    todo = [file]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [p.resolve() for p in _imports(current, root)]
    return sorted(seen)


def _builtin_fingerprint(name: str) -> tuple[str, list[str]] | None:
    """SHA-256 of a registered model's builder and its sizing for the data (their source)."""
    entry = models.MODELS.get(name)
    if entry is None:
        return None
    try:
        source = inspect.getsource(entry.build) + inspect.getsource(entry.for_data)
    except (OSError, TypeError):  # no source shipped: fisherlab's version stands for it
        return None
    return hashlib.sha256(source.encode()).hexdigest(), [f"fisherlab.models.{entry.build.__name__}"]


def model_fingerprint(spec: str) -> tuple[str, list[str]] | None:
    """SHA-256 over a model's code, and what it covers.

    For ``file.py:factory``: the file and every local module it imports (:func:`model_sources`,
    named relative to the file's folder); for a registered name: its builder's source.

    Returns:
        ``(digest, names)``, or ``None`` for a missing file.
    """
    if ":" not in spec:
        return _builtin_fingerprint(spec)
    file = Path(spec.rpartition(":")[0])
    if not file.is_file():
        return None
    root = file.resolve().parent
    digest = hashlib.sha256()
    names = []
    for path in model_sources(file):
        name = os.path.relpath(path, root)
        names.append(name)
        digest.update(f"{name}|".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), names


def data_fingerprint(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The content digest of data set ``name``'s files (:func:`fisherlab.data.fingerprint`)."""
    return data.fingerprint(name, data_dir)


__all__ = ["data_fingerprint", "model_fingerprint", "model_sources"]
