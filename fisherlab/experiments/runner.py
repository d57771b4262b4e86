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
from fisherlab.experiments.config import RunConfig, environment
from fisherlab.experiments.runlog import RunLogger, RunResult
from fisherlab.experiments.setup import load_split, make_optimizer, seed_everything
from fisherlab.models import create as build_model


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
