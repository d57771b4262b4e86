"""MSE on sequence outputs ``[N, T, C]``: fisherlab's rows per sample against curvlinops' rows.

fisherlab takes the rows of a *sample*: the empirical row is the gradient of the sample's loss
summed over its tokens, the true-Fisher rows a square root of the sample's loss Hessian (one row
per token and output, ``R = T·C``). curvlinops' ``EFLinearOperator`` takes one row per token,
and its KFAC of the true Fisher (``"type-2"``) back-propagates each output coordinate ``c`` for
all tokens at once, i.e. rows summed over the tokens. Both are checked here against brute force
built from autograd alone (per-token gradients, the Jacobian of the outputs w.r.t. a layer's
output), in float64, so the relationship between the two libraries is exact:

- empirical Fisher: fisherlab ``(1/ν) Σ_n (Σ_t j_nt)(Σ_t j_nt)ᵀ``, curvlinops
  ``(1/ν) Σ_{n,t} j_nt j_ntᵀ``; they differ by the cross-token terms;
- KFAC-reduce (true Fisher): fisherlab's output-gradient factor from the ``T·C`` rows per sample,
  curvlinops' from the ``C`` rows summed over the tokens (on a token-wise output layer exactly
  ``T`` times fisherlab's factor);
- KFAC-expand (true Fisher) agrees where a layer's position ``t`` sees only token ``t``'s loss
  (token-wise layers), and differs by the same row sums on a layer before a token mixing;
- the exact GGN, KFAC of the empirical Fisher (expand and reduce) agree.

The README quotes the relative distances measured here (``test_readme_states_the_distances``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import EXACT, rel_err
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import fisherlab as fl

curvlinops = pytest.importorskip("curvlinops")

N, T, D, C = 6, 5, 4, 3
README = Path(__file__).resolve().parents[1] / "README.md"


class TokenMix(nn.Module):
    """A fixed (parameter-free) mixing of the tokens: ``h'_s = Σ_t M_st h_t``."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(11)
        mix = torch.randn(T, T, generator=generator, dtype=torch.float64) / T**0.5
        self.register_buffer("mix", mix)

    def forward(self, h: Tensor) -> Tensor:
        return torch.einsum("st,ntd->nsd", self.mix, h)


def _model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    first, last = nn.Linear(D, 5), nn.Linear(5, C)
    mix = [TokenMix()] if kind == "mixing" else []
    return nn.Sequential(first, nn.Tanh(), *mix, last).double()


def _data() -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.randn(N, T, D, dtype=torch.float64), torch.randn(N, T, C, dtype=torch.float64)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


NU = N * T * C  # the mean MSE's normaliser
MODELS = ["tokenwise", "mixing"]


