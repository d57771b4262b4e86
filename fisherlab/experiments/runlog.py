"""A run's folder: the lock, ``config.json``, ``log.csv``/``log.json``, and reading runs back."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fisherlab.conventions import FisherlabError, FisherlabWarning
from fisherlab.experiments.config import ROW_KEYS, RunConfig, environment
from fisherlab.files import WriteError, make_folder, write_text


# ----------------------------------------------------------------------------- logging
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


#: Statuses of a run that ended (its folder is not overwritten without ``overwrite=True``).
ENDED = ("finished", "diverged", "failed", "interrupted")


def _remove_if_empty(folder: Path) -> None:
    """Remove a folder this run created, when a refusal leaves it empty."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunFolderWarning(FisherlabWarning):
    """What a run folder held before a run restarted in it (said once, at the start)."""


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key old → new`` for every setting that differs between two configs' dicts."""
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class RunLogger:
    """Writes ``config.json`` once and ``log.csv``/``log.json`` after every epoch (atomically).

    The folder is locked while the run writes it (``.lock``: process id, host, run, start): a
    second writer is refused with a message naming the first, a lock left by a process that no
    longer runs is taken over. What the folder already holds is never replaced by accident:

    * an ended run (:data:`ENDED`) is replaced only with ``overwrite`` (and a
      :class:`RunFolderWarning` names the settings that changed);
    * a run that did not end (status ``running`` or only a ``config.json``: its process was
      killed) of *another* configuration is replaced only with ``overwrite``; one of the same
      configuration restarts from epoch 0 (no checkpoints are kept), and a
      :class:`RunFolderWarning` says what was there;
    * a ``log.json`` that cannot be read is replaced only with ``overwrite``.

    Args:
        folder: The run's folder (created).
        cfg: The resolved config.
        overwrite: Replace whatever run ``folder`` holds.

    Raises:
        FisherlabError: when another live process writes the folder, or it holds a run that
            may not be replaced (see above).
        WriteError: when the folder cannot be written.
    """

    def __init__(self, folder: str | os.PathLike, cfg: RunConfig, overwrite: bool = False):
        self.folder = Path(folder)
        created = not self.folder.exists()
        make_folder(self.folder)
        self.lock = self.folder / ".lock"
        self.notice = ""
        self.previous_process: dict[str, Any] = {}
        try:
            self._take_lock(cfg)
        except BaseException:
            if created:
                _remove_if_empty(self.folder)
            raise
        try:
            self._check_previous(cfg, overwrite)
            self.meta = {
                "run": cfg.to_dict(),
                "environment": environment(cfg),
                "process": {"pid": os.getpid(), "host": platform.node()},
            }
            write_text(self.folder / "config.json", json.dumps(self.meta, indent=2) + "\n")
        except BaseException:
            self.close()
            if created:
                _remove_if_empty(self.folder)
            raise
        if self.notice:
            warnings.warn(self.notice, RunFolderWarning, stacklevel=2)

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
                    self.previous_process = other
                    continue
                raise FisherlabError(
                    f"run folder {self.folder} is being written by another run "
                    f"({other.get('run', '?')}, process {other.get('pid', '?')} on "
                    f"{other.get('host', '?')}, since {other.get('started', '?')}); choose "
                    f"another --out, or remove {self.lock} if that run is gone"
                ) from None
            except OSError as err:
                raise WriteError(
                    f"cannot write into the run folder {self.folder}: {err.strerror or err}"
                ) from err
            with os.fdopen(fd, "w") as handle:
                json.dump(mine, handle)
            return

    def _check_previous(self, cfg: RunConfig, overwrite: bool) -> None:
        """Refuse (or describe) what the folder holds; see the class docstring."""
        log, config = self.folder / "log.json", self.folder / "config.json"
        if not log.exists() and not config.exists():
            return
        try:
            old = json.loads((log if log.exists() else config).read_text())
            old_run = old["run"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            if overwrite:
                return
            raise FisherlabError(
                f"run folder {self.folder} holds a {log.name if log.exists() else config.name} "
                f"that cannot be read ({type(err).__name__}); pass --overwrite "
                "(overwrite=True) to replace it, or choose another --out"
            ) from None
        status = old.get("status", "running") if log.exists() else "running"
        try:
            label = RunConfig.from_dict(old_run).label
        except (FisherlabError, TypeError):  # written by another version
            label = "a run"
        changes = _config_changes(old_run, json.loads(json.dumps(cfg.to_dict())))
        shown = "; ".join(changes[:3]) + ("; …" if len(changes) > 3 else "")
        if status in ENDED:
            if not overwrite:
                raise FisherlabError(
                    f"run folder {self.folder} holds an ended run ({status}: {label}); pass "
                    "--overwrite (overwrite=True) to replace it, or choose another --out"
                )
            if changes:  # asked for, yet a result goes: say which
                self.notice = (
                    f"replacing the {status} run in {self.folder} ({label}) by another "
                    f"configuration ({shown})"
                )
            return
        # a run that did not end: its writer is gone (we hold the lock)
        epochs = len(old.get("rows", [])) - 1 if log.exists() else -1
        logged = f"epochs 0-{epochs} logged" if epochs >= 0 else "no epoch logged"
        pid = self.previous_process.get("pid") or (old.get("process") or {}).get("pid")
        gone = f"its process {pid} is gone" if pid else "its process is gone"
        what = f"a run that did not end (status {status}, {logged}; {gone}, killed?)"
        if changes and not overwrite:
            raise FisherlabError(
                f"run folder {self.folder} holds {what} of another configuration ({shown}); "
                "pass --overwrite (overwrite=True) to replace it, or choose another --out"
            )
        if not changes:
            self.notice = (
                f"run folder {self.folder} holds {what} of this configuration; no checkpoint "
                "is kept (model and optimizer states are not saved), so it restarts from epoch 0"
            )
        else:
            self.notice = f"replacing {what} in {self.folder} by another configuration ({shown})"

    def close(self) -> None:
        """Release the folder."""
        self.lock.unlink(missing_ok=True)

    def write(self, rows: Sequence[dict[str, Any]], status: str, note: str = "") -> None:
        """Rewrite the logs with ``rows`` and the run's ``status``."""
        buf = [",".join(ROW_KEYS)]
        for row in rows:
            buf.append(",".join("" if row.get(k) is None else repr(row[k]) for k in ROW_KEYS))
        write_text(self.folder / "log.csv", "\n".join(buf) + "\n")
        payload = {**self.meta, "status": status, "note": note, "rows": list(rows)}
        write_text(self.folder / "log.json", json.dumps(_json_safe(payload), indent=2) + "\n")


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
        FisherlabError: If the folder has no ``log.json``, or one that is not valid JSON or
            lacks the run, its status or its rows (one line naming the file).
    """
    folder = Path(folder)
    path = folder / "log.json"
    if not path.is_file():
        raise FisherlabError(f"{folder} is not a run folder (no log.json)")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FisherlabError(f"{path} is not valid JSON ({err}): a damaged run log") from None
    try:
        rows = [{k: math.nan if v is None else v for k, v in r.items()} for r in payload["rows"]]
        config = RunConfig.from_dict(payload["run"], f"{path}: run")
        status = payload["status"]
    except (KeyError, TypeError, AttributeError) as err:
        what = f"no {err}" if isinstance(err, KeyError) else f"a malformed entry ({err})"
        raise FisherlabError(f"{path} is an incomplete run log: {what}") from None
    if not rows or not all("epoch" in r for r in rows) or not isinstance(status, str):
        raise FisherlabError(f"{path} is an incomplete run log: no epoch rows")
    return RunResult(
        config, rows, status, folder, payload.get("environment", {}), payload.get("note", "")
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


REUSE_KEYS = ("model_sha256", "data_sha256")
"""What a run depends on besides its config, compared before a finished run is reused."""


def _same_run(folder: Path, cfg: RunConfig) -> bool:
    """Whether ``folder`` holds a finished run of exactly ``cfg``.

    The same config, model code and data content (:mod:`~fisherlab.experiments.fingerprint`).
    """
    try:
        old = load_run(folder)
    except (FisherlabError, OSError, json.JSONDecodeError, KeyError):
        return False
    if old.status not in ("finished", "diverged", "failed") or old.config != cfg:
        return False
    now = environment(cfg)
    return all(old.environment.get(key) == now.get(key) for key in REUSE_KEYS)
