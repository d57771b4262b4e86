"""Optimizers head to head: a reproducible training loop, complete logs, grid search, curves.

One run trains one model with one optimizer and one seed (:func:`train`). It writes, into its
folder, ``config.json`` (everything needed to repeat it: :meth:`RunConfig.from_dict` reads it
back) and, after every finished epoch, ``log.csv`` and ``log.json`` with one row per epoch:

* ``train_loss``/``train_accuracy``: the whole training set, evaluated after the epoch;
  ``train_loss_running``: the mean of the epoch's mini-batch losses;
* ``test_loss``/``test_accuracy``;
* ``time_s``: cumulative training wall time (forward, backward, optimizer step, batching; the
  evaluations are excluded), ``epoch_time_s`` its increment;
* ``step_time_s``: the wall time inside ``optimizer.step()`` during the epoch, this module's
  definition of *time spent in curvature work*. For fisherlab's optimizers it covers the
  factor updates, decompositions, solves and the parameter update; the statistics that their
  hooks store during forward and backward are not in it (they are in ``forward_backward_s``).
  For SGD and Adam it is their own step time, the baseline to compare with.
* ``skipped_steps``: steps a fisherlab optimizer refused because of non-finite statistics.

Row 0 evaluates the initial model (time 0), so curves of all optimizers start at one point.
A run stops early with status ``"diverged"`` when its loss is no longer finite. On
``KeyboardInterrupt`` the finished epochs are already on disk; the log is marked
``"interrupted"`` and the interrupt propagates.

Reproducibility: :func:`train` seeds ``torch``, ``numpy`` and ``random`` with the run's seed,
initialises the model right after seeding, and shuffles with its own ``torch.Generator`` (on the
CPU, whatever the device). On the CPU the same config and seed give bit-identical per-epoch
losses in one environment (same torch build and thread count, both recorded in ``config.json``).

Grid search (:func:`grid_search`) trains every learning rate × damping pair for the same budget
and selects, at every epoch, the pair with the best criterion at that epoch (mean over the grid
seeds): the per-epoch best selection of the EKFAC paper. The pair that is best at the last
epoch is the tuned setting that :func:`compare_optimizers` uses for its seeded runs.

Example:
    >>> from fisherlab.experiments import RunConfig, train
    >>> cfg = RunConfig(optimizer="kfac", epochs=1, train_subset=64, test_subset=64, batch_size=32)
    >>> result = train(cfg, progress=False)
    >>> [row["epoch"] for row in result.rows], result.status
    ([0, 1], 'finished')
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab import datasets, models, optim
from fisherlab.conventions import FisherlabError
from fisherlab.data import Split
from fisherlab.report import save_table

FIRST_ORDER = ("sgd", "adam")
OPTIMIZER_NAMES: tuple[str, ...] = (*FIRST_ORDER, *optim.OPTIMIZERS)
"""Every optimizer :func:`train` knows: SGD, Adam and fisherlab's curvature optimizers."""

BUILTIN_MODELS = ("mlp", "cnn", "3c1f")

DEFAULT_HYPER: dict[str, dict[str, float | None]] = {
    "sgd": {"lr": 0.3, "damping": None},
    "adam": {"lr": 0.01, "damping": None},
    "kfac": {"lr": 0.3, "damping": 1.0},
    "ekfac": {"lr": 3e-4, "damping": 1e-4},
    "ekfac-ra": {"lr": 0.3, "damping": 1.0},
    "tengrad": {"lr": 0.3, "damping": 1.0},
    "skfac": {"lr": 0.03, "damping": 0.1},
    "fngd": {"lr": 0.3, "damping": 1.0},
}
"""Learning rate and damping used when a run gives none: the grid search's choice for the digits
MLP (10 epochs, batch 64, momentum 0.9; lowest training loss over 42 lr × damping points).

``configs/digits.json`` keeps the per-model values (the small CNN's differ); other data sets and
models deserve their own search (``fisherlab train --grid``). On digits the curvature
optimizers' results depend mostly on ``lr/damping``: e.g. KFAC reaches almost the same loss at
(0.3, 1), (0.03, 0.1) and (0.003, 0.01).
"""

DEFAULT_GRID: dict[str, dict[str, list[float]]] = {
    "sgd": {"lr": [0.01, 0.03, 0.1, 0.3]},
    "adam": {"lr": [3e-4, 1e-3, 3e-3, 1e-2]},
    "*": {"lr": [1e-3, 3e-3, 1e-2, 3e-2], "damping": [1e-3, 1e-2, 1e-1, 1.0]},
}
"""The grid of :func:`grid_search` per optimizer (``"*"``: every curvature optimizer)."""

DEFAULT_TARGETS = {"digits": 0.95, "fashion-mnist": 0.85, "mnist": 0.97, "cifar10": 0.6}
"""Test accuracy of the time-to-target table when none is given."""

SELECT_CRITERIA = {"train_loss": min, "test_loss": min, "test_accuracy": max}
"""Grid-search criteria and whether lower (``min``) or higher (``max``) is better."""

ROW_KEYS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "train_loss_running",
    "test_loss",
    "test_accuracy",
    "time_s",
    "epoch_time_s",
    "step_time_s",
    "forward_backward_s",
    "eval_time_s",
    "steps",
    "skipped_steps",
)
"""Columns of ``log.csv``, in order."""


