"""Cross-checks against peer libraries (dev extra): curvlinops' KFAC and EKFAC operators.

Same Fisher type, KFAC-expand, weight and bias in one block: the dense matrices agree to the
last digits. Monte-Carlo Fisher types are not compared (each library draws its own labels).
curvlinops cannot unfold the asymmetric padding of ``Conv2d(padding="same")`` with an even
kernel, so that case is left out.
"""

import pytest
import torch
from cases import CASE_IDS, CASES
from helpers import EXACT, rel_err

import fisherlab as fl

curvlinops = pytest.importorskip("curvlinops")

FISHER_TYPES = {"true": "type-2", "empirical": "empirical"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("fisher_type", list(FISHER_TYPES))
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_curvlinops(case, fisher_type, method):
    if case.name == "cnn-same-ce":
        pytest.skip("curvlinops does not support unequal padding")
    model, loss_fn, x, y = case.build(7)
    ours = fl.curvature(method, model, loss_fn, x, y, fisher_type=fisher_type)
    operator = {"kfac": curvlinops.KFACLinearOperator, "ekfac": curvlinops.EKFACLinearOperator}[
        method
    ]
    for name, block in ours.items():
        params = list(model.get_submodule(name).parameters())
        peer = operator(
            model,
            loss_fn,
            params,
            [(x, y)],
            fisher_type=FISHER_TYPES[fisher_type],
            kfac_approx="expand",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        dense = peer @ torch.eye(block.size, dtype=torch.float64)
        assert rel_err(block.to_dense(), dense) <= EXACT, name
