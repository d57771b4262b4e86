"""A module called several times in one forward pass: one layer used several times.

Its per-sample gradient is the sum over the uses, so the exact block is that of the summed
gradient; the capture keeps every use as more positions of the same sample (``T`` = the positions
of all uses), which makes KFAC the KFAC-expand of the uses. Checked in float64 against brute
force over a data set of two batches.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    EXACT,
    assert_unchanged,
    brute_force_ggn,
    model_snapshot,
    per_sample_grads,
    rel_err,
)
from torch import Tensor, nn

import fisherlab as fl


class Twice(nn.Module):
    """``head(shared(tanh(shared(inp(x)))))``: one Linear layer used twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.shared(torch.tanh(self.shared(self.inp(x)))))


class OnVectorAndSequence(nn.Module):
    """``shared`` on a vector ``[N, 5]`` (1 position) and on a sequence ``[N, 2, 5]`` (2)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.seq = nn.Linear(4, 10)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.shared(torch.tanh(self.inp(x)))
        s = self.shared(torch.tanh(self.seq(x)).view(-1, 2, 5)).mean(dim=1)
        return self.head(torch.tanh(h + s))


def _sequential() -> nn.Module:
    shared = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3))


MODELS = {"twice": Twice, "vector-and-sequence": OnVectorAndSequence, "sequential": _sequential}
SHARED = {"twice": "shared", "vector-and-sequence": "shared", "sequential": "2"}
USES = {"twice": 2, "vector-and-sequence": 3, "sequential": 2}  # positions T per sample


def _problem(kind: str, fisher_type: str, **kwargs):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    problem = fl.Problem(model, nn.CrossEntropyLoss(), batches, fisher_type=fisher_type, **kwargs)
    return problem, x, y


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_the_exact_block_sums_the_uses(kind, fisher_type):
    problem, x, y = _problem(kind, fisher_type)
    model, name = problem.model, SHARED[kind]
    before = model_snapshot(model)
    exact = fl.exact_blocks(problem)
    recorded = fl.curvature("exact", problem)
    assert_unchanged(model, before)
    assert exact.backend == "torch.func"
    if kind == "sequential":  # BackPACK keeps one call per module
        assert f"module '{name}' is used more than once" in exact.backend_reason
    if fisher_type == "true":
        reference = brute_force_ggn(model, problem.loss_fn, x, y, [name])
    else:
        grads = per_sample_grads(model, problem.loss_fn, x, y, name)
        reference = grads.T @ grads / x.shape[0]
    assert rel_err(exact[name], reference) <= EXACT
    assert rel_err(recorded[name].to_dense(), reference) <= EXACT


@pytest.mark.parametrize("kind", list(MODELS))
def test_monte_carlo_blocks_of_both_paths_agree(kind):
    problem, _, _ = _problem(kind, "mc", mc_samples=3)
    name = SHARED[kind]
    exact = fl.exact_blocks(problem)
    recorded = fl.curvature("exact", problem)
    assert rel_err(recorded[name].to_dense(), exact[name]) <= EXACT


@pytest.mark.parametrize("kind", list(MODELS))
def test_kfac_expand_is_over_the_uses(kind):
    """``Ω = (1/(N·T)) Σ_{n,uses} ã ãᵀ`` and ``Γ = (1/ν) Σ_{n,uses} g gᵀ`` from each call's own
    input and output gradient, taken by hooks and autograd (empirical Fisher)."""
    problem, x, y = _problem(kind, "empirical")
    model, name = problem.model, SHARED[kind]
    module = model.get_submodule(name)
    inputs, outputs = [], []

    def hook(_, args, out):
        inputs.append(args[0].reshape(x.shape[0], -1, 5))
        outputs.append(out)

    handle = module.register_forward_hook(hook)
    loss = nn.CrossEntropyLoss(reduction="sum")(model(x), y)
    handle.remove()
    grads = torch.autograd.grad(loss, outputs)
    a = torch.cat(inputs, dim=1).detach()
    a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=-1)
    g = torch.cat([gr.reshape(x.shape[0], -1, 5) for gr in grads], dim=1)
    assert a.shape[1] == USES[kind]
    omega = torch.einsum("nti,ntj->ij", a, a) / (x.shape[0] * USES[kind])
    gamma = torch.einsum("nti,ntj->ij", g, g) / x.shape[0]
    dense = torch.kron(gamma, omega)  # vec_r([W | b]) order
    index = problem.layers[name].kron_to_param_index()
    reference = dense[index][:, index]
    kfac = fl.curvature("kfac", problem)
    assert rel_err(kfac[name].to_dense(), reference) <= EXACT


def test_backpack_backend_refuses_a_reused_module_by_name():
    problem, _, _ = _problem("sequential", "true")
    with pytest.raises(fl.FisherlabError, match=r"module '2' is used more than once"):
        fl.exact_blocks(problem, backend="backpack")
