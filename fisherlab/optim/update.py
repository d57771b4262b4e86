"""Applying the preconditioned directions: KL clipping, learning rate, momentum, weight decay.

Given each layer's direction ``d`` (the preconditioned ``p.grad``, laid out in parameter
order), a parameter ``θ`` with update ``u`` (its slice of ``c·d``, ``c`` the layer's KL-clipping
factor; ``p.grad`` itself for parameters no layer preconditions) moves as ``torch.optim.SGD``
with ``dampening = 0`` and ``nesterov = False`` moves it, except that weight decay is decoupled::

    θ ← (1 − lr·wd)·θ                        (decoupled weight decay, before the step)
    b ← u  at the first step, else  b ← μ·b + u   (heavy-ball momentum, the state's
                                                    "momentum_buffer" as in SGD)
    θ ← θ − lr·b

In sync-free steps (:mod:`fisherlab.optim.rollback`) the same update applies only where a
0-dim device flag ``ok`` holds (:func:`sgd_step_where`), without a host synchronisation.

Example:
    >>> import torch
    >>> p, u, state = torch.ones(2, dtype=torch.float64), torch.full((2,), 0.5).double(), {}
    >>> sgd_step(p, u, lr=0.1, momentum=0.9, weight_decay=0.0, state=state)
    >>> p.tolist(), state["momentum_buffer"].tolist()
    ([0.95, 0.95], [0.5, 0.5])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def kl_clip_factors(
    directions: dict[str, Tensor], grads: dict[str, Tensor], groups: dict[str, dict[str, Any]]
) -> dict[str, Tensor | float]:
    """KL clipping per param group: one factor ``c ≤ 1`` for the layers of a group.

    The KL estimate of the step ``lr·c·d`` with ``F̂d = g`` is ``c²·lr²·Σ_l d_lᵀg_l`` over the
    group's layers ``l``; ``c = min(1, √(κ / |lr²·Σ_l d_lᵀg_l|))`` keeps it within the group's
    ``kl_clip`` ``κ`` (``1.0`` where ``kl_clip`` is None). The factor stays a tensor: no host
    synchronisation.

    Args:
        directions: ``{layer: d}``, ``[P]`` each.
        grads: ``{layer: g}``, ``[P]`` each.
        groups: ``{layer: its param group}`` (``lr`` and ``kl_clip``).

    Returns:
        ``{layer: c}``.
    """
    sums: dict[int, Tensor] = {}
    for n in directions:
        if groups[n]["kl_clip"] is not None:
            vg = (directions[n] * grads[n]).sum() * groups[n]["lr"] ** 2
            sums[id(groups[n])] = sums.get(id(groups[n]), 0) + vg
    factors: dict[str, Tensor | float] = {}
    for n in directions:
        clip = groups[n]["kl_clip"]
        if clip is None:
            factors[n] = 1.0
        else:
            vg = sums[id(groups[n])]
            factors[n] = torch.clamp(torch.sqrt(clip / vg.abs().clamp_min(1e-30)), max=1.0)
    return factors


def parameter_updates(
    directions: dict[str, Tensor],
    factors: dict[str, Tensor | float],
    params_of: dict[str, list[nn.Parameter]],
) -> dict[int, Tensor]:
    """``{id(p): u}``: each layer's ``c·d`` cut into its parameters' shapes and dtypes.

    Args:
        directions: ``{layer: d}``, ``[P]`` in the order of ``params_of[layer]``.
        factors: ``{layer: c}`` (``1.0``: no product).
        params_of: ``{layer: its parameters this step}``.
    """
    updates: dict[int, Tensor] = {}
    for name, d in directions.items():
        factor, offset = factors[name], 0
        if not (isinstance(factor, float) and factor == 1.0):  # KL clipping: a tensor
            d = d * factor
        for p in params_of[name]:
            updates[id(p)] = d[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
    return updates


def sgd_step(
    p: Tensor, update: Tensor, lr: float, momentum: float, weight_decay: float, state: dict
) -> None:
    """``θ ← (1 − lr·wd)θ − lr·b`` with ``b`` the heavy-ball buffer of ``update`` (in place)."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    if momentum:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = update.clone()
        else:
            state["momentum_buffer"].mul_(momentum).add_(update)
        update = state["momentum_buffer"]
    p.add_(update, alpha=-lr)


def sgd_step_where(
    ok: Tensor,
    p: Tensor,
    update: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    state: dict,
) -> None:
    """:func:`sgd_step` where the 0-dim flag ``ok`` holds, nothing otherwise (no sync).

    The momentum buffer must exist already (:func:`steps_on_device`).
    """
    if weight_decay:
        keep = torch.full((), 1 - lr * weight_decay, dtype=p.dtype, device=p.device)
        p.mul_(torch.where(ok, keep, 1))
    if momentum:
        buffer = state["momentum_buffer"]
        buffer.copy_(torch.where(ok, buffer * momentum + update, buffer))
        update = buffer
    p.sub_(torch.where(ok, update, 0.0) * lr)


def steps_on_device(param_groups: Iterable[dict[str, Any]], state: dict) -> bool:
    """Whether every parameter with a gradient can take :func:`sgd_step_where`.

    Not with sparse gradients, nor where momentum needs a first buffer (a first step).
    """
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None and (
                p.grad.is_sparse or (group["momentum"] and "momentum_buffer" not in state[p])
            ):
                return False
    return True


def apply_updates(
    param_groups: Iterable[dict[str, Any]],
    state: dict,
    updates: dict[int, Tensor],
    ok: Tensor | None = None,
) -> None:
    """Step every parameter with a gradient by its update (``p.grad`` if it has none).

    Args:
        param_groups: The optimizer's groups (``lr``, ``momentum``, ``weight_decay``).
        state: The optimizer's ``torch.optim`` state (``state[p]["momentum_buffer"]``, made
            only with momentum).
        updates: ``{id(p): u}`` of the preconditioned parameters.
        ok: In sync-free steps, the device flag under which the updates apply.
    """
    for group in param_groups:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            update = updates.get(id(p), p.grad)
            own = state[p] if mom else {}  # no empty entries in torch.optim's state
            if ok is None:
                sgd_step(p, update, lr, mom, wd, own)
            else:
                sgd_step_where(ok, p, update, lr, mom, wd, own)


__all__ = [
    "apply_updates",
    "kl_clip_factors",
    "parameter_updates",
    "sgd_step",
    "sgd_step_where",
    "steps_on_device",
]
