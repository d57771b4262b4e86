"""Cross-checks against peer libraries (dev extra): curvlinops' operators.

Same Fisher type, KFAC-expand, weight and bias in one block: the dense matrices agree to the
last digits, on one batch and on a list of batches (curvlinops' data-set convention, a short
last batch included). Monte-Carlo Fisher types are not compared (each library draws its own
labels). curvlinops' KFAC cannot unfold the asymmetric padding of ``Conv2d(padding="same")``
with an even kernel, so that case is left out there.
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


SIZES = (7, 7, 3)  # a short last batch


def _batches(case):
    model, loss_fn, x, y = case.build(sum(SIZES), seed=2)
    batches, start = [], 0
    for size in SIZES:
        batches.append((x[start : start + size], y[start : start + size]))
        start += size
    return model, loss_fn, batches


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("fisher_type", list(FISHER_TYPES))
def test_data_set_blocks_equal_curvlinops_over_the_same_batch_list(case, fisher_type):
    """GGN (true Fisher) / empirical Fisher, KFAC and EKFAC of a list of batches."""
    model, loss_fn, batches = _batches(case)
    problem = fl.Problem(model, loss_fn, batches, fisher_type=fisher_type)
    exact = fl.exact_blocks(problem, backend="torch.func")
    curvature_operator = {
        "true": curvlinops.GGNLinearOperator,
        "empirical": curvlinops.EFLinearOperator,
    }[fisher_type]
    methods = {}
    if case.name != "cnn-same-ce":
        methods = {"kfac": curvlinops.KFACLinearOperator, "ekfac": curvlinops.EKFACLinearOperator}
    ours = fl.curvatures(problem, list(methods))
    for name, block in exact.items():
        params = list(model.get_submodule(name).parameters())
        eye = torch.eye(block.shape[0], dtype=torch.float64)
        peer = curvature_operator(model, loss_fn, params, batches, check_deterministic=False)
        assert rel_err(block, peer @ eye) <= EXACT, name
        for method, operator in methods.items():
            peer = operator(
                model,
                loss_fn,
                params,
                batches,
                fisher_type=FISHER_TYPES[fisher_type],
                kfac_approx="expand",
                separate_weight_and_bias=False,
                check_deterministic=False,
            )
            assert rel_err(ours[method][name].to_dense(), peer @ eye) <= EXACT, (method, name)


def test_full_data_set_fisher_equals_curvlinops_ggn():
    model, loss_fn, batches = _batches(CASES[5])
    full = fl.exact_fisher(fl.Problem(model, loss_fn, batches))
    params = list(model.parameters())
    peer = curvlinops.GGNLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
    eye = torch.eye(full.matrix.shape[0], dtype=torch.float64)
    assert rel_err(full.matrix, peer @ eye) <= EXACT
