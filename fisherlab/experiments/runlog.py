"""A run's folder: the lock, ``config.json``, ``log.csv``/``log.json``, and reading runs back."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fisherlab.conventions import FisherlabError
from fisherlab.experiments.config import ROW_KEYS, RunConfig, environment


# ----------------------------------------------------------------------------- logging
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


#: Statuses of a run that ended (its folder is not overwritten without ``overwrite=True``).
ENDED = ("finished", "diverged", "failed", "interrupted")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLogger:
    """Writes ``config.json`` once and ``log.csv``/``log.json`` after every epoch (atomically).

    The folder is locked while the run writes it (``.lock``: process id, host, run, start): a
    second writer is refused with a message naming the first, a lock left by a process that no
    longer runs is taken over. A folder holding an ended run is not overwritten unless
    ``overwrite``.

    Args:
        folder: The run's folder (created).
        cfg: The resolved config.
        overwrite: Replace an ended run in ``folder``.

    Raises:
        FisherlabError: when another live process writes the folder, or it holds an ended run
            and ``overwrite`` is false.
    """

    def __init__(self, folder: str | os.PathLike, cfg: RunConfig, overwrite: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = self.folder / ".lock"
        self._take_lock(cfg)
        try:
            self._check_ended(overwrite)
            self.meta = {"run": cfg.to_dict(), "environment": environment(cfg)}
            _write_atomic(self.folder / "config.json", json.dumps(self.meta, indent=2) + "\n")
        except BaseException:
            self.close()
            raise

    def _take_lock(self, cfg: RunConfig) -> None:
        mine = {
            "pid": os.getpid(),
            "host": platform.node(),
            "run": cfg.label,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.lock.read_text())
                except (OSError, json.JSONDecodeError):
                    other = {}
                same_host = other.get("host") == platform.node()
                if same_host and isinstance(other.get("pid"), int) and not _alive(other["pid"]):
                    self.lock.unlink(missing_ok=True)  # left by a process that ended
                    continue
                raise FisherlabError(
                    f"run folder {self.folder} is being written by another run "
                    f"({other.get('run', '?')}, process {other.get('pid', '?')} on "
                    f"{other.get('host', '?')}, since {other.get('started', '?')}); choose "
                    f"another --out, or remove {self.lock} if that run is gone"
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(mine, handle)
            return

    def _check_ended(self, overwrite: bool) -> None:
        try:
            old = json.loads((self.folder / "log.json").read_text())
        except (OSError, json.JSONDecodeError):
            return
        if old.get("status") in ENDED and not overwrite:
            label = old.get("run", {}).get("label") or "a run"
            raise FisherlabError(
                f"run folder {self.folder} holds an ended run ({old['status']}: {label}); pass "
                "--overwrite (overwrite=True) to replace it, or choose another --out"
            )

    def close(self) -> None:
        """Release the folder."""
        self.lock.unlink(missing_ok=True)

    def write(self, rows: Sequence[dict[str, Any]], status: str, note: str = "") -> None:
        """Rewrite the logs with ``rows`` and the run's ``status``."""
        buf = [",".join(ROW_KEYS)]
        for row in rows:
            buf.append(",".join("" if row.get(k) is None else repr(row[k]) for k in ROW_KEYS))
        _write_atomic(self.folder / "log.csv", "\n".join(buf) + "\n")
        payload = {**self.meta, "status": status, "note": note, "rows": list(rows)}
        _write_atomic(self.folder / "log.json", json.dumps(_json_safe(payload), indent=2) + "\n")


@dataclass
class RunResult:
    """The outcome of :func:`train`: the config as run, per-epoch rows and the status."""

    config: RunConfig
    rows: list[dict[str, Any]]
    status: str
    folder: Path | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def final(self) -> dict[str, Any]:
        """The last row."""
        return self.rows[-1]


# ----------------------------------------------------------------------------- reading
def load_run(folder: str | os.PathLike) -> RunResult:
    """Read a run's ``log.json`` (and its config) back.

    Raises:
        FisherlabError: If the folder has no ``log.json``.
    """
    folder = Path(folder)
    path = folder / "log.json"
    if not path.is_file():
        raise FisherlabError(f"{folder} is not a run folder (no log.json)")
    payload = json.loads(path.read_text())
    rows = [{k: math.nan if v is None else v for k, v in r.items()} for r in payload["rows"]]
    return RunResult(
        RunConfig.from_dict(payload["run"]),
        rows,
        payload["status"],
        folder,
        payload.get("environment", {}),
        payload.get("note", ""),
    )


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders (holding ``log.json``) at or below ``paths``, sorted, without repeats."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p)
        if (p / "log.json").is_file():
            found.add(p)
        elif p.is_dir():
            found.update(q.parent for q in p.rglob("log.json"))
        elif p.name == "log.json" and p.is_file():
            found.add(p.parent)
    return sorted(found)


REUSE_KEYS = ("model_file_sha256", "data_fingerprint")


def _same_run(folder: Path, cfg: RunConfig) -> bool:
    """Whether ``folder`` holds a finished run of exactly ``cfg``.

    The same config, model file (its SHA-256) and data files (:func:`data_fingerprint`).
    """
    try:
        old = load_run(folder)
    except (FisherlabError, OSError, json.JSONDecodeError, KeyError):
        return False
    if old.status not in ("finished", "diverged", "failed") or old.config != cfg:
        return False
    now = environment(cfg)
    return all(old.environment.get(key) == now.get(key) for key in REUSE_KEYS)