# --------------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    """Everything that defines one training run; ``config.json`` holds :meth:`to_dict`.

    Args:
        optimizer: One of :data:`OPTIMIZER_NAMES`.
        model: ``"mlp"``, ``"cnn"``, ``"3c1f"`` or ``"path/to/file.py:factory"``.
        data: One of :data:`fisherlab.datasets.DATASETS`.
        data_dir: Folder of the local data files (not needed for digits).
        epochs: Passes over the training set.
        batch_size: Mini-batch size (the last batch of an epoch may be smaller).
        lr: Learning rate (``None``: :data:`DEFAULT_HYPER`).
        damping: Damping ``λ`` of the curvature optimizers (``None``: :data:`DEFAULT_HYPER`;
            ignored by SGD and Adam).
        momentum: Heavy-ball momentum of SGD and the curvature optimizers (Adam: ``β₁``).
        weight_decay: Weight decay (decoupled in fisherlab's optimizers, L2 in SGD/Adam).
        fisher_type: ``"empirical"`` or ``"mc"`` for the curvature optimizers.
        optimizer_options: Further keyword arguments of the optimizer's constructor.
        seed: Seed of initialisation and shuffling.
        split_seed: Seed of the train/test split (digits), fixed across seeds by default.
        device: ``"cpu"`` or ``"cuda"``.
        train_subset: Use only the first ``n`` training samples (``None``: all).
        test_subset: Use only the first ``n`` test samples.
        eval_train: Evaluate the whole training set after each epoch (else ``train_loss`` is
            the running mean of the mini-batch losses).
        eval_batch_size: Batch size of the evaluations.
        threads: ``torch.set_num_threads`` during the run, restored after it (``None``: leave
            as is). One thread gives the steadiest timings of small models on a busy machine.
        tag: Free label; runs tagged ``"grid"`` are left out of curves by default.
    """

    optimizer: str = "kfac"
    model: str = "mlp"
    data: str = "digits"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None
    damping: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    fisher_type: str = "empirical"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    split_seed: int = 0
    device: str = "cpu"
    train_subset: int | None = None
    test_subset: int | None = None
    eval_train: bool = True
    eval_batch_size: int = 1024
    threads: int | None = None
    tag: str = ""

    def resolved(self) -> RunConfig:
        """A checked copy with the default learning rate and damping filled in.

        Raises:
            FisherlabError: Naming the first invalid field.
        """
        cfg = copy.deepcopy(self)
        if cfg.optimizer not in OPTIMIZER_NAMES:
            raise FisherlabError(
                f"unknown optimizer {cfg.optimizer!r}; choose from {list(OPTIMIZER_NAMES)}"
            )
        if cfg.data not in datasets.DATASETS:
            raise FisherlabError(
                f"unknown data set {cfg.data!r}; choose from {list(datasets.DATASETS)}"
            )
        if cfg.model not in BUILTIN_MODELS and ":" not in cfg.model:
            raise FisherlabError(
                f"unknown model {cfg.model!r}; choose from {list(BUILTIN_MODELS)} or give "
                "'path/to/file.py:factory'"
            )
        if cfg.device not in ("cpu", "cuda"):
            raise FisherlabError(f"device must be 'cpu' or 'cuda', got {cfg.device!r}")
        defaults = DEFAULT_HYPER[cfg.optimizer]
        if cfg.lr is None:
            cfg.lr = defaults["lr"]
        if cfg.optimizer in FIRST_ORDER:
            cfg.damping = None
        elif cfg.damping is None:
            cfg.damping = defaults["damping"]
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FisherlabError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("train_subset", "test_subset", "threads"):
            value = getattr(cfg, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise FisherlabError(f"{name} must be an integer or null, got {value!r}")
            if value is not None and value < 1:
                raise FisherlabError(f"{name} must be >= 1, got {value!r}")
        if not (isinstance(cfg.lr, int | float) and math.isfinite(cfg.lr) and cfg.lr > 0):
            raise FisherlabError(f"lr must be a positive number, got {cfg.lr!r}")
        if not 0 <= cfg.momentum < 1:
            raise FisherlabError(f"momentum must lie in [0, 1), got {cfg.momentum!r}")
        if cfg.fisher_type != "empirical" and cfg.optimizer in FIRST_ORDER:
            raise FisherlabError(
                f"--fisher-type applies to curvature optimizers, not {cfg.optimizer}"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """The config of a dict such as :meth:`to_dict` or a ``config.json``'s ``"run"`` entry.

        Raises:
            FisherlabError: For keys that are not fields (typos in config files).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FisherlabError(
                f"unknown run setting(s) {unknown}; valid ones are {sorted(names)}"
            )
        return cls(**values)

    @property
    def label(self) -> str:
        """Short description, e.g. ``kfac mlp digits seed 0``."""
        return f"{self.optimizer} {Path(self.model).name} {self.data} seed {self.seed}"


# ---------------------------------------------------------------------------- building
def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global state user factories may draw from)
    torch.manual_seed(seed)


def load_split(cfg: RunConfig) -> Split:
    """The data of a run, before subsetting (float32, on the CPU)."""
    return datasets.load(cfg.data, cfg.data_dir, seed=cfg.split_seed)


