"""``GradScaler`` and the optimizers: reading the loss scale, unscaling the gradients.

The optimizers declare ``_step_supports_amp_scaling``: ``scaler.step(opt)`` then sets
``opt.grad_scale`` (the scale, gradients still scaled) and ``opt.found_inf`` (whether they
overflowed) instead of unscaling itself. If the loop called ``scaler.unscale_(opt)`` first,
``grad_scale`` is None and the gradients are unscaled already; the statistics are not, so the
scale is read from the scaler the optimizer was given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fisherlab.conventions import FisherlabError


def loss_scale(
    optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler | None
) -> tuple[Tensor | None, Tensor | float | None, Tensor | None]:
    """``(gradient scale, statistics scale, found_inf)`` handed over by ``GradScaler.step``.

    Returns:
        ``(None, None, None)`` outside ``GradScaler.step``; the gradient scale is None when
        the gradients were unscaled already (``scaler.unscale_``).

    Raises:
        FisherlabError: after ``scaler.unscale_(opt)`` without ``grad_scaler``: the
            statistics' scale is unknown.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return None, None, None
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is not None:
        return grad_scale, grad_scale, found_inf
    if grad_scaler is None:
        raise FisherlabError(
            "GradScaler.unscale_(optimizer) ran before scaler.step(optimizer): the gradients "
            "are unscaled but fisherlab's statistics are not and it cannot read the scale; "
            "pass grad_scaler=scaler when making the optimizer"
        )
    return None, grad_scaler.get_scale(), found_inf


def unscale(param_groups: Iterable[dict[str, Any]], scale: Tensor) -> None:
    """``p.grad ← p.grad · (1/scale)`` for every parameter with a gradient (sparse: a new one).

    ``1/scale`` is taken in float64 and rounded to float32 once, as ``GradScaler`` does.
    """
    inverse = scale.double().reciprocal().float()
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    p.grad = p.grad * inverse.to(p.grad.device)
                else:
                    p.grad.mul_(inverse.to(p.grad.device))


__all__ = ["loss_scale", "unscale"]
