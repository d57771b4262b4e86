"""Brute-force references (torch.func, dense autograd) and model-state checks for the tests."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

#: Named tolerances (relative to the reference's largest entry).
EXACT = 1e-10
#: Every device present: device-parametrised tests run on each (CPU always, CUDA when there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (with 1 for an all-zero reference)."""
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


def layer_params(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Parameter dict (names as in model.named_parameters()) of one module, weight then bias."""
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    return {prefix + n: p for n, p in module.named_parameters(recurse=False)}


def normaliser(loss_fn: nn.Module, outputs: Tensor) -> float:
    if loss_fn.reduction == "sum":
        return 1.0
    return float(outputs.shape[0] if isinstance(loss_fn, nn.CrossEntropyLoss) else outputs.numel())


def per_sample_grads(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, name: str
) -> Tensor:
    """vmap(grad) of the per-sample *summed* loss w.r.t. one layer, [N, P] in parameter order."""
    params = {k: v.detach() for k, v in layer_params(model, name).items()}
    single = copy.deepcopy(loss_fn)
    single.reduction = "sum"

    def loss(p, xn, yn):
        out = functional_call(model, p, (xn.unsqueeze(0),), strict=False)
        return single(out, yn.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].flatten(start_dim=1) for k in params], dim=1)


def brute_force_ggn(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, names: list[str]
) -> Tensor:
    """Jᵀ H J from the dense Jacobian of all outputs and the autograd Hessian of the loss.

    Columns: the parameters of ``names`` in the given order (each weight then bias).
    """
    params = {}
    for name in names:
        params.update({k: v.detach() for k, v in layer_params(model, name).items()})
    keys = list(params)
    flat = torch.cat([params[k].flatten() for k in keys])
    shapes = [params[k].shape for k in keys]

    def outputs_of(theta: Tensor) -> Tensor:
        chunks, i = {}, 0
        for k, s in zip(keys, shapes):
            n = s.numel()
            chunks[k] = theta[i : i + n].view(s)
            i += n
        return functional_call(model, chunks, (x,), strict=False)

    out = outputs_of(flat).detach()
    jac = torch.autograd.functional.jacobian(outputs_of, flat).reshape(out.numel(), -1)
    hess = torch.autograd.functional.hessian(lambda f: loss_fn(f.view_as(out), y), out.flatten())
    return jac.T @ hess @ jac


def model_snapshot(model: nn.Module) -> dict:
    """Everything about a model that a curvature call must leave as it was."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": {
            n: [
                len(getattr(m, h))
                for h in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "_backward_pre_hooks",
                )
            ]
            for n, m in model.named_modules()
        },
        "global_hooks": [len(d) for d in _global_hook_dicts()],
    }


def _global_hook_dicts() -> list:
    from torch.nn.modules import module as m

    return [m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks]


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    for key in ("requires_grad", "training", "attributes", "hooks", "global_hooks"):
        assert after[key] == before[key], key
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), n
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None and g2 is None) or torch.equal(g, g2), n


class PooledAttention(nn.Module):
    """Self-attention over tokens of width 4 (2 heads), mean-pooled, a Linear head to 3 classes."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))
