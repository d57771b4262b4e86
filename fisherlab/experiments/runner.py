"""Training one run: the epochs, each evaluated and logged (see :mod:`fisherlab.experiments`)."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.conventions import FisherlabError
from fisherlab.data import Split
from fisherlab.experiments.config import FIRST_ORDER, RunConfig, environment
from fisherlab.experiments.runlog import RunLogger, RunResult
from fisherlab.experiments.setup import (
    RunData,
    check_model_fits,
    lambda_max,
    load_split,
    make_optimizer,
    optimizer_fisher_type,
    run_data,
    seed_everything,
)
from fisherlab.models import create as build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024
) -> tuple[float | None, float | None]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``(x, y)``.

    ``(None, None)`` for an empty set.
    """
    if x.shape[0] == 0:
        return None, None
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
    tensors = run_data(cfg, split).to(device)
    steps_per_epoch = math.ceil(tensors.x_train.shape[0] / cfg.batch_size)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, split.input_shape, split.num_classes)
    check_model_fits(model, cfg, split)  # before any file: one line, nothing left behind
    model = model.to(device)
    loss_fn = nn.CrossEntropyLoss()
    run = _Run(cfg, device, model, loss_fn, tensors)
    damping = None
    if cfg.relative_damping:  # λ = ratio·λ_max of the Fisher at initialisation
        damping = cfg.damping * run.scale()
    opt = make_optimizer(cfg, model, steps_per_epoch, loss_fn, damping)  # bad options: no files
    run.opt = opt
    if hasattr(opt, "track_direction_cosine"):
        opt.track_direction_cosine = True
    try:
        logger = RunLogger(out, cfg, overwrite) if out is not None else None
    except BaseException:
        getattr(opt, "close", lambda: None)()
        raise
    run.logger = logger
    try:
        return _epochs(run, progress, on_epoch)
    finally:
        if logger is not None:
            logger.close()


class _Run:
    """What the epochs of one run share: the model, its optimizer, the data and the clock."""

    def __init__(
        self, cfg: RunConfig, device: torch.device, model: nn.Module, loss_fn: nn.Module,
        data: RunData,
    ):  # fmt: skip
        self.cfg, self.device, self.model, self.loss_fn, self.data = (
            cfg, device, model, loss_fn, data
        )  # fmt: skip
        self.opt: torch.optim.Optimizer | None = None
        self.logger: RunLogger | None = None
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.steps = 0
        self.skip_reason = ""  # the optimizer's first warning about a skipped step
        self.wall = 0.0
        self._scale: float | None = None

    def scale(self) -> float:
        """``λ_max`` of the current model's Fisher on the fixed probe samples (cached per state)."""
        if self._scale is None:
            n = self.cfg.scale_samples
            x, y = self.data.x_train[:n], self.data.y_train[:n]
            self._scale = lambda_max(
                self.model, self.loss_fn, x, y, optimizer_fisher_type(self.cfg), self.cfg.seed
            )
        return self._scale

    def evaluation(self, epoch: int) -> dict[str, Any]:
        """The row of ``epoch`` without its timings: losses, accuracies and the curvature regime."""
        cfg, d = self.cfg, self.data
        start = time.perf_counter()
        none = (None, None)
        test = (
            evaluate(self.model, d.x_test, d.y_test, cfg.eval_batch_size) if cfg.eval_test else none
        )
        val = evaluate(self.model, d.x_val, d.y_val, cfg.eval_batch_size)
        train = (
            evaluate(self.model, d.x_train, d.y_train, cfg.eval_batch_size)
            if cfg.eval_train
            else none
        )
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train[0],
            "train_accuracy": train[1],
            "train_loss_running": None,
            "test_loss": test[0],
            "test_accuracy": test[1],
            "val_loss": val[0],
            "val_accuracy": val[1],
        }
        lam = None
        if cfg.scale_samples:
            try:
                lam = self.scale()
            except FisherlabError:  # e.g. a diverged model: its Fisher overflows
                lam = math.nan
        damping = None
        if self.opt is not None and cfg.optimizer not in FIRST_ORDER:
            damping = float(self.opt.param_groups[0]["damping"])
        row.update(
            lambda_max=lam,
            damping=damping,
            damping_ratio=damping / lam if damping is not None and lam else None,  # nan stays
            direction_cosine=getattr(self.opt, "direction_cosine", lambda: None)(),
            eval_time_s=time.perf_counter() - start,
        )
        return row


