"""KFAC (Martens & Grosse 2015): a running-average ``kfac`` builder per layer, periodic eigenbases.

The optimizers of this family hold one block builder per layer (:mod:`fisherlab.blocks`,
``normalise="batch"``): each statistics step adds the batch with weights ``(0, 1)`` the first
time and ``(stat_decay, 1 − stat_decay)`` after that (the exponential running average), and the
block, its eigenbasis and factored damping's inverses come from the builder's block.

**Per-layer state.** The builder's state (:meth:`~fisherlab.blocks.base.BlockBuilder.state_dict`)
is mirrored into the optimizer's per-layer state under ``builder.<entry>`` keys, as clones
(``add`` updates the builder in place): the base class rolls those back after a skipped step,
keeps them ``where(ok, new, old)`` in sync-free steps and saves them in ``state_dict()``. Before
each step the builder is made to agree with its mirror again (after a rollback, a sync-free skip
or ``load_state_dict``). The memory of the statistics is twice the builder's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from fisherlab.blocks import builder as make_builder
from fisherlab.blocks.base import BlockBuilder, LayerStats
from fisherlab.blocks.kfac import DAMPING_MODES, KronBlock
from fisherlab.blocks.kronecker import KroneckerEigenbasis
from fisherlab.conventions import FisherlabError, check_choice, check_positive_int, check_range
from fisherlab.layers import Layer
from fisherlab.optim.base import CurvatureOptimizer
from fisherlab.optim.distributed import all_reduce_mean, computed_once, distributed

#: The prefix of a builder's state entries in an optimizer's per-layer state.
BUILDER = "builder."
#: Builder state entries not mirrored (constants of the builder).
_NOT_MIRRORED = ("pass_index", "per_batch")


def running_average_weights(first: bool, decay: float) -> tuple[float, float]:
    """``(old_weight, new_weight)`` of the optimizers' running average with ``decay``.

    ``(0, 1)`` on the first statistics step (or with ``decay = 0``), ``(decay, 1 − decay)``
    after it: the builder's mass stays exactly 1 (``decay + fl(1 − decay)`` rounds to 1 for every
    ``decay`` in ``(0, 1)``), so its block is ``S ← decay·S + (1 − decay)·x_b``.
    """
    return (0.0, 1.0) if first or decay == 0 else (decay, 1.0 - decay)


class KFAC(CurvatureOptimizer):
    """KFAC with one ``kfac`` builder per layer (module docstring) and its block's solve.

    Args:
        model: The network.
        lr: Learning rate.
        damping: ``λ``: ``1/(λ_Γλ_Ω + λ)`` in the eigenbasis (four products per step), or
            factored Tikhonov damping with ``damping_mode="factored"`` (the two damped inverses
            are formed at each eigen-decomposition: two products per step).
        momentum: Heavy-ball momentum.
        weight_decay: Decoupled weight decay.
        stat_decay: Running-average decay of the factors, in ``[0, 1)``.
        stat_every: Steps between statistics steps (kfac-pytorch's ``factor_update_steps``):
            the factors are updated only when ``steps % stat_every == 0``; on other steps the
            statistics recorded are dropped unused.
        inv_update_freq: Steps between eigen-decompositions (a multiple of ``stat_every``).
        damping_mode: ``"eigen"`` or ``"factored"``.
        kl_clip: Scale updates so that ``lr²·Σ dᵀg ≤ kl_clip`` (``None``: off).
        kfac_approx: ``"expand"`` or ``"reduce"`` factors for convolutions.
        fisher_type: ``"empirical"`` or ``"mc"``.
        eigen_dtype: Dtype of the factors' eigen-decompositions (default: float64 for float32
            statistics; ``torch.float32`` is faster, on GPU in particular).
        spread_eigen: Under ``torch.distributed``, compute each layer's eigen-decompositions
            (or inverses) on one rank and broadcast them
            (:func:`~fisherlab.optim.distributed.computed_once`).
        loss_fn: The loss (needed for ``"mc"``, MSE and ``reduction="sum"``).
        **loop: ``params``, ``output``, ``grad_scaler``: see
            :class:`~fisherlab.optim.CurvatureOptimizer`.

    Attributes:
        builders: ``{layer: BlockBuilder}``, the layers' running-average builders.
    """

    gather_samples = False  # batch factors are averaged across ranks instead
    hyper_parameters = (
        "stat_decay", "stat_every", "inv_update_freq", "damping_mode", "kl_clip", "kfac_approx",
    )  # fmt: skip
    #: The block method of the builders.
    method = "kfac"
    #: The name of ``inv_update_freq`` in the constructor (messages).
    interval_name = "inv_update_freq"
    #: Prefixes of the builder entries that :meth:`_add` changes (``None``: all).
    added_entries: ClassVar[tuple[str, ...] | None] = None
    #: The builder entries averaged across ranks, with the weight of each rank's share.
    reduced: ClassVar[dict[str, str]] = {"gg": "normaliser", "aa": "samples"}

    def __init__(
        self,
        model,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        stat_every: int = 1,
        inv_update_freq: int = 10,
        damping_mode: str = "eigen",
        kl_clip: float | None = None,
        kfac_approx: str = "expand",
        fisher_type: str = "empirical",
        loss_fn=None,
        eigen_dtype: torch.dtype | None = None,
        spread_eigen: bool = True,
        **loop,
    ):
        self.spread_eigen = bool(spread_eigen)
        if eigen_dtype is not None and not (
            isinstance(eigen_dtype, torch.dtype) and eigen_dtype.is_floating_point
        ):
            raise FisherlabError(f"eigen_dtype must be a floating torch.dtype, got {eigen_dtype!r}")
        self.eigen_dtype = eigen_dtype
        self.builders: dict[str, BlockBuilder] = {}
        self._builder_keys: dict[str, tuple] = {}
        self._mirrors: dict[str, dict[str, Tensor]] = {}
        super().__init__(
            model, lr, damping, momentum, weight_decay, fisher_type, loss_fn,
            stat_decay=stat_decay, stat_every=stat_every, inv_update_freq=inv_update_freq,
            damping_mode=damping_mode, kl_clip=kl_clip, kfac_approx=kfac_approx, **loop,
        )  # fmt: skip

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_range("stat_decay", group["stat_decay"], 0.0, 1.0)
        check_positive_int("stat_every", group["stat_every"])
        check_positive_int(self.interval_name, group["inv_update_freq"])
        if group["inv_update_freq"] % group["stat_every"]:
            raise FisherlabError(
                f"{self.interval_name}={group['inv_update_freq']} must be a multiple of "
                f"stat_every={group['stat_every']} (a new basis needs fresh statistics)"
            )
        check_choice("damping_mode", group.get("damping_mode", "eigen"), DAMPING_MODES)
        check_choice("kfac_approx", group["kfac_approx"], ("expand", "reduce"))
        if group.get("kl_clip") is not None:
            check_range("kl_clip", group["kl_clip"], 0.0, open_low=True)

    # ------------------------------------------------------------------ builders
    def _builder_options(self, group: dict) -> dict[str, Any]:
        """The block options of a group's builders."""
        return {"kfac_approx": group["kfac_approx"], "damping_mode": group["damping_mode"]}

    def _input_width(self, name: str) -> int | None:
        """``D`` of the layer's statistics held (``None`` when none are)."""
        aa = self.layer_state[name].get(BUILDER + "aa")
        return None if aa is None else aa.shape[0]

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
            if any(saved[k] is not mirror[k] for k in saved):
                # rolled back or kept where(ok, new, old): the values back into the builder,
                # on the device (its masses are exactly 1 after its first step, see
                # running_average_weights, so only the statistics can differ)
                live = held.state_dict()
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

    def _reduce(self, held: BlockBuilder, stats: LayerStats, names: dict[str, str]) -> None:
        """Average the batch's part of the builder's entries across ranks (by their share).

        After ``S ← αS + βx_r`` on rank ``r`` (``S`` the same on all), the weighted mean over
        ranks is ``αS + β·mean_r(x_r)``: the batch factors of the concatenated batch, added.
        """
        if not distributed():
            return
        live = held.state_dict()
        shares = {"normaliser": float(stats.normaliser), "samples": float(stats.A.shape[0])}
        for entry, share in names.items():
            live[entry].copy_(all_reduce_mean(live[entry], shares[share]))

    def _mirror(
        self, name: str, held: BlockBuilder, changed: tuple[str, ...] | None = None
    ) -> None:
        """Clones of the builder's state into ``layer_state[name]`` (``builder.<entry>``).

        ``changed``: prefixes of the entries the builder has changed since the last mirror
        (``None``: all); the others keep their clones (no copy, and no new statistic for the
        step's finiteness check).
        """
        state = self.layer_state[name]
        for key in [k for k in state if k.startswith(BUILDER)]:
            del state[key]
        kept = self._mirrors.get(name) or {}
        mirror = {
            k: kept[k] if k in kept and not _among(k, changed) else v.clone()
            for k, v in held.state_dict().items()
            if k not in _NOT_MIRRORED
        }
        state.update({BUILDER + k: v for k, v in mirror.items()})
        self._mirrors[name] = mirror

    #: Per-layer entries kept besides the builder's (``builder.<entry>``).
    kept_entries: ClassVar[tuple[str, ...]] = ("eig_gamma", "eig_omega", "inverses")

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
            raise FisherlabError(
                f"the state of layer {name!r} holds entries {unknown} that "
                f"{type(self).__name__} does not keep (a state of another fisherlab version?); "
                f"it keeps its builder's state (builder.<entry>) and {list(self.kept_entries)}"
            )
        entries = {k[len(BUILDER) :]: v for k, v in saved.items() if k.startswith(BUILDER)}
        if not entries:
            return
        layer = self.layers[name]
        aa = entries.get("aa", entries.get("factors.aa"))
        if layer.has_bias and aa is not None and aa.shape[0] == layer.d_in:  # bias frozen
            layer = layer.without_bias()
        options = self._builder_options(self.param_groups[self._group_index[name]])
        probe = make_builder(self.method, layer, self.fisher_type, normalise="batch", **options)
        probe.load_state_dict(entries)

    # ------------------------------------------------------------------ the step
    def _add(self, name: str, held: BlockBuilder, stats: LayerStats, group: dict) -> None:
        """Add the batch's factors to the running average."""
        first = not self._mirrors.get(name)
        held.add(stats, *running_average_weights(first, group["stat_decay"]))
        self._reduce(held, stats, self.reduced)

    def _kron_block(self, held: BlockBuilder, group: dict, **given: Any) -> KronBlock:
        """``Γ ⊗ Ω`` of the builder's state (``given``: its eigenbasis or inverses, if kept).

        The block shares the builder's sums (no copy): it is used before the next ``add``.
        """
        gamma, omega = held.factors(shared=True)
        return KronBlock(
            held.layer, gamma, omega, self.fisher_type,
            {"damping_mode": group.get("damping_mode", "eigen")},
            eigen_dtype=self.eigen_dtype, **given,
        )  # fmt: skip

    def _basis_key(self, group: dict) -> str:
        return "inverses" if group.get("damping_mode") == "factored" else "eig_omega"

    def _prepare(self, jobs: dict[str, tuple[Tensor, Tensor, dict]], normaliser: float) -> None:
        """Update the builders; at inverse updates, what the steps until the next one need.

        Eigenbases (:meth:`~fisherlab.blocks.kfac.KronBlock.eigenbasis`) or factored damping's
        two inverses (:meth:`~fisherlab.blocks.kfac.KronBlock.inverse_factors`), one job per
        layer, shared out across ranks (:func:`~fisherlab.optim.distributed.computed_once`).
        """
        work, like, costs, due = {}, {}, {}, {}
        self._updated: set[str] = set()  # layers whose statistics this step updates
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
                self._mirror(name, held, self.added_entries)
                self._updated.add(name)
            state, width = self.layer_state[name], layer.d_in + layer.has_bias
            key = self._basis_key(group)
            kept = state.get(key)  # a tensor, or a tuple ending with the Ω-side tensor
            kept = kept[-1] if isinstance(kept, tuple) else kept
            fresh = kept is not None and kept.shape[0] == width
            if self.steps % group["inv_update_freq"] != 0 and fresh:
                continue
            factored = key == "inverses"
            due[name] = group["damping"] if factored else None
            block = self._kron_block(self._basis_source(held), group)
            if factored:
                work[name] = lambda b=block, d=group["damping"]: b.inverse_factors(d)
                like[name] = (block.gamma, block.omega)
            else:
                work[name] = lambda b=block: _basis_tensors(b.eigenbasis())
                like[name] = (block.gamma[0], block.gamma, block.omega[0], block.omega)
            costs[name] = block.gamma.shape[0] ** 3 + block.omega.shape[0] ** 3
        out = computed_once(work, like, costs, self.spread_eigen)
        for name, damping in due.items():
            self._new_basis(name, damping, out[name])
        self._new_bases = set(due)

    def _basis_source(self, held: BlockBuilder) -> BlockBuilder:
        """The builder whose factors give the basis (KFAC: the layer's own)."""
        return held

    def _new_basis(self, name: str, damping: float | None, tensors: tuple[Tensor, ...]) -> None:
        """Keep a new eigenbasis (or factored inverses) until the next one."""
        state = self.layer_state[name]
        if damping is not None:
            state["inverses"] = (damping, *tensors)
        else:
            lg, ug, lo, uo = tensors
            state["eig_gamma"], state["eig_omega"] = (lg, ug), (lo, uo)

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor,
        group: dict,
    ) -> Tensor:  # fmt: skip
        state = self.layer_state[name]
        basis = None
        if "eig_gamma" in state and "eig_omega" in state:
            (lg, ug), (lo, uo) = state["eig_gamma"], state["eig_omega"]
            basis = KroneckerEigenbasis(ug, uo, lg, lo)
        block = self._kron_block(
            self.builders[name], group, eigenbasis=basis, inverse_factors=state.get("inverses")
        )
        direction = block.solve(grad, group["damping"])
        if group["damping_mode"] == "factored":  # kept until the next eigen-decomposition
            state["inverses"] = (group["damping"], *block.inverse_factors(group["damping"]))
        return direction

    def _scale(
        self, directions: dict[str, Tensor], grads: dict[str, Tensor], groups: dict[str, dict]
    ) -> dict[str, Tensor | float]:
        """KL clipping, per param group: ``lr²·Σ dᵀg ≤ kl_clip`` over the group's layers."""
        sums: dict[int, Tensor] = {}
        for n in directions:
            if groups[n]["kl_clip"] is not None:
                vg = (directions[n] * grads[n]).sum() * groups[n]["lr"] ** 2
                sums[id(groups[n])] = sums.get(id(groups[n]), 0) + vg
        factors: dict[str, Tensor | float] = {}
        for n in directions:
            clip = groups[n]["kl_clip"]
            if clip is None:
                factors[n] = 1.0
            else:  # no host synchronisation: the factor stays a tensor
                vg = sums[id(groups[n])]
                factors[n] = torch.clamp(torch.sqrt(clip / vg.abs().clamp_min(1e-30)), max=1.0)
        return factors


def _among(key: str, prefixes: tuple[str, ...] | None) -> bool:
    """Whether ``key`` starts with one of ``prefixes`` (every key for ``None``)."""
    return prefixes is None or key.startswith(prefixes)


def _basis_tensors(basis: KroneckerEigenbasis) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(λ_Γ, U_Γ, λ_Ω, U_Ω)`` of an eigenbasis (what :func:`computed_once` broadcasts)."""
    return basis.values_gamma, basis.u_gamma, basis.values_omega, basis.u_omega