# --------------------------------------------------------------------------- brute force
def _token_gradients(model: nn.Module, name: str, x: Tensor, y: Tensor) -> Tensor:
    """``j_nt = ∇_θ Σ_c (f_ntc − y_ntc)²`` for one layer's parameters, ``[N, T, P]``."""
    module = model.get_submodule(name)
    params = {f"{name}.{k}": v.detach() for k, v in module.named_parameters()}

    def token_losses(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(model, p, (xn.unsqueeze(0),), strict=False)[0]
        return ((out - yn) ** 2).sum(-1)  # [T]

    rows = []
    for n in range(N):
        jac = jacrev(token_losses)(params, x[n], y[n])
        rows.append(torch.cat([jac[k].flatten(start_dim=1) for k in params], dim=1))
    return torch.stack(rows)


def _true_rows(model: nn.Module, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's homogeneous inputs ``[N, T, d_in+1]`` and the true-Fisher rows
    ``g[n, t, c, p] = √2 ∂f_ntc/∂z_np`` (``z`` the layer's output; the Hessian of the sample's
    summed squared error is ``2I``), ``[N, T, C, T, d_out]``, by one backward pass per output."""
    store: dict[str, Tensor] = {}

    def hook(module, inputs, output):
        store["a"] = inputs[0].detach()
        store["z"] = output.detach().requires_grad_()
        return store["z"]

    handle = model.get_submodule(name).register_forward_hook(hook)
    out = model(x)
    handle.remove()
    z = store["z"]
    grads = [torch.autograd.grad(o, z, retain_graph=True)[0] for o in out.flatten()]
    jac = torch.stack(grads).view(N, T, C, N, T, z.shape[-1])
    rows = torch.stack([jac[n, :, :, n] for n in range(N)]) * 2**0.5
    a = store["a"]
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1), rows


def _kron_in_parameter_order(gamma: Tensor, omega: Tensor) -> Tensor:
    """``Γ ⊗ Ω`` (indexed by ``vec_r([W | b])``) reordered to weight row-major, then bias."""
    d_out, d_in = gamma.shape[0], omega.shape[0] - 1
    weight = [i * (d_in + 1) + j for i in range(d_out) for j in range(d_in)]
    order = torch.tensor(weight + [i * (d_in + 1) + d_in for i in range(d_out)])
    return torch.kron(gamma, omega)[order][:, order]


def _kfac(rows: Tensor, a: Tensor, approx: str, merge_tokens: bool) -> Tensor:
    """KFAC of the true Fisher from rows ``[N, T, C, T_pos, d_out]``; ``merge_tokens``: the rows
    summed over the output tokens first (curvlinops' backward pass per output coordinate)."""
    if merge_tokens:
        rows = rows.sum(1, keepdim=True)
    if approx == "reduce":
        g = rows.sum(3).flatten(end_dim=-2)  # position sum
        abar = a.mean(1)
        omega = abar.T @ abar / N
    else:
        g = rows.flatten(end_dim=-2)
        flat = a.flatten(end_dim=-2)
        omega = flat.T @ flat / (N * T)
    return _kron_in_parameter_order(g.T @ g / NU, omega)


# --------------------------------------------------------------------------- the two libraries
def _ours(model, name, x, y, fisher_type, method="exact", approx="expand") -> Tensor:
    if method == "exact":
        return fl.exact_blocks(model, nn.MSELoss(), x, y, fisher_type=fisher_type)[name]
    curv = fl.curvature(
        "kfac", model, nn.MSELoss(), x, y, fisher_type=fisher_type, kfac_approx=approx
    )
    return curv[name].to_dense()


def _peer(model, name, x, y, fisher_type, method="exact", approx="expand") -> Tensor:
    params = list(model.get_submodule(name).parameters())
    eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "exact":
            operator = {
                "true": curvlinops.GGNLinearOperator,
                "empirical": curvlinops.EFLinearOperator,
            }
            return (
                operator[fisher_type](
                    model, nn.MSELoss(), params, [(x, y)], check_deterministic=False
                )
                @ eye
            )
        peer = curvlinops.KFACLinearOperator(
            model,
            nn.MSELoss(),
            params,
            [(x, y)],
            fisher_type={"true": "type-2", "empirical": "empirical"}[fisher_type],
            kfac_approx=approx,
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        return peer @ eye


# --------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("kind", MODELS)
def test_empirical_fisher_is_per_sample_and_curvlinops_ef_per_token(kind):
    model, (x, y) = _model(kind), _data()
    for name in _linear_names(model):
        j = _token_gradients(model, name, x, y)  # [N, T, P]
        per_sample = j.sum(1)
        ours_ref = per_sample.T @ per_sample / NU
        peer_ref = torch.einsum("ntp,ntq->pq", j, j) / NU
        ours, peer = _ours(model, name, x, y, "empirical"), _peer(model, name, x, y, "empirical")
        assert rel_err(ours, ours_ref) <= EXACT, name
        assert rel_err(peer, peer_ref) <= EXACT, name
        cross = ours_ref - peer_ref  # the cross-token terms Σ_{t≠t'} j_nt j_nt'ᵀ / ν
        assert cross.norm() > 0.1 * peer_ref.norm(), name


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("kind", MODELS)
def test_true_fisher_kfac_rows_per_token_and_output_vs_curvlinops_rows_summed_over_tokens(
    kind, approx
):
    model, (x, y) = _model(kind), _data()
    for name in _linear_names(model):
        a, rows = _true_rows(model, name, x)
        ours = _ours(model, name, x, y, "true", "kfac", approx)
        peer = _peer(model, name, x, y, "true", "kfac", approx)
        assert rel_err(ours, _kfac(rows, a, approx, merge_tokens=False)) <= EXACT, name
        assert rel_err(peer, _kfac(rows, a, approx, merge_tokens=True)) <= EXACT, name


@pytest.mark.parametrize("kind", MODELS)
def test_output_layer_kfac_reduce_of_curvlinops_is_t_times_fisherlabs(kind):
    """On the output layer ``∂f/∂z = I``: the summed rows are ``T`` times as large, squared over
    ``T`` rows fewer."""
    model, (x, y) = _model(kind), _data()
    name = _linear_names(model)[-1]
    ours = _ours(model, name, x, y, "true", "kfac", "reduce")
    peer = _peer(model, name, x, y, "true", "kfac", "reduce")
    assert rel_err(peer, T * ours) <= EXACT


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("kind", MODELS)
def test_what_agrees_ggn_and_empirical_kfac(kind, approx, fisher_type):
    """The exact GGN and KFAC of the empirical Fisher (one backward pass of the whole loss in
    curvlinops: per-sample rows, as fisherlab's); KFAC-expand of the true Fisher on layers after
    the last token mixing."""
    model, (x, y) = _model(kind), _data()
    for i, name in enumerate(_linear_names(model)):
        if fisher_type == "true":
            assert (
                rel_err(_ours(model, name, x, y, "true"), _peer(model, name, x, y, "true")) <= EXACT
            )
            if approx == "reduce" or (kind == "mixing" and i == 0):
                continue  # the rows differ (the test above)
        ours = _ours(model, name, x, y, fisher_type, "kfac", approx)
        assert rel_err(ours, _peer(model, name, x, y, fisher_type, "kfac", approx)) <= EXACT, name


def _distance(ours: Tensor, peer: Tensor) -> float:
    return float((ours - peer).norm() / peer.norm())


def measured_distances() -> dict[str, list[float]]:
    """``‖fisherlab − curvlinops‖_F / ‖curvlinops‖_F`` per layer of the token-wise model:
    the empirical Fisher and KFAC-reduce of the true Fisher."""
    model, (x, y) = _model("tokenwise"), _data()
    names = _linear_names(model)
    return {
        "ef": [
            _distance(_ours(model, n, x, y, "empirical"), _peer(model, n, x, y, "empirical"))
            for n in names
        ],
        "reduce": [
            _distance(
                _ours(model, n, x, y, "true", "kfac", "reduce"),
                _peer(model, n, x, y, "true", "kfac", "reduce"),
            )
            for n in names
        ],
    }


def test_readme_states_the_distances():
    """The README's numbers are these measurements (two digits), not typed by hand."""
    text = " ".join(README.read_text().split())
    match = re.search(
        r"relative distance ‖fisherlab − curvlinops‖/‖curvlinops‖ is ([\d.]+) / ([\d.]+) for the "
        r"empirical Fisher and ([\d.]+) / ([\d.]+) for KFAC-reduce",
        text,
    )
    assert match, "the README's sentence with the measured distances is missing"
    stated = [float(v) for v in match.groups()]
    measured = measured_distances()
    assert stated == [round(v, 2) for v in measured["ef"] + measured["reduce"]]