def _epochs(
    run: _Run, progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None
) -> RunResult:
    """The run itself, its folder (if any) locked meanwhile: one :func:`run_epoch` per epoch."""
    cfg, opt, logger = run.cfg, run.opt, run.logger
    rows = [
        {
            **run.evaluation(0),
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
    status, note = "running", ""
    steps_per_epoch = math.ceil(run.data.x_train.shape[0] / cfg.batch_size)
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch, desc=cfg.label, disable=not progress, leave=False
    )
    run.model.train()
    try:
        for epoch in range(1, cfg.epochs + 1):
            row, status, note = run_epoch(run, epoch, bar)
            rows.append(row)
            if status == "running" and not all(
                row[k] is None or math.isfinite(row[k])
                for k in ("train_loss_running", "test_loss", "val_loss")
            ):
                status, note = "diverged", f"non-finite loss after epoch {epoch}"
            if status == "running" and epoch == cfg.epochs:
                status = "finished"
            shown = {k: row[k] for k in ("train_loss", "test_accuracy") if row[k] is not None}
            bar.set_postfix(epoch=epoch, **{k: f"{v:.3g}" for k, v in shown.items()})
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
    skipped = sum(row.get("skipped_steps") or 0 for row in rows)
    if skipped and status == "finished":
        note = skipped_note(skipped, run.steps, run.skip_reason)
        if logger:
            logger.write(rows, status, note)
    env = logger.meta["environment"] if logger else environment(cfg)
    out = Path(logger.folder) if logger is not None else None
    return RunResult(cfg, rows, status, out, env, note)


def skipped_note(skipped: int, steps: int, reason: str = "") -> str:
    """The note of a run whose optimizer skipped steps, e.g. ``every step (4 of 4) was skipped``."""
    what = (
        f"every step ({skipped} of {steps}) was skipped: the parameters never moved"
        if skipped >= steps
        else f"{skipped} of {steps} steps were skipped"
    )
    return what + (f" ({reason})" if reason else "")


def run_epoch(run: _Run, epoch: int, bar: Any = None) -> tuple[dict[str, Any], str, str]:
    """One pass over the shuffled training part, then its evaluation.

    Times (``time_s``, ``epoch_time_s``, ``step_time_s``, ``forward_backward_s``) exclude the
    evaluations and the measurement of ``λ_max``.

    Returns:
        The epoch's row, the status (``"running"``, or ``"diverged"``/``"failed"`` when a step
        stopped the epoch) and a note saying why.
    """
    cfg, opt, model, loss_fn, device = run.cfg, run.opt, run.model, run.loss_fn, run.device
    x_train, y_train = run.data.x_train, run.data.y_train
    n = x_train.shape[0]
    status, note = "running", ""
    order = torch.randperm(n, generator=run.shuffle).to(device)
    running = torch.zeros((), dtype=torch.float64, device=device)
    step_s = fb_s = 0.0
    seen = 0
    skipped_before = getattr(opt, "skipped_steps", 0)
    mc = cfg.fisher_type == "mc" and cfg.optimizer not in FIRST_ORDER
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sync(device)
        epoch_start = time.perf_counter()
        try:
            for i in range(math.ceil(n / cfg.batch_size)):
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
                    note = f"non-finite training loss at step {run.steps + 1}"
                    break
                opt.step()
                _sync(device)
                t2 = time.perf_counter()
                fb_s += t1 - t0
                step_s += t2 - t1
                running += loss.detach().double() * idx.numel()
                seen += idx.numel()
                run.steps += 1
                if bar is not None:
                    bar.update(1)
        except Exception as err:  # a crash in the optimizer: log it, end the run
            status = "failed"
            note = f"step {run.steps + 1}: {type(err).__name__}: {err}"
        _sync(device)
        epoch_s = time.perf_counter() - epoch_start
    for w in caught:
        if not (issubclass(w.category, RuntimeWarning) and "skipped" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif not run.skip_reason:
            run.skip_reason = str(w.message).strip().splitlines()[0]
    # the optimizer's own counter (torch optimizers skip nothing)
    skipped = getattr(opt, "skipped_steps", 0) - skipped_before
    run.wall += epoch_s
    run._scale = None  # the model changed: λ_max is measured again
    row = run.evaluation(epoch)
    row["train_loss_running"] = float(running) / seen if seen else math.nan
    if not cfg.eval_train:
        row["train_loss"] = row["train_loss_running"]
    row.update(
        time_s=run.wall,
        epoch_time_s=epoch_s,
        step_time_s=step_s,
        forward_backward_s=fb_s,
        steps=run.steps,
        skipped_steps=skipped,
    )
    return row, status, note
