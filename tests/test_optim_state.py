"""The optimizers' per-layer state (``optim/state.py``): its one tree walk and its typed record."""

import copy
import io

import pytest
import torch
from torch import nn

import fisherlab as fl
from fisherlab.optim.state import (
    LayerState,
    LayerStates,
    StructureMismatch,
    clone,
    map_tensors,
    same_structure,
    tensors,
)


def _t(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


#: Entries of the kinds the optimizers keep (tree, its tensors in walk order).
ENTRIES = {
    "tensor": lambda: _t(3, 3),
    "eigenbasis": lambda: (_t(3), _t(3, 3, seed=1)),
    "factored-inverses": lambda: (1e-3, _t(2, 2), _t(4, 4, seed=1)),
    "fngd-weights": lambda: {0: _t(5), 3: _t(5, seed=2)},
    "nested": lambda: {"a": (_t(2), [_t(1, seed=3), 2.5]), "b": None},
    "integer-tensor": lambda: (torch.arange(4), _t(2)),
}


@pytest.mark.parametrize("kind", list(ENTRIES))
def test_map_tensors_keeps_the_structure_and_the_scalars(kind):
    tree = ENTRIES[kind]()
    out = map_tensors(lambda t: t + 1, tree)
    leaves, mapped = tensors(tree), tensors(out)
    assert len(leaves) == len(mapped) > 0
    for a, b in zip(leaves, mapped):
        assert torch.equal(b, a + 1)
    assert same_structure(out, tree)


@pytest.mark.parametrize("kind", list(ENTRIES))
@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["same-dtype", "to-float32"])
def test_clone_copies_detaches_and_casts_only_floating_tensors(kind, dtype):
    tree = map_tensors(lambda t: t.requires_grad_(t.is_floating_point()), ENTRIES[kind]())
    copied = clone(tree, torch.device("cpu"), dtype)
    for old, new in zip(tensors(tree), tensors(copied)):
        assert new.data_ptr() != old.data_ptr() and not new.requires_grad
        expected = dtype if dtype is not None and old.is_floating_point() else old.dtype
        assert new.dtype == expected
        assert torch.equal(new, old.detach().to(expected))
    assert same_structure(copied, tree)


@pytest.mark.parametrize("ok", [True, False], ids=["keep-new", "keep-old"])
@pytest.mark.parametrize("kind", list(ENTRIES))
def test_where_over_two_trees_selects_one_of_them(kind, ok):
    new, old = ENTRIES[kind](), map_tensors(lambda t: t * 2 - 1, ENTRIES[kind]())
    flag = torch.tensor(ok)
    chosen = map_tensors(lambda n, o: torch.where(flag, n, o), new, old)
    for c, expected in zip(tensors(chosen), tensors(new if ok else old)):
        assert torch.equal(c, expected)


#: Pairs ``(new, old)`` that a sync-free step cannot select between with ``where``.
MISMATCHES = {
    "shape": lambda: (_t(3, 3), _t(2, 3)),
    "no-old-value": lambda: (_t(3), None),
    "tensor-vs-number": lambda: ((1e-3, _t(2)), (_t(1), _t(2))),
    "other-damping": lambda: ((1e-3, _t(2)), (1e-2, _t(2))),
    "tuple-length": lambda: ((_t(2), _t(2)), (_t(2),)),
    "tuple-vs-list": lambda: ((_t(2),), [_t(2)]),
    "dict-keys": lambda: ({0: _t(2)}, {0: _t(2), 1: _t(2)}),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_trees_of_another_structure_do_not_match(case):
    new, old = MISMATCHES[case]()
    assert not same_structure(new, old)
    if case != "shape":  # the walk itself compares structure; shapes are the function's business
        with pytest.raises(StructureMismatch):
            map_tensors(torch.add, new, old)


@pytest.mark.parametrize("kind", list(ENTRIES))
def test_a_tree_matches_a_fresh_copy_of_itself(kind):
    assert same_structure(ENTRIES[kind](), ENTRIES[kind]())


def test_a_leaf_that_is_no_tensor_or_scalar_is_refused():
    with pytest.raises(TypeError, match="holds a Linear"):
        map_tensors(lambda t: t, (_t(2), nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.__setitem__("w", nn.Linear(2, 2)),
        lambda s: s.update(w=(_t(2), object())),
        lambda s: s.setdefault("w", {0: nn.Linear(2, 2)}),
        lambda s: s.__setitem__(3, _t(2)),
    ],
    ids=["setitem", "update", "setdefault", "non-string-key"],
)
def test_layer_state_refuses_values_that_are_not_entries(write):
    state = LayerState(aa=_t(2, 2))
    with pytest.raises(fl.FisherlabError, match="optimizer state"):
        write(state)
    assert list(state) == ["aa"]


def test_layer_states_hold_layer_states_and_copies_keep_the_type():
    states = LayerStates()
    states.setdefault("0", {})
    states["1"] = {"X": _t(2)}
    states.update({"2": {"weights": {0: _t(3)}}})
    assert all(type(s) is LayerState for s in states.values())
    stored = states["2"].setdefault("weights", {})
    stored[1] = _t(3)  # FNGD adds to the dict it is handed
    assert list(states["2"]["weights"]) == [0, 1]
    again = copy.deepcopy(states)
    assert type(again) is LayerStates and type(again["1"]) is LayerState
    assert torch.equal(again["1"]["X"], states["1"]["X"]) and again["0"] == {}


@pytest.mark.parametrize("name", ["kfac", "ekfac", "skfac", "fngd"])
def test_state_dict_holds_plain_dicts_that_load_with_weights_only(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    make = {
        "kfac": lambda m: fl.optim.KFAC(m, damping_mode="factored", inv_update_freq=1),
        "ekfac": lambda m: fl.optim.EKFAC(m),
        "skfac": lambda m: fl.optim.SKFAC(m),
        "fngd": lambda m: fl.optim.FNGD(m, steps_per_epoch=2),
    }[name]
    opt = make(model)
    x, y = _t(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    layers = opt.state_dict()["fisherlab"]["layers"]
    assert all(type(s) is dict for s in layers.values()) and any(layers.values())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = make(model)
    fresh.load_state_dict(loaded)
    assert all(type(s) is LayerState for s in fresh.layer_state.values())
    for layer, state in opt.layer_state.items():
        assert same_structure(dict(fresh.layer_state[layer]), dict(state))
        for a, b in zip(tensors(dict(state)), tensors(dict(fresh.layer_state[layer]))):
            assert torch.equal(a, b)
    opt.close()
    fresh.close()


def test_a_saved_state_with_an_entry_of_another_kind_is_refused_and_nothing_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = fl.optim.FNGD(model, steps_per_epoch=2)
    nn.functional.cross_entropy(model(_t(6, 4)), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    opt.step()
    saved = opt.state_dict()
    saved["fisherlab"]["layers"]["0"]["weights"][0] = nn.Linear(2, 2)
    before = dict(opt.layer_state["0"])
    with pytest.raises(fl.FisherlabError, match=r"per-layer statistics do not fit.*Linear"):
        opt.load_state_dict(saved)
    assert all(opt.layer_state["0"][k] is v for k, v in before.items())
    opt.close()
