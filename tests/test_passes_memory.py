"""Nothing lost, nothing silent: passes that must agree do, parameters used outside their
module's call, memory pre-flights of the peak, overflowing statistics, integer inputs.

Each test is a small version of a probe of issue 22, with the probe's setting.
"""

import pytest
import torch
from helpers import rel_err
from torch import nn

import fisherlab as fl

METHODS = ["exact", "woodbury", "kfac", "ekfac", "skfac", "diag"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n=18):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


class _Augmented(torch.utils.data.Dataset):
    """A data set with random augmentation: each access adds fresh noise."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


def _loader(kind, batch_size=4):
    x, y = _data()
    if kind == "augmented":
        return torch.utils.data.DataLoader(_Augmented(x, y), batch_size=batch_size)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=kind == "shuffle-drop-last"
    )


def _problem(kind, fisher_type="true", cache_bytes=0):
    return fl.Problem(
        _mlp(),
        nn.CrossEntropyLoss(),
        _loader(kind),
        fisher_type=fisher_type,
        cache_bytes=cache_bytes,
    )


CHANGED = r"data changed between passes.*other samples.*shuffle=False.*cache_bytes"
CHANGING = ["shuffle-drop-last", "augmented"]


# ------------------------------------------------------------------ passes that must agree
@pytest.mark.parametrize("kind", CHANGING)
@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_exact_blocks_then_curvature_on_changing_data_is_refused(kind, fisher_type):
    problem = _problem(kind, fisher_type)
    fl.exact_blocks(problem)
    with pytest.raises(fl.FisherlabError, match=CHANGED):
        fl.curvature("exact", problem)


@pytest.mark.parametrize("kind", CHANGING)
@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_ekfac_second_pass_without_cache_on_changing_data_is_refused(kind, fisher_type):
    with pytest.raises(fl.FisherlabError, match="data changed between passes"):
        fl.curvature("ekfac", _problem(kind, fisher_type))


@pytest.mark.parametrize("kind", CHANGING)
def test_compare_on_changing_data_is_refused(kind):
    with pytest.raises(fl.FisherlabError, match=CHANGED):
        fl.compare(_problem(kind), methods=["kfac"], progress=False)


@pytest.mark.parametrize("kind", CHANGING)
def test_one_ekfac_call_replaying_its_first_pass_is_accepted(kind):
    """The second pass replays the first's captures from memory: one data set, the first's."""
    problem = _problem(kind, cache_bytes=2**20)
    ekfac = fl.curvature("ekfac", problem)
    assert problem._passes_started == 1
    assert ekfac["0"].to_dense().isfinite().all()


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_a_reshuffled_loader_without_drop_last_is_accepted_and_exact(fisher_type):
    """The same samples in another order: the same Fisher (a sum over samples)."""
    problem = _problem("shuffle", fisher_type)
    blocks = fl.exact_blocks(problem)
    curv = fl.curvature("exact", problem)
    ekfac = fl.curvature("ekfac", problem)  # two more passes, reshuffled each
    x, y = _data()
    whole = fl.exact_blocks(_mlp(), nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type)
    for name in blocks:
        assert rel_err(blocks[name], whole[name]) <= 1e-12
        assert rel_err(curv[name].to_dense(), whole[name]) <= 1e-12
    assert ekfac["0"].to_dense().isfinite().all()


def test_a_reshuffled_loader_is_still_refused_for_monte_carlo():
    problem = _problem("shuffle", "mc")
    fl.exact_blocks(problem)
    with pytest.raises(fl.FisherlabError, match=r"same batches in the same order.*shuffle=False"):
        fl.exact_blocks(problem)


def test_checksums_see_a_swap_of_targets_between_samples():
    """The same inputs and the same labels, paired differently, are other samples."""
    x, y = _data(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    swapped = y.clone()
    swapped[[0, 1]] = swapped[[1, 0]]

    class SecondPassSwapped:
        passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([(x, y if self.passes == 1 else swapped)])

    problem = fl.Problem(_mlp(), nn.CrossEntropyLoss(), SecondPassSwapped())
    fl.curvature("kfac", problem)
    with pytest.raises(fl.FisherlabError, match=CHANGED):
        fl.curvature("kfac", problem)


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("entry", ["exact_blocks", "curvature", "capture"])
def test_integer_inputs_to_a_float_model_are_one_clear_error(entry):
    x, y = _data(6)
    call = {
        "exact_blocks": fl.exact_blocks,
        "curvature": lambda *a: fl.curvature("kfac", *a),
        "capture": fl.capture,
    }[entry]
    with pytest.raises(
        fl.FisherlabError, match=r"inputs have dtype torch.int64 .* torch.float64.*inputs.to"
    ):
        call(_mlp(), nn.CrossEntropyLoss(), x.long(), y)
