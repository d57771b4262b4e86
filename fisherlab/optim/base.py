"""The shared machinery of fisherlab's optimizers: hooks, safety, momentum, state.

Every optimizer is a ``torch.optim.Optimizer`` used in the ordinary loop::

    opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()

With ``fisher_type="mc"`` the loop adds one extra backward with sampled labels, for the
statistics only::

    opt.zero_grad(); loss = loss_fn(model(x), y); opt.mc_backward(); loss.backward(); opt.step()

The statistics ``Ã`` and ``G`` come from :class:`fisherlab.capture.Recorder` (hooks that live
until :meth:`CurvatureOptimizer.close` or garbage collection; the same recorder that captures
statistics for the analyses), taken at each step as a :class:`~fisherlab.capture.Capture`; the
preconditioners are the blocks of :mod:`fisherlab.blocks`. Subclasses implement one method,
``_direction(name, layer, A, G, ν, g)``, returning the preconditioned gradient of one layer in
parameter order.

Shared behaviour:

* Layers fisherlab does not precondition (BatchNorm, LayerNorm, Embedding, …) get the plain
  gradient step, with a one-time warning naming them.
* Weight decay is decoupled (``θ ← θ − lr·wd·θ``); momentum is heavy-ball on the update.
* A step whose gradients or statistics hold NaN/Inf, or whose curvature overflows or cannot be
  inverted, is skipped for all parameters, with a warning naming the layers; nothing is
  updated, neither parameters nor statistics (they are rolled back). Checking costs two host
  synchronisations per step.
* Statistics live on the parameters' device, in float64 for float64 models, else float32.
* ``state_dict()`` holds the per-layer statistics too, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fisherlab.capture import Recorder
from fisherlab.conventions import FisherlabError
from fisherlab.layers import Layer, find_layers
from fisherlab.losses import LossSpec

OPTIM_FISHER_TYPES = ("empirical", "mc")


def check_hyper(
    name: str, value: Any, low: float, high: float | None = None, open_low: bool = False
) -> None:
    """Clear error unless ``low ≤ value`` (``<`` when ``open_low``) and ``value < high``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {high if high is not None else '∞'})"
        raise FisherlabError(f"{name} must lie in {bounds}, got {value!r}")


