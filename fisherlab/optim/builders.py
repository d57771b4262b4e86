"""Optimizers that hold one block builder per layer: statistics steps, the mirror, the state.

The optimizers of this family (KFAC, EKFAC, SKFAC) hold one block builder per layer
(:mod:`fisherlab.blocks`, ``normalise="batch"``): each statistics step adds the batch with
weights ``(0, 1)`` the first time and ``(stat_decay, 1 − stat_decay)`` after that (the
exponential running average, :func:`running_average_weights`), and the step's solve is that of
the builder's block. Statistics steps are those with ``steps % stat_every == 0`` (or a layer
without statistics of its shape); between them the optimizer's recorder records nothing.

**Per-layer state.** The builder's state (:meth:`~fisherlab.blocks.base.BlockBuilder.state_dict`)
is mirrored into the optimizer's per-layer state under ``builder.<entry>`` keys, as clones
(``add`` updates the builder in place): the base class rolls those back after a skipped step,
keeps them ``where(ok, new, old)`` in sync-free steps and saves them in ``state_dict()``. Before
each step the builder is made to agree with its mirror again (after a rollback, a sync-free skip
or ``load_state_dict``). The memory of the statistics is twice the builder's.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from fisherlab.blocks import builder as make_builder
from fisherlab.blocks.base import BlockBuilder, LayerStats
from fisherlab.conventions import FisherlabError, check_positive_int, check_range
from fisherlab.layers import Layer
from fisherlab.optim.base import CurvatureOptimizer

#: The prefix of a builder's state entries in an optimizer's per-layer state.
BUILDER = "builder."


def running_average_weights(first: bool, decay: float) -> tuple[float, float]:
    """``(old_weight, new_weight)`` of the optimizers' running average with ``decay``.

    ``(0, 1)`` on the first statistics step (or with ``decay = 0``), ``(decay, 1 − decay)``
    after it: the builder's mass stays exactly 1 (``decay + fl(1 − decay)`` rounds to 1 for every
    ``decay`` in ``(0, 1)``), so its block is ``S ← decay·S + (1 − decay)·x_b``.
    """
    return (0.0, 1.0) if first or decay == 0 else (decay, 1.0 - decay)


class BuilderOptimizer(CurvatureOptimizer):
    """Base class of the optimizers holding a builder per layer (module docstring).

    Subclasses set :attr:`method`, :meth:`_builder_options` and :meth:`_add`, and call
    :meth:`_update_builders` from their ``_prepare``. Their groups hold ``stat_decay`` and
    ``stat_every``.

    Attributes:
        builders: ``{layer: BlockBuilder}``, the layers' running-average builders.
    """

    #: The block method of the builders.
    method: ClassVar[str] = ""
    #: The builder entry whose shape gives the layer's input width ``D``, and its axis.
    width_entry: ClassVar[tuple[str, int]] = ("aa", 0)
    #: Builder state entries not mirrored (constants of the builder).
    not_mirrored: ClassVar[tuple[str, ...]] = ("pass_index", "per_batch")
    #: Per-layer entries kept besides the builder's (``builder.<entry>``).
    kept_entries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any):
        self.builders: dict[str, BlockBuilder] = {}
        self._builder_keys: dict[str, tuple] = {}
        self._mirrors: dict[str, dict[str, Tensor]] = {}
        super().__init__(*args, **kwargs)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_range("stat_decay", group["stat_decay"], 0.0, 1.0)
        check_positive_int("stat_every", group["stat_every"])

    # ------------------------------------------------------------------ builders
    def _builder_options(self, group: dict) -> dict[str, Any]:
        """The block options of a group's builders."""
        raise NotImplementedError

    def _input_width(self, name: str) -> int | None:
        """``D`` of the layer's statistics held (``None`` when none are)."""
        entry, axis = self.width_entry
        held = self.layer_state[name].get(BUILDER + entry)
        return None if held is None else held.shape[axis]

    def _statistics_due(self) -> bool:
        """A statistics step of some group, or a layer without statistics of its shape.

        Not while the recorder was idle (it recorded nothing: :meth:`_statistics_expected`).
        """
        if self._recorder.idle:
            return False
        for name in self.layers:
            trained = self._trained(name)
            if trained is None:
                continue
            layer, group = trained[0], self.param_groups[self._group_index[name]]
            if self.steps % group["stat_every"] == 0:
                return True
            if self._input_width(name) != layer.d_in + layer.has_bias:
                return True
        return False

    def _statistics_expected(self) -> bool:
        """A statistics step of some group next, or a layer without statistics of its shape."""
        for name, layer in self.layers.items():
            group = self.param_groups[self._group_index[name]]
            if self.steps % group["stat_every"] == 0:
                return True
            if self._input_width(name) != layer.d_in + layer.has_bias:
                return True
        return False

    def _builder(self, name: str, layer: Layer, group: dict) -> BlockBuilder:
        """The layer's builder, agreeing with its mirror in ``layer_state[name]``.

        Statistics of another shape (a bias frozen or unfrozen since) are dropped.
        """
        state = self.layer_state[name]
        saved = {k[len(BUILDER) :]: v for k, v in state.items() if k.startswith(BUILDER)}
        if saved and self._input_width(name) != layer.d_in + layer.has_bias:
            for key in [k for k in state if k.startswith(BUILDER)]:
                del state[key]
            saved = {}
        options = self._builder_options(group)
        key = (layer.has_bias, tuple(sorted(options.items())))
        held, mirror = self.builders.get(name), self._mirrors.get(name)
        if (
            held is not None
            and self._builder_keys[name] == key
            and mirror is not None
            and saved.keys() == mirror.keys()
        ):
            if all(saved[k] is mirror[k] for k in saved):
                return held
            # rolled back or kept where(ok, new, old): the values back into the builder, on the
            # device (its masses are exactly 1 after its first step, see
            # running_average_weights, so only the statistics can differ), unless a shape
            # changed (SKFAC's rows of another batch size): then a builder from the mirror
            live = held.state_dict()
            if all(k in live and live[k].shape == v.shape for k, v in saved.items() if v.ndim):
                for k, value in saved.items():
                    if value.ndim:
                        live[k].copy_(value)
                self._mirrors[name] = dict(saved)
                return held
        fresh = make_builder(self.method, layer, self.fisher_type, normalise="batch", **options)
        if saved:
            fresh.load_state_dict({k: v.clone() for k, v in saved.items()})
        self.builders[name], self._builder_keys[name] = fresh, key
        self._mirrors[name] = dict(saved)
        return fresh

    def _statistics_step(self, name: str, group: dict) -> bool:
        """Whether the layer's statistics are updated this step."""
        return self.steps % group["stat_every"] == 0 or not self._mirrors.get(name)

    def _mirror(self, name: str, held: BlockBuilder) -> None:
        """Clones of the builder's state into ``layer_state[name]`` (``builder.<entry>``)."""
        state = self.layer_state[name]
        for key in [k for k in state if k.startswith(BUILDER)]:
            del state[key]
        mirror = {k: v.clone() for k, v in held.state_dict().items() if k not in self.not_mirrored}
        state.update({BUILDER + k: v for k, v in mirror.items()})
        self._mirrors[name] = mirror

    def _add(self, name: str, held: BlockBuilder, stats: LayerStats, group: dict) -> None:
        """Add the batch's statistics to the layer's running average."""
        raise NotImplementedError

    def _update_builders(self, jobs: dict[str, tuple[Tensor, Tensor, dict]], normaliser: float):
        """Each layer's builder, the batch added at its statistics steps (and mirrored).

        Sets ``self._updated``, the layers whose statistics this step updates.
        """
        self._updated: set[str] = set()
        for name, (A, G, group) in jobs.items():
            layer = self._trained(name)[0]
            held = self._builder(name, layer, group)
            if A is None and not self._mirrors.get(name):
                raise FisherlabError(
                    f"layer {name!r} has no statistics of its shape (its bias was frozen or "
                    "unfrozen between statistics steps); it takes them at the next statistics "
                    "step"
                )
            if A is not None and self._statistics_step(name, group):
                self._add(name, held, LayerStats(A, G, normaliser), group)
                self._mirror(name, held)
                self._updated.add(name)

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the builders' states are checked first.

        Raises:
            FisherlabError: as :meth:`CurvatureOptimizer.load_state_dict`, and for per-layer
                entries this optimizer does not keep (e.g. a state of an earlier format) or
                builder states that do not fit the layers.
        """
        extra = state_dict.get("fisherlab") if isinstance(state_dict, dict) else None
        if isinstance(extra, dict) and extra.get("optimizer") == type(self).__name__:
            shapes = extra.get("shapes", {})
            for name, saved in extra.get("layers", {}).items():
                here = self.layers.get(name)  # other layers or shapes: the base class says so
                if here is not None and shapes.get(name) == list(here.weight.shape):
                    self._check_saved(name, saved)
        super().load_state_dict(state_dict)
        self.builders.clear()  # rebuilt from the loaded state at the next step
        self._mirrors.clear()

    def _check_saved(self, name: str, saved: dict[str, Any]) -> None:
        """Refuse a saved layer state that this optimizer's builders cannot continue."""
        unknown = sorted(
            k for k in saved if not k.startswith(BUILDER) and k not in self.kept_entries
        )
        if unknown:
            kept = f" and {list(self.kept_entries)}" if self.kept_entries else ""
            raise FisherlabError(
                f"the state of layer {name!r} holds entries {unknown} that "
                f"{type(self).__name__} does not keep (a state of another fisherlab version?); "
                f"it keeps its builder's state (builder.<entry>){kept}"
            )
        entries = {k[len(BUILDER) :]: v for k, v in saved.items() if k.startswith(BUILDER)}
        if not entries:
            return
        layer = self.layers[name]
        entry, axis = self.width_entry
        width = entries.get(entry)
        if layer.has_bias and width is not None and width.shape[axis] == layer.d_in:
            layer = layer.without_bias()  # saved with the bias frozen
        options = self._builder_options(self.param_groups[self._group_index[name]])
        probe = make_builder(self.method, layer, self.fisher_type, normalise="batch", **options)
        probe.load_state_dict(entries)
