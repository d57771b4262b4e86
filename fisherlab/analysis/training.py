"""KFAC and EKFAC with an amortized basis along SGD, against each step's own batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.analysis.setup import (
    _layer_info,
    exact_spectrum,
    train_sgd,
)
from fisherlab.analysis.table import FigureData
from fisherlab.blocks import build_block
from fisherlab.blocks.kfac import KronBlock
from fisherlab.capture import capture
from fisherlab.metrics import fisher_norm_sq, frobenius_at_scale, spectrum_distance

TRAINING_SERIES = ("kfac", "kfac_amortized", "ekfac_amortized")
"""Curves of :func:`training_errors`."""


def training_errors(
    model: nn.Module,
    loss_fn: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.1,
    basis_every: int = 20,
    fisher_type: str = "true",
    seed: int = 0,
    progress: bool = False,
) -> FigureData:
    r"""KFAC and EKFAC with a stale basis against the exact block along SGD (EKFAC Fig. 3, 5c).

    The model is trained in place by :func:`train_sgd`. Before every update, the current batch
    is captured and, per layer, compared with its exact block on the same batch (Frobenius
    error from the Gram of the ``woodbury`` block, spectrum from :func:`exact_spectrum`):

    * ``kfac``: factors ``Γ, Ω`` of the current batch (recomputed every step);
    * ``kfac_amortized``: factors recomputed every ``basis_every`` steps only (the KFAC of the
      paper, whose inverse is amortized);
    * ``ekfac_amortized``: EKFAC whose basis ``U_Γ ⊗ U_Ω`` is recomputed every ``basis_every``
      steps, with scalings ``s`` from the current batch at every step (``basis=``).

    At a step where the basis was just recomputed, EKFAC's error is at most KFAC's (EKFAC's
    theorem) and the amortized KFAC is the fresh one.

    Returns:
        Table ``curves`` with ``step, epoch, basis_step, loss, layer, method, rel_frobenius,
        spectrum_distance`` (relative distance of the sorted spectra to the exact one).
    """
    rows: list[dict[str, Any]] = []
    stale: dict[str, tuple[Tensor, Tensor, tuple[Tensor, Tensor]]] = {}
    steps_per_epoch = len(x_train) // batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="training", leave=False)

    def observe(step: int, epoch: int, xb: Tensor, yb: Tensor) -> None:
        cap = capture(model, loss_fn, xb, yb, fisher_type=fisher_type)
        with torch.no_grad():
            loss = loss_fn(model(xb), yb).item()
        recompute = step % basis_every == 0
        for name, lc in cap.items():
            kfac = build_block("kfac", cap, name)
            if recompute:
                ekfac_fresh = build_block("ekfac", cap, name)
                stale[name] = (kfac.gamma, kfac.omega, ekfac_fresh.basis)
            gamma, omega, basis = stale[name]
            blocks = {
                "kfac": kfac,
                "kfac_amortized": KronBlock(lc.layer, gamma, omega, fisher_type, kfac.options),
                "ekfac_amortized": build_block("ekfac", cap, name, basis={name: basis}),
            }
            reference = exact_spectrum(cap, name)
            f_sq = fisher_norm_sq(lc, cap.normaliser)
            for series, block in blocks.items():
                error, norm = frobenius_at_scale(block, lc, cap.normaliser, f_sq)
                rows.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "basis_step": recompute,
                        "loss": loss,
                        "layer": name,
                        "method": series,
                        "rel_frobenius": error / norm if norm > 0 else 0.0,
                        "spectrum_distance": spectrum_distance(reference, block.eigvalsh().flip(0)),
                    }
                )
        if bar is not None:
            bar.update()

    try:
        train_sgd(model, loss_fn, x_train, y_train, epochs, batch_size, lr, seed, observe)
    finally:
        if bar is not None:
            bar.close()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cap = capture(model, loss_fn, x_train[:2], y_train[:2], fisher_type="empirical")
    meta = {
        "layer_info": [_layer_info(cap, name) for name in layers],
        "fisher_type": fisher_type,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "basis_every": basis_every,
        "steps": epochs * steps_per_epoch,
        "layers": layers,
    }
    return FigureData("training", {"curves": rows}, meta)