def check_frequency(name: str, value: Any) -> None:
    """Clear error unless ``value`` is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FisherlabError(f"{name} must be an integer >= 1, got {value!r}")


def distributed() -> bool:
    """Whether ``torch.distributed`` runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over all ranks (itself without ``torch.distributed``)."""
    if distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def gather_samples(
    stats: dict[str, tuple[Tensor, Tensor]], normaliser: float
) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """All ranks' ``Ã`` and ``G`` concatenated along the samples, and the global ``ν``.

    Every rank must use the same local batch size.
    """
    gathered = {}
    for name, (A, G) in stats.items():
        parts_a = [torch.empty_like(A) for _ in range(dist.get_world_size())]
        parts_g = [torch.empty_like(G) for _ in range(dist.get_world_size())]
        dist.all_gather(parts_a, A.contiguous())
        dist.all_gather(parts_g, G.contiguous())
        gathered[name] = (torch.cat(parts_a, dim=0), torch.cat(parts_g, dim=1))
    return gathered, normaliser * dist.get_world_size()


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: see the module docstring.

    Under ``torch.distributed`` (gradients averaged across ranks, e.g. by DDP), statistics are
    combined so that ``W`` ranks with batch ``b`` give the step of one process with batch
    ``W·b``: optimizers that need every sample (TENGraD, FNGD, SKFAC) gather ``Ã`` and ``G``
    (``gather_samples = True``); KFAC and EKFAC average their batch factors and scalings.

    Args:
        model: The network; its supported layers are preconditioned.
        lr: Learning rate.
        damping: ``λ > 0`` added to each curvature block.
        momentum: Heavy-ball momentum in ``[0, 1)``.
        weight_decay: Decoupled weight decay ``≥ 0``.
        fisher_type: ``"empirical"`` (no extra pass) or ``"mc"`` (see module docstring).
        loss_fn: The loss (``CrossEntropyLoss``/``MSELoss``); needed for ``"mc"`` and for MSE's
            normaliser ``N·C``. Without it, the loss is taken to be a mean over the batch.
        **defaults: Further per-optimizer hyper-parameters.
    """

    gather_samples: bool = True

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fisher_type: str = "empirical",
        loss_fn: nn.Module | None = None,
        **defaults: Any,
    ):
        if not isinstance(model, nn.Module):
            raise FisherlabError(
                "fisherlab optimizers take the model (its modules are needed), got "
                f"{type(model).__name__}"
            )
        check_hyper("lr", lr, 0.0)
        check_hyper("damping", damping, 0.0, open_low=True)
        check_hyper("momentum", momentum, 0.0, 1.0)
        check_hyper("weight_decay", weight_decay, 0.0)
        if fisher_type not in OPTIM_FISHER_TYPES:
            raise FisherlabError(
                f"fisher_type {fisher_type!r} is not available in optimizers; choose one of "
                f"{OPTIM_FISHER_TYPES}"
            )
        loss = LossSpec.from_module(loss_fn) if loss_fn is not None else None
        if fisher_type == "mc" and loss is None:
            raise FisherlabError("fisher_type='mc' needs loss_fn= to sample labels from the model")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(
            params,
            dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, **defaults),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layers = find_layers(model, for_optimizer=True)
        if caught:
            warnings.warn(
                "these layers get the plain gradient step (not preconditioned): "
                + str(caught[0].message).removeprefix("skipping unsupported layers: "),
                UserWarning,
                stacklevel=3,
            )
        trainable = {id(p) for p in params}
        self.layers: dict[str, Layer] = {
            name: layer
            for name, layer in layers.items()
            if all(id(p) in trainable for p in layer.parameters())
        }
        self.model = model
        self.fisher_type = fisher_type
        self.stat_dtype = (
            torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        )
        self.layer_state: dict[str, dict[str, Any]] = {name: {} for name in self.layers}
        self.steps = 0
        self._recorder = Recorder(model, self.layers, loss, self.stat_dtype, training=True)

    # ----------------------------------------------------------------- the loop
    def mc_backward(self) -> None:
        """The extra backward of ``fisher_type="mc"``: after the forward, before ``backward()``."""
        self._recorder.sample_backward()

    def _take_statistics(self) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
        """``{name: (A, G)}`` recorded since the last step, and ``ν``."""
        channels = self._recorder.channels()
        if self.fisher_type == "mc" and "loss" in channels and "mc" not in channels:
            self._recorder.clear()
            raise FisherlabError(
                "fisher_type='mc' needs optimizer.mc_backward() after the forward pass and "
                "before loss.backward()"
            )
        channel = "mc" if self.fisher_type == "mc" else "loss"
        cap = self._recorder.take(channel, self.fisher_type)
        return {name: (lc.A, lc.G) for name, lc in cap.items()}, cap.normaliser

    def _direction(
        self, name: str, layer: Layer, A: Tensor, G: Tensor, normaliser: float, grad: Tensor
    ) -> Tensor:
        """The preconditioned gradient of one layer, ``[P]`` in parameter order."""
        raise NotImplementedError

    def _scale(self, directions: dict[str, Tensor], grads: dict[str, Tensor]) -> Tensor | float:
        """A factor applied to all preconditioned directions (KL-clipping in KFAC)."""
        return 1.0

    def _all_finite(self, stats: dict[str, tuple[Tensor, Tensor]]) -> bool:
        flags = [
            torch.isfinite(p.grad).all()
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        flags += [torch.isfinite(t).all() for pair in stats.values() for t in pair]
        return bool(torch.stack(flags).all()) if flags else True

    def _report_non_finite(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        bad = [
            name
            for name, pair in stats.items()
            if not all(bool(torch.isfinite(t).all()) for t in pair)
        ]
        names = {id(p): n for n, p in self.model.named_parameters()}
        bad_grads = [
            names.get(id(p), "?")
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        warnings.warn(
            f"step {self.steps} skipped: non-finite statistics in layers {bad} and non-finite "
            f"gradients of {bad_grads}; parameters and statistics are unchanged",
            RuntimeWarning,
            stacklevel=3,
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One update of all parameters (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stats, normaliser = self._take_statistics()
        if self.gather_samples and distributed():
            stats, normaliser = gather_samples(stats, normaliser)
        if not self._all_finite(stats):
            self._report_non_finite(stats)
            return loss
        group = self.param_groups[0]
        updates: dict[int, Tensor] = {}
        directions, grads = {}, {}
        # statistics are replaced, never mutated, so references suffice to roll back
        saved = {n: {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}
                 for n, s in self.layer_state.items()}  # fmt: skip
        for name, layer in self.layers.items():
            params = layer.parameters()
            if name not in stats or any(p.grad is None for p in params):
                continue
            grad = torch.cat([p.grad.reshape(-1) for p in params]).to(self.stat_dtype)
            A, G = stats[name]
            try:
                directions[name] = self._direction(name, layer, A, G, normaliser, grad)
            except (FisherlabError, RuntimeError) as err:  # e.g. overflowing factors
                self.layer_state = saved
                warnings.warn(
                    f"step {self.steps} skipped: the curvature of layer {name!r} could not be "
                    f"inverted ({err}); parameters and statistics are unchanged",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return loss
            grads[name] = grad
        bad = self._non_finite_updates(saved, directions)
        if bad:
            self.layer_state = saved
            warnings.warn(
                f"step {self.steps} skipped: the curvature of layers {bad} overflowed "
                "(non-finite factors or directions); parameters and statistics are unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        scale = self._scale(directions, grads) if directions else 1.0
        for name, d in directions.items():
            offset = 0
            for p in self.layers[name].parameters():
                updates[id(p)] = (d[offset : offset + p.numel()] * scale).view_as(p).to(p.dtype)
                offset += p.numel()
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            update = updates.get(id(p), p.grad)
            if wd:
                p.mul_(1 - lr * wd)
            if mom:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(mom).add_(update)
                update = state["momentum_buffer"]
            p.add_(update, alpha=-lr)
        self.steps += 1
        return loss

    def _non_finite_updates(self, saved: dict, directions: dict[str, Tensor]) -> list[str]:
        """Layers whose new statistics or direction hold NaN/Inf (one host synchronisation)."""
        checked: list[tuple[str, Tensor]] = [(n, d) for n, d in directions.items()]
        for name, state in self.layer_state.items():
            for key, value in state.items():
                if value is not saved[name].get(key):
                    values = value if isinstance(value, tuple) else (value,)
                    checked += [(name, t) for t in values if isinstance(t, Tensor)]
        if not checked:
            return []
        flags = torch.stack([torch.isfinite(t).all() for _, t in checked])
        if bool(flags.all()):
            return []
        return sorted({name for (name, _), ok in zip(checked, flags.tolist()) if not ok})

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove the optimizer's hooks from the model (also done on garbage collection)."""
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            recorder.remove()

    def __del__(self) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus the per-layer curvature statistics and the step count."""
        state = super().state_dict()
        state["fisherlab"] = {"steps": self.steps, "layers": _clone(self.layer_state)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (statistics moved to the parameters' device)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("fisherlab")
        super().load_state_dict(state_dict)
        device = next(iter(self.layers.values())).module.weight.device if self.layers else None
        self.steps = extra["steps"]
        self.layer_state = {name: _clone(s, device) for name, s in extra["layers"].items()}


def _clone(value: Any, device: torch.device | None = None) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone().to(device) if device is not None else value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v, device) for v in value)
    return value


__all__ = [
    "CurvatureOptimizer",
    "all_reduce_mean",
    "check_frequency",
    "check_hyper",
    "distributed",
    "gather_samples",
]
