"""Undoing a bad optimizer step (``optim/rollback.py``): snapshots, finiteness, where, counts."""

import pytest
import torch

from fisherlab.optim import rollback
from fisherlab.optim.state import LayerState, LayerStates, tensors


def _t(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _states():
    return LayerStates(
        {
            "0": {"aa": _t(3, 3), "inverses": (1e-3, _t(2, 2), _t(3, 3, seed=1))},
            "1": {"weights": {0: _t(4)}, "X": _t(4, 2)},
        }
    )


#: A step's writes: ``(layer, key) → how the step replaces the entry``.
WRITES = {
    "tensor": ("0", "aa", lambda old: old * 2),
    "tuple-with-damping": ("0", "inverses", lambda old: (old[0], old[1] + 1, old[2] - 1)),
    "dict-gains-a-key": ("1", "weights", None),  # FNGD adds a step's weights to its dict
    "new-entry": ("1", "Y", lambda old: _t(2)),
}


def _write(states, case):
    layer, key, make = WRITES[case]
    if make is None:
        states[layer][key][1] = _t(4, seed=5)
    else:
        states[layer][key] = make(states[layer].get(key))
    return layer, key


@pytest.mark.parametrize("case", list(WRITES))
def test_changes_finds_exactly_the_replaced_entry(case):
    states = _states()
    saved = rollback.snapshot(states)
    assert rollback.changes(states, saved) == []
    assert type(saved) is LayerStates and all(type(s) is LayerState for s in saved.values())
    layer, key = _write(states, case)
    (change,) = rollback.changes(states, saved)
    assert (change.layer, change.key) == (layer, key)
    assert change.new is states[layer][key] and change.old is saved[layer].get(key)
    # the snapshot still holds the values before the step: restoring it undoes the step
    assert (change.old is None) == (case == "new-entry")
    if case == "dict-gains-a-key":
        assert list(saved[layer][key]) == [0]


@pytest.mark.parametrize("case", list(WRITES))
def test_restorable_needs_an_old_value_of_the_same_structure(case):
    states = _states()
    saved = rollback.snapshot(states)
    _write(states, case)
    expected = case in ("tensor", "tuple-with-damping")
    assert rollback.restorable(rollback.changes(states, saved)) == expected


def test_a_changed_damping_or_shape_is_not_restorable():
    states = _states()
    saved = rollback.snapshot(states)
    old = states["0"]["inverses"]
    states["0"]["inverses"] = (1e-2, old[1], old[2])
    assert not rollback.restorable(rollback.changes(states, saved))
    states = _states()
    saved = rollback.snapshot(states)
    states["0"]["aa"] = _t(4, 4)
    assert not rollback.restorable(rollback.changes(states, saved))


@pytest.mark.parametrize("ok", [True, False], ids=["step-ok", "step-bad"])
@pytest.mark.parametrize("case", ["tensor", "tuple-with-damping"])
def test_keep_where_keeps_the_new_values_or_the_old_ones(case, ok):
    states = _states()
    saved = rollback.snapshot(states)
    layer, key = _write(states, case)
    new = states[layer][key]
    replaced = rollback.changes(states, saved)
    rollback.keep_where(torch.tensor(ok), states, replaced)
    expected = new if ok else saved[layer][key]
    kept = tensors(states[layer][key])
    assert len(kept) == len(tensors(expected))
    for a, b in zip(kept, tensors(expected)):
        assert torch.equal(a, b)
    if case == "tuple-with-damping":
        assert states[layer][key][0] == 1e-3


def _sparse_with(value):
    return torch.sparse_coo_tensor(
        torch.tensor([[0, 2]]), torch.tensor([1.0, value]), (4,), check_invariants=True
    )


#: Tensors one of which is not finite, or whose sum overflows in float32.
BAD = {
    "nan": lambda: _t(3).index_fill(0, torch.tensor([1]), float("nan")),
    "inf": lambda: _t(3).index_fill(0, torch.tensor([0]), float("inf")),
    "minus-inf": lambda: _t(3).index_fill(0, torch.tensor([2]), -float("inf")),
    "sum-overflows": lambda: torch.full((2,), 3e38, dtype=torch.float32),
    "sparse-nan": lambda: _sparse_with(float("nan")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_all_finite_is_false_when_one_tensor_is_not(case):
    good = [_t(2, 2), _t(5, seed=1)]
    assert bool(rollback.all_finite(good))
    assert not bool(rollback.all_finite([*good, BAD[case]()]))
    assert rollback.non_finite([("a", good[0]), ("c", BAD[case]()), ("b", good[1])]) == (
        [] if case == "sum-overflows" else ["c"]  # entry by entry, 3e38 is finite
    )


def test_finite_reads_a_sparse_tensors_values():
    assert bool(rollback.finite(_sparse_with(2.0)))
    assert not bool(rollback.finite(_sparse_with(float("inf"))))


@pytest.mark.parametrize(
    "flags", [[True, True], [False, True, False], []], ids=["none-bad", "two-bad", "no-steps"]
)
def test_skipped_steps_add_host_and_device_counts(flags):
    skipped = rollback.SkippedSteps(3)
    skipped.add()
    for ok in flags:
        skipped.add_unless(torch.tensor(ok))
    assert int(skipped) == 4 + flags.count(False)
    assert (skipped.device is None) == (not flags)