def build_model(spec: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A model for inputs of ``input_shape`` (``[C, H, W]``) and ``num_classes`` outputs.

    Args:
        input_shape: Shape of one input, e.g. ``(1, 8, 8)``.
        num_classes: Number of outputs.
        spec: ``"mlp"`` (hidden widths 128 and 64, tanh), ``"cnn"`` (:func:`fisherlab.models.
            small_cnn`), ``"3c1f"`` (:func:`fisherlab.models.three_conv_one_fc`) or
            ``"path/to/file.py:factory"``, called with the keyword arguments ``input_shape`` and
            ``num_classes`` its signature accepts.
    """
    import inspect

    shape = tuple(int(s) for s in input_shape)
    if spec == "mlp":
        return models.mlp(int(np.prod(shape)), (128, 64), num_classes)
    if spec in ("cnn", "3c1f"):
        if len(shape) != 3 or shape[1] != shape[2]:
            raise FisherlabError(f"model {spec!r} needs square images [C, H, H], got {shape}")
        return models.build(
            spec, in_channels=shape[0], image_size=shape[1], num_classes=num_classes
        )
    try:
        factory = models.load_factory(spec)
    except ValueError as err:
        raise FisherlabError(str(err)) from err
    offered = {"input_shape": shape, "num_classes": num_classes}
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    except (TypeError, ValueError):  # no signature (some builtins): call without arguments
        kwargs = {}
    try:
        model = factory(**kwargs)
    except Exception as err:  # the user's code: one clear line instead of its traceback
        raise FisherlabError(
            f"the model factory {spec} raised {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise FisherlabError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def make_optimizer(
    cfg: RunConfig, model: nn.Module, steps_per_epoch: int, loss_fn: nn.Module
) -> torch.optim.Optimizer:
    """The optimizer of a resolved config for ``model``."""
    opts = dict(cfg.optimizer_options)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            **opts,
        )  # fmt: skip
    if cfg.optimizer == "adam":
        opts.setdefault("betas", (cfg.momentum, 0.999))
        return torch.optim.Adam(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **opts
        )
    if cfg.optimizer == "fngd":
        opts.setdefault("steps_per_epoch", steps_per_epoch)
    cls = optim.OPTIMIZERS[cfg.optimizer]
    return cls(
        model, lr=cfg.lr, damping=cfg.damping, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, fisher_type=cfg.fisher_type, loss_fn=loss_fn, **opts,
    )  # fmt: skip


def environment(cfg: RunConfig) -> dict[str, Any]:
    """What the results depend on besides the config: versions, threads, device, machine."""
    import fisherlab

    env: dict[str, Any] = {
        "fisherlab": fisherlab.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if cfg.device == "cuda" and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    if ":" in cfg.model:
        path = Path(cfg.model.rpartition(":")[0])
        if path.is_file():
            env["model_file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if cfg.data_dir is not None:
        env["data_fingerprint"] = data_fingerprint(cfg.data_dir)
    return env


def data_fingerprint(folder: str | os.PathLike) -> str:
    """A digest of the files under a data folder (names, sizes, modification times)."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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


# ------------------------------------------------------------------------------ training
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total += float(nn.functional.cross_entropy(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
    model.train(was_training)
    n = max(x.shape[0], 1)
    return total / n, correct / n


def train(
    cfg: RunConfig,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    split: Split | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train one model with one optimizer and seed; log every epoch (see the module docstring).

    Args:
        cfg: The run (resolved here: defaults filled in, values checked).
        out: The run's folder for ``config.json``, ``log.csv`` and ``log.json`` (``None``: no
            files).
        progress: Show a progress bar (on stderr).
        split: The data, if already loaded (saves reading files again in a sweep).
        on_epoch: Called with each finished epoch's row.
        overwrite: Replace an ended run in ``out`` (otherwise refused); ``out`` is locked
            while the run writes it (:class:`RunLogger`).

    Returns:
        The rows (epoch 0 is the initial model) and the status: ``"finished"``, ``"diverged"``
        (non-finite loss: the run stops) or ``"failed"`` (the optimizer raised: the run stops,
        the error is in ``note`` and the log, and a ``RuntimeWarning`` says so).

    Raises:
        KeyboardInterrupt: After writing the finished epochs with status ``"interrupted"``.
    """
    cfg = cfg.resolved()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FisherlabError("--device cuda was asked for but torch sees no CUDA device")
    device = torch.device(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None and cfg.threads != threads_before:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, device, out, progress, split, on_epoch, overwrite)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _train(
    cfg: RunConfig,
    device: torch.device,
    out: str | os.PathLike | None,
    progress: bool,
    split: Split | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    overwrite: bool = False,
) -> RunResult:
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    split = split if split is not None else load_split(cfg)
    x_train = split.x_train[: cfg.train_subset]
    steps_per_epoch = math.ceil(x_train.shape[0] / cfg.batch_size)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, split.input_shape, split.num_classes).to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = make_optimizer(cfg, model, steps_per_epoch, loss_fn)  # bad options: nothing written
    try:
        logger = RunLogger(out, cfg, overwrite) if out is not None else None
    except BaseException:
        getattr(opt, "close", lambda: None)()
        raise
    try:
        return _epochs(cfg, device, split, model, opt, loss_fn, logger, progress, on_epoch)
    finally:
        if logger is not None:
            logger.close()


def _epochs(
    cfg: RunConfig,
    device: torch.device,
    split: Split,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    logger: RunLogger | None,
    progress: bool,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> RunResult:
    """The run itself, its folder (if any) locked meanwhile."""
    out = logger.folder if logger is not None else None
    x_train, y_train = split.x_train[: cfg.train_subset], split.y_train[: cfg.train_subset]
    x_test, y_test = split.x_test[: cfg.test_subset], split.y_test[: cfg.test_subset]
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_test, y_test = x_test.to(device), y_test.to(device)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    mc = cfg.fisher_type == "mc"

    def eval_row(epoch: int) -> dict[str, Any]:
        start = time.perf_counter()
        test_loss, test_acc = evaluate(model, x_test, y_test, cfg.eval_batch_size)
        train_loss, train_acc = (
            evaluate(model, x_train, y_train, cfg.eval_batch_size)
            if cfg.eval_train
            else (None, None)
        )
        return {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "train_loss_running": None,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "eval_time_s": time.perf_counter() - start,
        }

    row0 = eval_row(0)
    rows = [
        {
            **row0,
            "time_s": 0.0,
            "epoch_time_s": 0.0,
            "step_time_s": 0.0,
            "forward_backward_s": 0.0,
            "steps": 0,
            "skipped_steps": 0,
        }
    ]
    if logger:
        logger.write(rows, "running")
    status, note, wall, steps = "running", "", 0.0, 0
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch, desc=cfg.label, disable=not progress, leave=False
    )
    model.train()
    try:
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(n, generator=shuffle).to(device)
            running = torch.zeros((), dtype=torch.float64, device=device)
            step_s = fb_s = 0.0
            seen = 0
            skipped_before = getattr(opt, "skipped_steps", 0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _sync(device)
                epoch_start = time.perf_counter()
                try:
                    for i in range(steps_per_epoch):
                        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                        t0 = time.perf_counter()
                        opt.zero_grad(set_to_none=True)
                        loss = loss_fn(model(x_train[idx]), y_train[idx])
                        if mc:
                            opt.mc_backward()
                        loss.backward()
                        _sync(device)
                        t1 = time.perf_counter()
                        if not bool(torch.isfinite(loss)):
                            status = "diverged"
                            note = f"non-finite training loss at step {steps + 1}"
                            break
                        opt.step()
                        _sync(device)
                        t2 = time.perf_counter()
                        fb_s += t1 - t0
                        step_s += t2 - t1
                        running += loss.detach().double() * idx.numel()
                        seen += idx.numel()
                        steps += 1
                        bar.update(1)
                except Exception as err:  # a crash in the optimizer: log it, end the run
                    status = "failed"
                    note = f"step {steps + 1}: {type(err).__name__}: {err}"
                _sync(device)
                epoch_s = time.perf_counter() - epoch_start
            for w in caught:
                if not (issubclass(w.category, RuntimeWarning) and "skipped" in str(w.message)):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            # the optimizer's own counter (torch optimizers skip nothing)
            skipped = getattr(opt, "skipped_steps", 0) - skipped_before
            wall += epoch_s
            row = eval_row(epoch)
            row["train_loss_running"] = float(running) / seen if seen else math.nan
            if not cfg.eval_train:
                row["train_loss"] = row["train_loss_running"]
            row.update(
                time_s=wall,
                epoch_time_s=epoch_s,
                step_time_s=step_s,
                forward_backward_s=fb_s,
                steps=steps,
                skipped_steps=skipped,
            )
            rows.append(row)
            if status == "running" and not all(
                math.isfinite(row[k]) for k in ("train_loss_running", "test_loss")
            ):
                status, note = "diverged", f"non-finite loss after epoch {epoch}"
            if status == "running" and epoch == cfg.epochs:
                status = "finished"
            bar.set_postfix(
                epoch=epoch, loss=f"{row['train_loss']:.3g}", acc=f"{row['test_accuracy']:.3f}"
            )
            if logger:
                logger.write(rows, status, note)
            if on_epoch is not None:
                on_epoch(row)
            if status in ("diverged", "failed"):
                if status == "failed":
                    warnings.warn(f"{cfg.label} failed at {note}", RuntimeWarning, stacklevel=3)
                break
    except KeyboardInterrupt:
        status = "interrupted"
        note = f"interrupted during epoch {len(rows)}; epochs 0-{len(rows) - 1} are complete"
        if logger:
            logger.write(rows, status, note)
        raise
    finally:
        bar.close()
        close = getattr(opt, "close", None)
        if close is not None:
            close()
    env = logger.meta["environment"] if logger else environment(cfg)
    return RunResult(cfg, rows, status, Path(out) if out is not None else None, env, note)


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


# ------------------------------------------------------------------------- grid search
@dataclass
class GridResult:
    """Outcome of :func:`grid_search`.

    Attributes:
        points: One row per grid point: ``lr``, ``damping``, final metrics (mean over seeds;
            the worst value when a seed stopped early), ``diverged`` and ``failed`` (seeds that
            did) and the run folders.
        per_epoch: One row per epoch: the best point at that epoch and its metrics.
        best: The point best at the last epoch: ``{"lr": …, "damping": …}``.
        select: The criterion.
    """

    points: list[dict[str, Any]]
    per_epoch: list[dict[str, Any]]
    best: dict[str, float | None]
    select: str


def grid_values(optimizer: str, grid: dict[str, Any] | None = None) -> tuple[list, list]:
    """Learning rates and dampings of the grid for ``optimizer``.

    Args:
        optimizer: Its name.
        grid: Like :data:`DEFAULT_GRID` (``None``: that one); missing entries come from it.
    """
    grid = grid or DEFAULT_GRID
    entry = grid.get(optimizer) or grid.get("*" if optimizer not in FIRST_ORDER else optimizer)
    if entry is None:
        entry = DEFAULT_GRID[optimizer if optimizer in FIRST_ORDER else "*"]
    lrs = list(entry["lr"])
    dampings = [None] if optimizer in FIRST_ORDER else list(entry.get("damping", [None]))
    return lrs, dampings


def _point_name(lr: float, damping: float | None) -> str:
    return f"lr={lr:g}" + ("" if damping is None else f",damping={damping:g}")


def _score(rows_by_seed: list[list[dict]], epoch: int, key: str, better: Callable) -> float:
    """Mean of ``key`` at ``epoch`` over seeds; the worst value if a seed has no finite one."""
    worst = math.inf if better is min else -math.inf
    values = []
    for rows in rows_by_seed:
        value = rows[epoch][key] if epoch < len(rows) else None
        if value is None or not math.isfinite(value):
            return worst
        values.append(value)
    return float(np.mean(values))


def grid_search(
    base: RunConfig,
    lrs: Sequence[float] | None = None,
    dampings: Sequence[float | None] | None = None,
    seeds: Sequence[int] = (0,),
    select: str = "train_loss",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    split: Split | None = None,
    force: bool = False,
) -> GridResult:
    """Train every ``lr × damping`` pair for ``base``'s budget and select per epoch.

    Args:
        base: The run; its ``lr``, ``damping`` and ``seed`` are replaced by the grid's.
        lrs: Learning rates (``None``: :data:`DEFAULT_GRID`).
        dampings: Dampings (``None``: :data:`DEFAULT_GRID`; ignored by SGD and Adam).
        seeds: Seeds of every point; scores are means over them.
        select: A key of :data:`SELECT_CRITERIA`.
        out: Folder for the runs (``out/lr=…,damping=…/seed…``) and ``grid.csv/json``,
            ``grid-per-epoch.csv/json``. Finished runs of the same config found there are
            reused, so a grid can be extended or resumed.
        progress: Progress bars.
        split: Preloaded data.
        force: Retrain points that are already there.

    Returns:
        The points, the per-epoch best selection and the point best at the last epoch.
    """
    if select not in SELECT_CRITERIA:
        raise FisherlabError(f"select must be one of {list(SELECT_CRITERIA)}, got {select!r}")
    better = SELECT_CRITERIA[select]
    default_lrs, default_dampings = grid_values(base.optimizer)
    lrs = list(lrs) if lrs else default_lrs
    dampings = [None] if base.optimizer in FIRST_ORDER else list(dampings or default_dampings)
    split = split if split is not None else load_split(base.resolved())
    runs: dict[tuple, list[list[dict]]] = {}
    statuses: dict[tuple, list[str]] = {}
    folders: dict[tuple, list[str]] = {}
    for lr in lrs:
        for damping in dampings:
            key = (lr, damping)
            runs[key], statuses[key], folders[key] = [], [], []
            for seed in seeds:
                cfg = dataclasses.replace(base, lr=lr, damping=damping, seed=seed, tag="grid")
                folder = None
                if out is not None:
                    folder = Path(out) / _point_name(lr, damping) / f"seed{seed}"
                    folders[key].append(str(folder))
                if folder is not None and not force and _same_run(folder, cfg.resolved()):
                    result = load_run(folder)  # a finished point of an earlier search
                else:
                    result = train(cfg, folder, progress=progress, split=split, overwrite=True)
                runs[key].append(result.rows)
                statuses[key].append(result.status)
    epochs = base.epochs
    points = []
    for (lr, damping), rows_by_seed in runs.items():
        final = {
            k: _score(rows_by_seed, epochs, k, min if k != "test_accuracy" else max)
            for k in ("train_loss", "test_loss", "test_accuracy")
        }
        points.append(
            {
                "optimizer": base.optimizer,
                "lr": lr,
                "damping": damping,
                **{f"final_{k}": v for k, v in final.items()},
                "time_s": float(np.mean([r[-1]["time_s"] for r in rows_by_seed])),
                "diverged": statuses[(lr, damping)].count("diverged"),
                "failed": statuses[(lr, damping)].count("failed"),
                "runs": ";".join(folders[(lr, damping)]),
            }
        )
    per_epoch = []
    for epoch in range(1, epochs + 1):
        scored = [(_score(r, epoch, select, better), key) for key, r in runs.items()]
        best_score, (lr, damping) = better(scored, key=lambda s: s[0])
        rows_by_seed = runs[(lr, damping)]
        per_epoch.append(
            {
                "epoch": epoch,
                "lr": lr,
                "damping": damping,
                select: best_score,
                **{
                    k: _score(rows_by_seed, epoch, k, min if k != "test_accuracy" else max)
                    for k in ("train_loss", "test_loss", "test_accuracy", "time_s")
                    if k != select
                },
            }
        )
    best = {"lr": per_epoch[-1]["lr"], "damping": per_epoch[-1]["damping"]}
    result = GridResult(points, per_epoch, best, select)
    if out is not None:
        meta = {
            "base": base.to_dict(),
            "seeds": list(seeds),
            "select": select,
            "best": best,
            "lrs": lrs,
            "dampings": dampings,
        }
        save_table(points, Path(out) / "grid", meta)
        save_table(per_epoch, Path(out) / "grid-per-epoch", meta)
    return result


# ---------------------------------------------------------------------- time to target
def time_to_target(rows: Sequence[dict[str, Any]], target: float) -> tuple[float, int] | None:
    """``(time_s, epoch)`` of the first epoch whose test accuracy reaches ``target``, or ``None``.

    The resolution is one epoch (the accuracy is measured after each epoch).
    """
    for row in rows:
        acc = row.get("test_accuracy")
        if acc is not None and math.isfinite(acc) and acc >= target:
            return float(row["time_s"]), int(row["epoch"])
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def group_runs(runs: Sequence[RunResult]) -> dict[tuple[str, str], dict[str, list[RunResult]]]:
    """Runs grouped as ``{(data, model): {label: [runs over seeds]}}``.

    The label is the optimizer's name, with the learning rate and damping added when one group
    holds several settings of the same optimizer.
    """
    groups: dict[tuple[str, str], dict[tuple, list[RunResult]]] = {}
    for run in runs:
        c = run.config
        key = (c.data, Path(c.model).name if ":" not in c.model else c.model.rpartition(":")[2])
        setting = (c.optimizer, c.lr, c.damping, c.batch_size, c.epochs, c.momentum)
        groups.setdefault(key, {}).setdefault(setting, []).append(run)
    out: dict[tuple[str, str], dict[str, list[RunResult]]] = {}
    for key, settings in groups.items():
        counts: dict[str, int] = {}
        for s in settings:
            counts[s[0]] = counts.get(s[0], 0) + 1
        ordered = sorted(
            settings.items(),
            key=lambda kv: (
                OPTIMIZER_NAMES.index(kv[0][0]) if kv[0][0] in OPTIMIZER_NAMES else 99,
                kv[0][1:3],
            ),
        )
        out[key] = {}
        for s, rs in ordered:
            label = s[0] if counts[s[0]] == 1 else f"{s[0]} ({_point_name(s[1], s[2])})"
            out[key][label] = sorted(rs, key=lambda r: r.config.seed)
    return out


def summarise(runs: Sequence[RunResult], target: float | None = None) -> list[dict[str, Any]]:
    """The time-to-target table: one row per data set × model × optimizer (mean over seeds).

    Columns: ``time_to_target_s`` and ``time_to_target_std`` (mean and sample standard deviation
    over the seeds that reached the target), ``reached`` (``k/n`` seeds), ``epochs_to_target``,
    ``vs_sgd`` (time to target ÷ SGD's in the same group), ``final_test_accuracy`` (± std),
    ``final_train_loss`` (± std), ``time_per_epoch_s``, ``step_share`` (time inside
    ``optimizer.step()`` ÷ training time), ``diverged`` and ``failed`` (runs that stopped
    early; their last epoch counts as final) and the settings.
    """
    table = []
    for (data, model), by_label in group_runs(runs).items():
        tgt = target if target is not None else DEFAULT_TARGETS.get(data, 0.9)
        group_rows = []
        for label, rs in by_label.items():
            hits = [time_to_target(r.rows, tgt) for r in rs]
            times = [h[0] for h in hits if h is not None]
            ep = [h[1] for h in hits if h is not None]
            t_mean, t_std = _mean_std(times)
            acc_mean, acc_std = _mean_std([r.final["test_accuracy"] for r in rs])
            loss_mean, loss_std = _mean_std([r.final["train_loss"] for r in rs])
            total = [r.final["time_s"] for r in rs]
            epochs = [max(r.final["epoch"], 1) for r in rs]
            step = [sum(row["step_time_s"] for row in r.rows) for r in rs]
            c = rs[0].config
            group_rows.append(
                {
                    "data": data,
                    "model": model,
                    "optimizer": label,
                    "lr": c.lr,
                    "damping": c.damping,
                    "seeds": len(rs),
                    "target": tgt,
                    "reached": f"{len(times)}/{len(rs)}",
                    "time_to_target_s": t_mean,
                    "time_to_target_std": t_std,
                    "epochs_to_target": float(np.mean(ep)) if ep else math.nan,
                    "vs_sgd": math.nan,
                    "final_test_accuracy": acc_mean,
                    "final_test_accuracy_std": acc_std,
                    "final_train_loss": loss_mean,
                    "final_train_loss_std": loss_std,
                    "time_per_epoch_s": float(np.mean([t / e for t, e in zip(total, epochs)])),
                    "step_share": float(np.mean([s / max(t, 1e-12) for s, t in zip(step, total)])),
                    "diverged": sum(r.status == "diverged" for r in rs),
                    "failed": sum(r.status == "failed" for r in rs),
                }
            )
        sgd = next((r for r in group_rows if r["optimizer"] == "sgd"), None)
        if sgd is not None and math.isfinite(sgd["time_to_target_s"]):
            for r in group_rows:
                r["vs_sgd"] = r["time_to_target_s"] / sgd["time_to_target_s"]
        table += group_rows
    return table


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The time-to-target table as Markdown (mean ± standard deviation over seeds)."""

    def pm(mean: float, std: float, fmt: str, scale: float = 1.0) -> str:
        if not math.isfinite(mean):
            return "—"
        return f"{mean * scale:{fmt}} ± {std * scale:{fmt}}"

    def num(value: float, fmt: str) -> str:
        return "—" if not math.isfinite(value) else format(value, fmt)

    head = (
        "| data | model | optimizer | lr | damping | time to target (s) | reached | "
        "epochs | ÷ SGD | final test acc. (%) | final train loss | s / epoch | in step() |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        stopped = [f"{r[k]}/{r['seeds']} {k}" for k in ("diverged", "failed") if r.get(k)]
        name = r["optimizer"] + (f" ({', '.join(stopped)})" if stopped else "")
        lines.append(
            f"| {r['data']} | {r['model']} | {name} | {r['lr']:g} | "
            f"{'—' if r['damping'] is None else format(r['damping'], 'g')} | "
            f"{pm(r['time_to_target_s'], r['time_to_target_std'], '.2f')} | {r['reached']} | "
            f"{num(r['epochs_to_target'], '.1f')} | {num(r['vs_sgd'], '.2f')} | "
            f"{pm(r['final_test_accuracy'], r['final_test_accuracy_std'], '.1f', 100)} | "
            f"{pm(r['final_train_loss'], r['final_train_loss_std'], '.3g')} | "
            f"{r['time_per_epoch_s']:.2f} | {100 * r['step_share']:.0f}% |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def _palette() -> dict[str, Any]:
    import seaborn as sns

    colors = sns.color_palette("tab10", len(OPTIMIZER_NAMES))
    return dict(zip(OPTIMIZER_NAMES, colors))


def _aggregate(rs: Sequence[RunResult], key: str) -> tuple[np.ndarray, ...]:
    """Per-epoch mean, min and max of ``key`` over seeds, and the mean cumulative time."""
    length = min(len(r.rows) for r in rs)
    values = np.array([[r.rows[e][key] for e in range(length)] for r in rs], dtype=float)
    times = np.array([[r.rows[e]["time_s"] for e in range(length)] for r in rs], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of diverged runs
        return (
            np.arange(length),
            np.nanmean(values, 0),
            np.nanmin(values, 0),
            np.nanmax(values, 0),
            times.mean(0),
        )


def _seconds(value: float, _pos: int) -> str:
    """Tick label of a log time axis: ``0.1``, ``1``, ``10``."""
    return f"{value:g}"


def curves_figure(
    by_label: dict[str, list[RunResult]],
    title: str,
    target: float | None = None,
    log_time: bool = True,
):
    """Training loss vs epoch and vs wall-clock, test accuracy vs wall-clock; one line per label.

    Lines are means over seeds, bands their min–max; on the wall-clock axes each point sits at
    the mean cumulative training time of its epoch.

    Args:
        by_label: Runs over seeds per curve label (:func:`group_runs`).
        title: Figure title.
        target: Test accuracy drawn as a dotted line.
        log_time: Logarithmic wall-clock axes (the optimizers' costs differ by orders of
            magnitude); they then start at epoch 1.

    Returns:
        A matplotlib ``Figure``.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = _palette()
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
        start_losses = []
        for i, (label, rs) in enumerate(by_label.items()):
            name = label.split(" ")[0]
            color = palette.get(name, f"C{i % 10}")
            style = "--" if name in FIRST_ORDER else "-"
            c = rs[0].config
            hyper = f"lr {c.lr:g}" + ("" if c.damping is None else f", λ {c.damping:g}")
            bad = [r.status for r in rs if r.status in ("diverged", "failed")]
            legend = f"{label}: {hyper}, n={len(rs)}" + (
                f" ({len(bad)} {'/'.join(sorted(set(bad)))})" if bad else ""
            )
            epochs, loss, lo, hi, wall = _aggregate(rs, "train_loss")
            _, acc, acc_lo, acc_hi, _ = _aggregate(rs, "test_accuracy")
            start_losses.append(loss[0])
            kw = dict(color=color, linestyle=style, linewidth=1.8, marker="o", markersize=2.5)
            axes[0].plot(epochs, loss, label=legend, **kw)
            axes[0].fill_between(epochs, lo, hi, color=color, alpha=0.15, linewidth=0)
            t = slice(1, None) if log_time else slice(None)  # time 0 has no place on a log axis
            axes[1].plot(wall[t], loss[t], **kw)
            axes[1].fill_between(wall[t], lo[t], hi[t], color=color, alpha=0.15, linewidth=0)
            axes[2].plot(wall[t], 100 * acc[t], **kw)
            axes[2].fill_between(
                wall[t], 100 * acc_lo[t], 100 * acc_hi[t], color=color, alpha=0.15, lw=0
            )
        top = 3 * max((v for v in start_losses if math.isfinite(v)), default=10.0)
        for ax in axes[:2]:
            ax.set_yscale("log")
            ax.set_ylim(top=top)  # diverged runs leave the plot upwards
            ax.set_ylabel("training loss (cross-entropy, whole training set)")
        axes[0].set_xlabel("epoch")
        for ax in axes[1:]:
            ax.set_xlabel(
                "training wall-clock time (s" + (", log scale, from epoch 1)" if log_time else ")")
            )
            if log_time:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_seconds))
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[2].set_ylabel("test accuracy (%)")
        finals = [100 * _aggregate(rs, "test_accuracy")[1][-1] for rs in by_label.values() if rs]
        if finals and all(math.isfinite(f) for f in finals):
            low = min(min(finals) - 5, 100 * target - 3 if target else 100)
            high = max(max(finals) + 3, 100 * target + 2 if target else 0)
            axes[2].set_ylim(max(low, 0), min(high, 100))  # the target line stays inside
        axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if target is not None:
            axes[2].axhline(100 * target, color="0.3", linewidth=1, linestyle=":")
            axes[2].annotate(
                f"target {100 * target:g}%",
                (0.02, 100 * target),
                xycoords=("axes fraction", "data"),
                ha="left",
                va="bottom",
                fontsize=9,
                color="0.3",
            )
        axes[0].set_title("loss vs epoch")
        axes[1].set_title("loss vs wall-clock")
        axes[2].set_title("accuracy vs wall-clock")
        fig.legend(
            *axes[0].get_legend_handles_labels(),
            loc="outside right center",
            frameon=False,
            title="optimizer: settings, seeds",
        )
        fig.suptitle(f"{title} — mean over seeds, band: min–max", fontsize=12)
    return fig


def step_time_figure(runs_by_model: dict[str, dict[str, list[RunResult]]], title: str):
    """Seconds per epoch per optimizer, split into ``optimizer.step()`` and the rest.

    Returns:
        A matplotlib ``Figure`` with one panel per model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = _palette()
    n = len(runs_by_model)
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
        bars = max(len(v) for v in runs_by_model.values())
        fig, axes = plt.subplots(
            1, n, figsize=(5.5 * n, max(4.0, 0.45 * bars + 1.6)), constrained_layout=True,
            squeeze=False,
        )  # fmt: skip
        for ax, (model, by_label) in zip(axes[0], runs_by_model.items()):
            labels = list(by_label)
            step, rest = [], []
            for rs in by_label.values():
                per_run = [
                    (
                        sum(r["step_time_s"] for r in run.rows) / max(run.final["epoch"], 1),
                        (run.final["time_s"] - sum(r["step_time_s"] for r in run.rows))
                        / max(run.final["epoch"], 1),
                    )
                    for run in rs
                ]
                step.append(float(np.mean([p[0] for p in per_run])))
                rest.append(float(np.mean([p[1] for p in per_run])))
            y = np.arange(len(labels))[::-1]
            colors = [palette.get(lbl.split(" ")[0], "0.5") for lbl in labels]
            ax.barh(y, rest, color="0.8", label="forward, backward, batching")
            ax.barh(y, step, left=rest, color=colors, label="inside optimizer.step()")
            ax.set_yticks(y, labels)
            ax.set_xlabel("training time per epoch (s)")
            ax.set_title(model)
        handles = [
            plt.Rectangle((0, 0), 1, 1, color="0.8"),
            plt.Rectangle((0, 0), 1, 1, color="0.35"),
        ]
        fig.legend(
            handles,
            ["forward, backward, batching", "inside optimizer.step() (in the optimizer's colour)"],
            loc="outside lower center",
            ncols=2,
            frameon=False,
        )
        fig.suptitle(f"{title} — mean over seeds", fontsize=12)
    return fig


def save_figure(
    fig, path: str | os.PathLike, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Save ``fig`` as ``path.<format>`` (PNG at 150 dpi) and close it; returns the paths."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=150, bbox_inches="tight", metadata=_figure_metadata(fmt))
        written.append(target)
    plt.close(fig)
    return written


def _figure_metadata(fmt: str) -> dict[str, Any] | None:
    """Fixed metadata so that re-drawing the same runs gives the same files."""
    if fmt == "pdf":
        return {"CreationDate": None, "Creator": "fisherlab", "Producer": "fisherlab"}
    if fmt == "png":
        return {"Software": "fisherlab"}
    return None


def write_curves(
    runs: Sequence[RunResult],
    out: str | os.PathLike,
    target: float | None = None,
    formats: Sequence[str] = ("png", "pdf"),
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Draw the curves and step-time figures and write the time-to-target table.

    Writes ``curves-<data>-<model>.*`` per data set and model,
    ``optimizers-<data>-step-time.*`` and ``optimizers-<data>-time-to-target.{md,csv,json}`` per
    data set into ``out``.

    Returns:
        The table rows (:func:`summarise`) and the written paths.
    """
    out = Path(out)
    groups = group_runs(runs)
    table = summarise(runs, target)
    written: list[Path] = []
    by_data: dict[str, dict[str, dict[str, list[RunResult]]]] = {}
    for (data, model), by_label in groups.items():
        tgt = target if target is not None else DEFAULT_TARGETS.get(data, 0.9)
        some = next(iter(by_label.values()))[0].config
        title = (
            f"{model} on {data}: {some.epochs} epochs, batch {some.batch_size}, "
            f"momentum {some.momentum:g}"
        )
        fig = curves_figure(by_label, title, tgt)
        written += save_figure(fig, out / f"curves-{data}-{model}", formats)
        by_data.setdefault(data, {})[model] = by_label
    for data, by_model in by_data.items():
        fig = step_time_figure(by_model, f"{data}: where the training time goes")
        written += save_figure(fig, out / f"optimizers-{data}-step-time", formats)
        rows = [r for r in table if r["data"] == data]
        stem = out / f"optimizers-{data}-time-to-target"
        written += save_table(rows, stem, {"target": rows[0]["target"], "spread": "sample std"})
        md = stem.with_suffix(".md")
        md.write_text(markdown_table(rows) + "\n")
        written.append(md)
    return table, written


# --------------------------------------------------------------------- compare-optimizers
EXPERIMENT_KEYS = {
    "description",
    "out",
    "figures",
    "seeds",
    "target_accuracy",
    "train",
    "grid",
    "experiments",
}


def load_experiment(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a compare-optimizers config (JSON; see ``configs/digits.json``).

    Keys: ``train`` (settings shared by every run, as :class:`RunConfig` fields), ``seeds``,
    ``experiments`` (a list of ``{"model": …, "optimizers": {name: {"lr": …, "damping": …,
    "options": {…}}}}``), optional ``out`` (runs folder), ``figures``, ``target_accuracy``,
    ``grid`` (``{name or "*": {"lr": […], "damping": […]}, "seeds": […], "select": …}``) and
    ``description``.

    Raises:
        FisherlabError: For a missing file, bad JSON, unknown keys or optimizers.
    """
    path = Path(path)
    if not path.is_file():
        raise FisherlabError(f"config file {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FisherlabError(f"{path} is not valid JSON: {err}") from err
    unknown = sorted(set(cfg) - EXPERIMENT_KEYS)
    if unknown:
        raise FisherlabError(f"{path}: unknown key(s) {unknown}; valid: {sorted(EXPERIMENT_KEYS)}")
    if not cfg.get("experiments"):
        raise FisherlabError(f"{path}: 'experiments' must list at least one model")
    RunConfig.from_dict(cfg.get("train", {}))  # typos in shared settings fail early
    for exp in cfg["experiments"]:
        bad = sorted(set(exp.get("optimizers", {})) - set(OPTIMIZER_NAMES))
        if "model" not in exp or not exp.get("optimizers") or bad:
            raise FisherlabError(
                f"{path}: each experiment needs 'model' and 'optimizers' from "
                f"{list(OPTIMIZER_NAMES)} (unknown: {bad})"
            )
        for name, hyper in exp["optimizers"].items():
            extra = sorted(set(hyper) - {"lr", "damping", "options", "note"})
            if extra:
                raise FisherlabError(f"{path}: {exp['model']}/{name}: unknown key(s) {extra}")
    return cfg


#: What a run depends on besides its config, compared before a finished run is reused.
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


def compare_optimizers(
    experiment: dict[str, Any],
    out: str | os.PathLike | None = None,
    optimizers: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    grid: bool = False,
    force: bool = False,
    progress: bool = True,
    warmup: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[RunResult], dict[tuple[str, str], GridResult]]:
    """Run every optimizer of every experiment with every seed (after a grid search if asked).

    Runs go to ``out/<data>-<model>/<optimizer>/seed<S>``; finished runs of the same config are
    reused unless ``force``. With ``grid``, each optimizer's learning rate and damping are first
    chosen by :func:`grid_search` (runs under ``out/grid/…``) and ``experiment`` is updated in
    place with the choice. With ``warmup``, one untimed tiny run of each optimizer precedes its
    seeded runs, so that one-time costs (loading linear-algebra kernels, first calls) do not
    land in whichever run happens to come first.

    Returns:
        The runs and the grid results by ``(model, optimizer)``.
    """
    out = Path(out or experiment.get("out") or "runs/compare")
    shared = dict(experiment.get("train", {}))
    seeds = list(seeds if seeds is not None else experiment.get("seeds", [0]))
    grid_cfg = experiment.get("grid", {})
    splits: dict[tuple, Split] = {}
    results: list[RunResult] = []
    grids: dict[tuple[str, str], GridResult] = {}
    for exp in experiment["experiments"]:
        for name, hyper in exp["optimizers"].items():
            if optimizers and name not in optimizers:
                continue
            base = RunConfig.from_dict(
                {
                    **shared,
                    "model": exp["model"],
                    "optimizer": name,
                    "lr": hyper.get("lr"),
                    "damping": hyper.get("damping"),
                    "optimizer_options": hyper.get("options", {}),
                }
            ).resolved()
            key = (base.data, base.data_dir, base.split_seed)
            if key not in splits:
                splits[key] = load_split(base)
            folder = out / f"{base.data}-{Path(exp['model']).name.replace(':', '-')}"
            if grid:
                lrs, dampings = grid_values(name, grid_cfg)
                log(f"grid search {name} on {exp['model']}: lr {lrs} × damping {dampings}")
                g = grid_search(
                    base,
                    lrs,
                    dampings,
                    seeds=grid_cfg.get("seeds", [0]),
                    select=grid_cfg.get("select", "train_loss"),
                    out=out / "grid" / folder.name / name,
                    progress=progress,
                    split=splits[key],
                    force=force,
                )
                grids[(exp["model"], name)] = g
                base = dataclasses.replace(base, **g.best)
                hyper.update({k: v for k, v in g.best.items() if v is not None})
                log(f"  best at the last epoch ({g.select}): {_point_name(base.lr, base.damping)}")
            if warmup:  # first calls (library loading, kernel set-up) are not timed in runs
                tiny = dataclasses.replace(
                    base, epochs=1, train_subset=2 * base.batch_size, test_subset=64, tag="warmup"
                )
                train(tiny, None, progress=False, split=splits[key])
            for seed in seeds:
                cfg = dataclasses.replace(base, seed=seed)
                run_dir = folder / name / f"seed{seed}"
                if not force and _same_run(run_dir, cfg):
                    results.append(load_run(run_dir))
                    log(f"reusing {run_dir} (same config, finished)")
                    continue
                result = train(cfg, run_dir, progress=progress, split=splits[key], overwrite=True)
                last = result.final
                log(
                    f"{cfg.label}: {result.status}, test accuracy "
                    f"{100 * last['test_accuracy']:.1f}%, train loss {last['train_loss']:.4f}, "
                    f"{last['time_s']:.1f} s"
                )
                results.append(result)
    return results, grids


__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_HYPER",
    "DEFAULT_TARGETS",
    "OPTIMIZER_NAMES",
    "GridResult",
    "RunConfig",
    "RunLogger",
    "RunResult",
    "build_model",
    "compare_optimizers",
    "curves_figure",
    "evaluate",
    "find_runs",
    "grid_search",
    "load_experiment",
    "load_run",
    "make_optimizer",
    "markdown_table",
    "save_figure",
    "step_time_figure",
    "summarise",
    "time_to_target",
    "train",
    "write_curves",
]
