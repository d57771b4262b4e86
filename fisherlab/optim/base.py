"""The shared machinery of fisherlab's optimizers: the ``torch.optim`` contract, safety, state.

:class:`CurvatureOptimizer` wires the parts: its ``step()`` computes the preconditioned
directions (the subclasses' hooks ``_prepare``, ``_direction``, ``_revise``), settles whether
the step is taken (:mod:`~fisherlab.optim.rollback`) and applies the directions
(``_scale``, then :mod:`~fisherlab.optim.update`); ``GradScaler`` is read by
:mod:`~fisherlab.optim.amp`, and the per-layer state is :mod:`~fisherlab.optim.state`'s.

Every optimizer is a ``torch.optim.Optimizer`` built from the model (its layers are needed)::

    opt = fl.optim.KFAC(model, lr=0.01, damping=1e-3)
    opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()

**What is preconditioned.** ``step()`` preconditions ``p.grad`` as it is when it runs — after
clipping, ``GradScaler`` unscaling, penalties in the loss, several ``backward()`` calls,
accumulation over micro-batches and DDP averaging. Subclasses implement
``_direction(name, layer, A, G, ν, g, group)``, the preconditioned ``g`` of one layer.

**How statistics are gathered** (:class:`fisherlab.capture.Recorder`, the recorder the analyses
use too): every forward pass of the model with grad enabled records each layer's ``Ã``, every
backward pass through it the output gradients. They accumulate like ``p.grad``: over all
passes and backward calls since the last ``step()`` that write ``p.grad`` (``torch.autograd.grad``
calls, e.g. an adversarial attack's, add nothing); ``zero_grad()`` drops the gradients
recorded so far. A pass without backward, or under ``no_grad``, adds and erases nothing. A
layer called several times in one forward pass contributes every call (more positions of the
same samples); two calls of the model are two sets of samples. The statistics are read as
the per-sample decomposition of the gradient of the loss over all samples since the last step
(``ν`` of all of them, see :class:`~fisherlab.capture.Recorder`): micro-batch losses are to be
divided by the number of micro-batches, as in the usual accumulation loop. With
``fisher_type="mc"`` the loop adds one extra backward with sampled labels, for the statistics
only: ``loss = …; opt.mc_backward(); loss.backward(); opt.step()``.

**Mixed precision.** ``scaler.step(opt)`` hands the scale to the optimizer
(``_step_supports_amp_scaling``): gradients and statistics are unscaled together, and a step
whose gradients overflowed is skipped (counted in :attr:`CurvatureOptimizer.skipped_steps`),
as ``GradScaler`` expects. If the loop calls ``scaler.unscale_(opt)`` itself (to clip), pass
``grad_scaler=scaler`` so that the statistics can be unscaled too.

**Param groups** (``params=`` as for any ``torch.optim`` optimizer; default: all trainable
parameters of the model): each layer is preconditioned with the ``lr``, ``damping``,
``momentum``, ``weight_decay`` and method options of the group that holds its weight (its bias
must be in the same group). Hyper-parameters are validated again at every step, so LR
schedulers and manual changes work and bad values fail clearly. ``add_param_group`` adds
layers.

Shared behaviour:

* Trainable parameters the optimizer has no block for (today: outside ``Linear``,
  ``Conv2d`` and attention's projections, e.g. BatchNorm, LayerNorm, Embedding) are refused at
  construction, naming the modules; with ``unsupported="sgd"`` they get the plain gradient
  step (with the group's lr, momentum and weight decay), and a one-time warning names them.
  A layer whose bias is frozen is preconditioned on its weight alone.
* ``p.grad`` is checked against the gradient the statistics decompose on the first step and
  every ``check_gradients_every`` steps: a weight also used outside its module's call is
  refused by name (:meth:`CurvatureOptimizer._check_gradients`).
* Weight decay is decoupled (``θ ← θ − lr·wd·θ``); momentum is heavy-ball on the update.
* A step whose gradients or statistics hold NaN/Inf, or whose curvature overflows or cannot be
  inverted, is skipped for all parameters, with a warning naming the layers; nothing is
  updated, neither parameters nor statistics (they are rolled back). Skipped steps are counted
  in ``skipped_steps`` (also in ``state_dict()``). Deciding it takes one host synchronisation;
  with ``sync_free=True`` (default on CUDA) none: statistics become ``where(ok, new, old)`` and
  updates apply under the same flag on the device, a skipped step is silent and counted there,
  and ``steps`` advances either way (steps whose statistics have no old value synchronise).
* Statistics live on the parameters' device, in float64 for float64 models, else float32.
* ``state_dict()`` holds the per-layer statistics too, so a resumed run continues
  bit-identically; ``load_state_dict`` refuses a state saved for other layers or shapes.
* The hooks are global module hooks acting on this model only: copies (``copy.deepcopy``,
  e.g. for an EMA or a teacher) and pickles (``torch.save(model)``) of the model carry none.
* With ``track_direction_cosine = True`` (off by default: it adds three reductions per step),
  every step accumulates on the device the cosine between the preconditioned gradient
  ``d = (F̂+λI)⁻¹g`` (after KL clipping, before momentum and weight decay) and ``g``, over all
  preconditioned layers jointly; :meth:`~CurvatureOptimizer.direction_cosine` returns their
  mean. Near 1 the preconditioner does nothing but rescale the step (``λ ≫ λ_max``).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fisherlab.capture import OutputSelector, Recorder
from fisherlab.conventions import FisherlabError, check_choice, check_range
from fisherlab.layers import Layer, find_layers
from fisherlab.linalg import deferred_checks
from fisherlab.losses import LossSpec
from fisherlab.optim import amp, rollback
from fisherlab.optim.distributed import distributed, gather_samples
from fisherlab.optim.rollback import SkippedSteps, finite
from fisherlab.optim.state import LayerState, LayerStates, clone, tensors
from fisherlab.optim.update import apply_updates, parameter_updates, steps_on_device

OPTIM_FISHER_TYPES = ("empirical", "mc")
#: What an optimizer does with parameters it has no block for.
UNSUPPORTED_CHOICES = ("raise", "sgd")


class LayerJob(NamedTuple):
    """What one layer's direction is computed from at a step."""

    #: The layer as trained this step (without its bias when the bias has no gradient).
    layer: Layer
    #: Its parameters with gradients, in the order of the direction's entries.
    params: list[nn.Parameter]
    #: ``Ã`` and ``G`` recorded since the last step (``None`` between statistics steps).
    A: Tensor | None
    G: Tensor | None
    #: ``p.grad`` of ``params``, concatenated, ``[P]`` in the statistics' dtype.
    grad: Tensor
    #: The param group holding the layer.
    group: dict[str, Any]


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
        loss_fn: The loss (``CrossEntropyLoss``/``MSELoss``); needed for ``"mc"`` and for the
            normaliser of MSE (``N·C``) and of ``reduction="sum"`` (``1``). Without it, the loss
            is taken to be a mean over the samples (``ν = N``); a cross-entropy that is not
            (e.g. summed) is detected at the first step and warned about.
        params: Parameters or param groups (dicts), as for any ``torch.optim`` optimizer
            (default: the model's trainable parameters, one group).
        output: Selects the network output ``[N, ...]`` from what the model returns, for
            models returning tuples or dicts: an index, a key or a function.
        grad_scaler: The ``GradScaler`` of the loop; needed only when the loop calls
            ``scaler.unscale_(opt)`` before ``scaler.step(opt)``.
        sync_free: Steps without a host synchronisation once every statistic has a previous
            value (see the module docstring); default: when the parameters are on CUDA.
        unsupported: What to do with trainable parameters the optimizer has no block for:
            ``"raise"`` (default: refused at construction, by module name) or ``"sgd"``
            (the plain gradient step, named in a one-time warning).
        **defaults: Further per-optimizer hyper-parameters (per group).

    Attributes:
        steps: Updates made (the counter method frequencies refer to; sync-free steps count
            whether or not they were skipped).
    """

    gather_samples: bool = True
    #: Layer kinds (:attr:`fisherlab.layers.LayerAdapter.kind`) the optimizer preconditions.
    layer_kinds: tuple[str, ...] = ("linear", "conv2d", "mha_in_proj")
    #: The method's own per-group hyper-parameters (anything else is refused by name).
    hyper_parameters: tuple[str, ...] = ()
    #: ``GradScaler.step`` passes ``grad_scale`` and ``found_inf`` instead of unscaling itself.
    _step_supports_amp_scaling: bool = True

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fisher_type: str = "empirical",
        loss_fn: nn.Module | None = None,
        params: Any = None,
        output: OutputSelector = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        sync_free: bool | None = None,
        unsupported: str = "raise",
        **defaults: Any,
    ):
        if not isinstance(model, nn.Module):
            raise FisherlabError(
                "fisherlab optimizers take the model (its modules are needed), got "
                f"{type(model).__name__}; pass parameters or param groups as params="
            )
        self.unsupported = check_choice("unsupported", unsupported, UNSUPPORTED_CHOICES)
        if fisher_type not in OPTIM_FISHER_TYPES:
            raise FisherlabError(
                f"fisher_type {fisher_type!r} is not available in optimizers; choose one of "
                f"{OPTIM_FISHER_TYPES}"
            )
        unknown = sorted(set(defaults) - set(self.hyper_parameters))
        if unknown:
            known = (
                "lr, damping, momentum, weight_decay, fisher_type, loss_fn, params, output, "
                "grad_scaler, sync_free, unsupported"
                f"{''.join(', ' + h for h in self.hyper_parameters)}"
            )
            raise FisherlabError(
                f"{type(self).__name__} has no argument(s) {unknown}; its arguments: {known}"
            )
        loss = LossSpec.from_module(loss_fn) if loss_fn is not None else None
        if fisher_type == "mc" and loss is None:
            raise FisherlabError("fisher_type='mc' needs loss_fn= to sample labels from the model")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(
            params,
            dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, **defaults),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = find_layers(model, for_optimizer=True, require_any=False)
        self._unsupported = [
            str(w.message).removeprefix("skipping unsupported layers: ") for w in caught
        ]
        self._model_layers = {}
        for name, layer in found.items():
            if layer.layer_kind in self.layer_kinds:
                self._model_layers[name] = layer
            else:
                self._unsupported.append(
                    f"module {name!r} ({layer.kind}): {type(self).__name__} has no block for "
                    f"{layer.layer_kind} layers"
                )
        self.model, self.fisher_type, self.loss = model, fisher_type, loss
        self.grad_scaler = grad_scaler
        owned = [p for g in self.param_groups for p in g["params"]]
        self.stat_dtype = (
            torch.float64 if any(p.dtype == torch.float64 for p in owned) else torch.float32
        )
        self.layers: dict[str, Layer] = {}
        #: ``{layer: LayerState}``: what each layer keeps between steps (saved by state_dict).
        self.layer_state: dict[str, LayerState] = LayerStates()
        self.sync_free = any(p.is_cuda for p in owned) if sync_free is None else bool(sync_free)
        self.steps = 0
        self._skipped = SkippedSteps()
        self.track_direction_cosine = False
        self._cosines: tuple[Tensor, Tensor] | None = None  # (sum, count) on the device
        self._warned: set[str] = set()
        #: Steps between checks that ``p.grad`` is the gradient the statistics decompose (the
        #: first step is always checked); ``0``: never (see :meth:`_check_gradients`).
        self.check_gradients_every = 50
        #: ``τ ≥ λ_max`` of each layer's curvature at the last check (see :meth:`_probe`).
        self.curvature_scale: dict[str, float] = {}
        self._recorder = _StepRecorder(
            model, {}, loss, self.stat_dtype, training=True, output=output
        )
        # the first step checks that a cross-entropy's gradient fits the assumed ν
        self._recorder.watch_output = loss is None or loss.kind == "cross_entropy"
        try:
            self._assign_layers()
        except BaseException:
            self.close()
            raise

    # --------------------------------------------------------------- param groups
    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's hyper-parameters (subclasses add their own)."""
        check_range("lr", group["lr"], 0.0)
        check_range("damping", group["damping"], 0.0, open_low=True)
        check_range("momentum", group["momentum"], 0.0, 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)

    def _check_groups(self) -> None:
        for index, group in enumerate(self.param_groups):
            try:
                self._check_group(group)
            except FisherlabError as err:
                raise FisherlabError(f"param group {index}: {err}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``torch.optim`` semantics); its supported layers are preconditioned."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            if hasattr(self, "_recorder"):  # after construction
                self._assign_layers()
        except FisherlabError as err:
            self.param_groups.pop()
            raise FisherlabError(f"param group {len(self.param_groups)}: {err}") from None

    def _assign_layers(self) -> None:
        """Which layers are preconditioned, with which group; warn about the rest once."""
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        plain = list(self._unsupported) if self._plain_parameters(group_of) else []
        self._group_index: dict[str, int] = {}
        layers = {}
        for name, layer in self._model_layers.items():
            weight, bias = layer.weight, layer.bias_parameter
            w = group_of.get(id(weight))
            b = group_of.get(id(bias)) if bias is not None else None
            if w is None:
                if b is not None:
                    plain.append(
                        f"the bias of {name!r} ({layer.kind}; its weight is not optimized)"
                    )
                continue
            if b is not None and b != w:
                raise FisherlabError(
                    f"the weight and bias of layer {name!r} are in param groups {w} and {b}; "
                    "fisherlab preconditions them as one block: put them in one group"
                )
            # a bias this optimizer does not hold (frozen, or another optimizer's): weight only
            layers[name] = layer if bias is None or b is not None else layer.without_bias()
            self._group_index[name] = w
        if plain and self.unsupported == "raise":
            raise FisherlabError(
                f"{type(self).__name__} has no block for these trained parameters: "
                + "; ".join(plain)
                + ". Pass unsupported='sgd' to give them the plain gradient step, or leave "
                "them out of params="
            )
        if not layers and not plain:
            raise FisherlabError(
                f"{type(self).__name__} preconditions none of the given parameters: the model "
                f"{type(self.model).__name__} has no supported layer among them"
            )
        self.layers = layers
        for name, layer in layers.items():
            self.layer_state.setdefault(name, {})
            self._recorder.add_layer(name, layer)
        self._recorder.idle = not self._statistics_expected()  # new layers need statistics
        message = "; ".join(plain)
        if message and message not in self._warned:
            self._warned.add(message)
            warnings.warn(
                "these layers get the plain gradient step (not preconditioned): " + message,
                UserWarning,
                stacklevel=4,
            )

    def _plain_parameters(self, group_of: dict[int, int]) -> bool:
        """Whether some optimized parameter belongs to no layer the optimizer preconditions."""
        covered = {id(p) for layer in self._model_layers.values() for p in layer.parameters()}
        return any(key not in covered for key in group_of)

    def _trained(self, name: str) -> tuple[Layer, list[nn.Parameter]] | None:
        """The layer as trained this step (bias left out when it has no gradient)."""
        layer = self.layers[name]
        if layer.weight.grad is None:
            return None
        if layer.has_bias and layer.bias_parameter.grad is None:
            layer = layer.without_bias()
        return layer, layer.parameters()

    # ----------------------------------------------------------------- the loop
    def mc_backward(self) -> None:
        """The extra backward of ``fisher_type="mc"``: after the forward, before ``backward()``.

        Nothing between statistics steps (``stat_every``).
        """
        if not self._recorder.idle:
            self._recorder.sample_backward()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (``torch.optim``) and drop the statistics recorded with them."""
        super().zero_grad(set_to_none)
        self._recorder.discard_gradients()

    def _take_statistics(
        self, scale: Tensor | float | None = None
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
        """``{name: (A, G)}`` recorded since the last step, and ``ν``."""
        channels = self._recorder.channels()
        if self.fisher_type == "mc" and "loss" in channels and "mc" not in channels:
            self._recorder.clear()
            raise FisherlabError(
                "fisher_type='mc' needs optimizer.mc_backward() after the forward pass and "
                "before loss.backward()"
            )
        channel = "mc" if self.fisher_type == "mc" else "loss"
        watched = self._recorder.output_gradients() if self._recorder.watch_output else None
        cap = self._recorder.take(channel, self.fisher_type, scale=scale)
        #: the least precise dtype the step's statistics were computed in (autocast: bf16/fp16)
        self._precision = cap.precision or self.stat_dtype
        if watched:
            self._recorder.watch_output = False
            self._check_loss_scale(watched, cap.normaliser, cap.num_samples, scale)
        return {name: (lc.A, lc.G) for name, lc in cap.items()}, cap.normaliser

    def _check_loss_scale(
        self,
        watched: list[tuple[Tensor, Tensor]],
        normaliser: float,
        num_samples: int,
        scale: Tensor | float | None,
    ) -> None:
        """Warn when a cross-entropy's output gradient exceeds ``1/ν`` (a mis-read ``ν``).

        The gradient of a cross-entropy summed over samples and divided by ``ν`` is
        ``(softmax − onehot)/ν`` per sample: its rows sum to zero and its entries lie within
        ``±1/ν``. Gradients whose rows sum to zero (the signature of a softmax cross-entropy)
        but exceed ``1/ν`` come from a loss larger than assumed.
        """
        for out, grad in watched:
            if out.ndim != 2 or out.shape[1] < 2:
                continue
            g = grad.double() if scale is None else grad.double() / scale
            peak = float(g.abs().max())
            if peak == 0 or float(g.sum(1).abs().max()) > 1e-2 * peak:
                continue  # not a softmax cross-entropy's gradient
            if peak * normaliser > 1 + 1e-3:
                warnings.warn(
                    f"the loss's gradient w.r.t. the network output reaches {peak * normaliser:.3g}"
                    f"/ν, with ν = {normaliser:g} for the {num_samples} samples since the last "
                    "step; a mean cross-entropy's stays within 1/ν. The loss is not the mean "
                    "over these samples — reduction='sum' (pass loss_fn= with it), or "
                    "micro-batch losses not divided by their number — so the curvature would be "
                    "mis-scaled",
                    UserWarning,
                    stacklevel=4,
                )
                return

    def _statistics_due(self) -> bool:
        """Whether this step uses the statistics recorded since the last one.

        Default: every step. Otherwise (``stat_every`` of KFAC and EKFAC) the recorded
        statistics are dropped, and ``_prepare`` and ``_direction`` get ``A = G = None``.
        """
        return True

    def _statistics_expected(self) -> bool:
        """Whether the next step may use statistics: if not, the recorder records nothing.

        Default: every step.
        """
        return True

    def _prepare(self, jobs: dict[str, tuple[Tensor, Tensor, dict]], normaliser: float) -> None:
        """Work for all layers at once before their directions, ``{name: (A, G, group)}``.

        KFAC and EKFAC update their factors and eigen-decompositions here (shared out across
        ranks under ``torch.distributed``).
        """

    def _direction(
        self,
        name: str,
        layer: Layer,
        A: Tensor,
        G: Tensor,
        normaliser: float,
        grad: Tensor,
        group: dict[str, Any],
    ) -> Tensor:
        """The preconditioned gradient of one layer, ``[P]`` in parameter order."""
        raise NotImplementedError

    def _scale(
        self, directions: dict[str, Tensor], grads: dict[str, Tensor], groups: dict[str, dict]
    ) -> dict[str, Tensor | float]:
        """A factor per layer applied to its preconditioned direction (KL-clipping in KFAC)."""
        return dict.fromkeys(directions, 1.0)

    def _diagnosis(self, stats: dict[str, tuple[Tensor, Tensor]]) -> str | None:
        """Which statistics and gradients hold NaN/Inf (only on the failure path: it syncs)."""
        bad = [n for n, pair in stats.items() if not all(bool(finite(t)) for t in pair)]
        names = {id(p): n for n, p in self.model.named_parameters()}
        bad_grads = [
            names.get(id(p), "?")
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and not bool(finite(p.grad))
        ]
        if bad or bad_grads:
            return f"non-finite statistics in layers {bad} and non-finite gradients of {bad_grads}"
        return None

    @property
    def skipped_steps(self) -> int:
        """Steps skipped (non-finite values, curvature not invertible, ``GradScaler`` overflow).

        Reading it waits for the count of sync-free steps, kept on the device.
        """
        return int(self._skipped)

    def _add_cosine(
        self,
        directions: dict[str, Tensor],
        factors: dict[str, Any],
        grads: dict[str, Tensor],
        ok: Tensor | None,
    ) -> None:
        """Add this step's ``cos(d, g)`` over all preconditioned layers (on the device)."""
        d = torch.cat([(directions[n] * factors[n]).reshape(-1) for n in directions])
        g = torch.cat([grads[n].reshape(-1) for n in directions])
        norms = torch.linalg.vector_norm(d) * torch.linalg.vector_norm(g)
        cosine = torch.dot(d, g) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        weight = torch.ones_like(cosine) if ok is None else ok.to(cosine.dtype)
        total, count = self._cosines or (torch.zeros_like(cosine), torch.zeros_like(cosine))
        self._cosines = (total + weight * cosine, count + weight)

    def direction_cosine(self) -> float | None:
        """Mean ``cos((F̂+λI)⁻¹g, g)`` over the steps taken since the last call, then reset.

        Only with ``track_direction_cosine = True`` (else, or without a step, ``None``). The
        cosine is over all preconditioned layers jointly, of the direction after KL clipping
        and before momentum and weight decay. Reading it synchronises with the device once.
        """
        if self._cosines is None:
            return None
        total, count = (float(t) for t in self._cosines)
        self._cosines = None
        return total / count if count else None

    def _skip(self, reason: str, saved: LayerStates | None = None) -> None:
        """Count a skipped step, roll the statistics back, say why."""
        if saved is not None:
            self.layer_state = saved
        self._skipped.add()
        warnings.warn(
            f"step {self.steps} skipped: {reason}; parameters and statistics are unchanged",
            RuntimeWarning,
            stacklevel=4,
        )

    def _probe_due(self) -> bool:
        every = self.check_gradients_every
        return bool(every) and self.steps % every == 0

    def _probe(self, jobs: dict[str, LayerJob], normaliser: float) -> None:
        r"""Check ``p.grad`` against the statistics, and the damping against the curvature.

        **Gradients** (``fisher_type="empirical"``, not under ``torch.distributed``, where
        ``p.grad`` is averaged over ranks and KFAC's statistics are local): refuse layers whose
        ``p.grad`` holds uses of the weight outside the module's call. The statistics
        decompose the gradient of the module's recorded calls,
        :math:`s = \frac1ν \sum_n G_n^\top Ã_n`. ``p.grad`` may differ from ``s`` by what the
        loop legitimately does to it: a common factor (clipping, ``c``) and a multiple of the
        parameter (an L2 penalty or weight decay added to the gradient, ``μθ``); entries at the
        tensor's largest magnitude are left out (``clip_grad_value_`` clamps them). Per parameter
        tensor, the part of ``p.grad`` outside ``span{s, θ}`` is the gradient of other uses of
        the weight (a tied decoder ``F.linear(h, enc.weight.t())``, a layer called outside the
        model's forward): beyond rounding (``1e3·ε`` of the statistics' precision, relative to
        ``‖p.grad‖ + Σ_n ‖G_n‖‖Ã_n‖/ν``) it is refused by name, as the library refuses such
        parameters. Loops that change ``p.grad`` otherwise (e.g. add noise) set
        ``check_gradients_every = 0``.

        **Damping**: warn once when ``λ < ε·τ`` with ``ε`` of the statistics' dtype and
        ``τ = Σ_{r,n} ‖G_{rn}‖²‖Ã_n‖²/ν ≥ tr F̂ ≥ λ_max`` the layer's curvature scale: the
        damped solve cannot resolve ``λ`` beside the curvature (float32 and ``λ = 1e-8``).
        ``τ`` is kept in :attr:`curvature_scale` (TENGraD refines its solve by it).

        Costs one product of the size of the weight gradient per layer and one host
        synchronisation, on the first step and every :attr:`check_gradients_every` steps.
        """
        gradients = self.fisher_type == "empirical" and not distributed()
        names, residuals, limits, layers, scales = [], [], [], [], []
        eps = torch.finfo(getattr(self, "_precision", None) or self.stat_dtype).eps
        tol = min(1e3 * eps, 0.05)
        for name, (layer, params, A, G, grad, _) in jobs.items():
            if not layer.kronecker or not A.is_floating_point():
                continue
            A = layer.kron_inputs(A)
            g_norms, a_norms = G.flatten(2).norm(dim=2), A.flatten(1).norm(dim=1)
            layers.append(name)
            scales.append((g_norms.square() * a_norms.square()).sum() / normaliser)
            if not gradients:
                continue
            implied = layer.to_param_order(torch.einsum("rntd,nte->de", G, A) / normaliser)
            rounding = (g_norms * a_norms).sum() / normaliser
            offset = 0
            for p_name, p in zip(layer.parameter_names(), params):
                g = grad[offset : offset + p.numel()]
                span = [implied[offset : offset + p.numel()], p.detach().reshape(-1).to(g.dtype)]
                offset += p.numel()
                # entries at the largest magnitude may be clamped (clip_grad_value_): left out
                peak = g.abs().max()
                free = (g.abs() < peak * (1 - 1e3 * eps)).to(g.dtype)
                g, span = g * free, [v * free for v in span]
                names.append(f"{name}.{p_name}")
                residuals.append(_outside_span(g, span))
                limits.append(tol * (g.norm() + rounding))
        if not layers:
            return
        flags = [(r > lim).to(scales[0].dtype) for r, lim in zip(residuals, limits)]
        here = scales[0].device  # layers may live on several devices
        values = torch.stack([v.to(here) for v in scales + flags]).tolist()  # one sync
        self.curvature_scale.update(zip(layers, values[: len(layers)]))
        self._check_damping(jobs, layers)
        over = [bool(v) for v in values[len(layers) :]]
        if not any(over):
            return
        outside = [
            f"{n!r} (relative difference {float(r) / max(float(lim) / tol, 1e-300):.2g})"
            for n, r, lim, bad in zip(names, residuals, limits, over)
            if bad
        ]
        raise FisherlabError(
            f"the gradients of {', '.join(outside)} are not the gradient of their module's "
            "recorded calls (up to clipping and an L2 term): the parameters are also used "
            "outside their module's call (a tied weight such as F.linear(h, enc.weight.t()), "
            "the layer called outside the model's forward, x @ layer.weight), so the "
            "statistics miss part of p.grad and no block built from them is its Fisher; route "
            "every use through the module's call inside model(x) (or, if the loop changes "
            "p.grad on purpose, set optimizer.check_gradients_every = 0)"
        )

    def _check_damping(self, jobs: dict[str, LayerJob], layers: list[str]) -> None:
        """Warn once when a layer's ``λ`` is below what the statistics' dtype resolves."""
        eps = torch.finfo(self.stat_dtype).eps
        small = [
            f"{name!r} (λ = {jobs[name].group['damping']:g}, curvature scale "
            f"{self.curvature_scale[name]:.3g})"
            for name in layers
            if jobs[name].group["damping"] < eps * self.curvature_scale[name]
        ]
        if small and "damping" not in self._warned:
            self._warned.add("damping")
            warnings.warn(
                f"the damping of layers {', '.join(small)} is below what {self.stat_dtype} "
                f"statistics resolve (ε = {eps:.2g} times the curvature's scale "
                "Σ‖G‖²‖Ã‖²/ν ≥ λ_max): the damped solve is dominated by rounding; raise the "
                "damping or use float64",
                RuntimeWarning,
                stacklevel=5,
            )

    def _no_statistics(self, missing: list[str], any_found: bool) -> None:
        """Layers with gradients but no statistics: refuse if none has any, else warn once."""
        why = (
            "no forward pass of the model with grad enabled was recorded for them since the "
            "last step (the model ran under no_grad, or a copy or wrapper of it ran instead)"
        )
        if not any_found:
            raise FisherlabError(
                f"layers {missing} have gradients but {why}; fisherlab refuses to take a plain "
                "gradient step in their place"
            )
        key = f"missing {missing}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"layers {missing} have gradients but {why}: they get the plain gradient step "
                "when this happens",
                RuntimeWarning,
                stacklevel=4,
            )

    @torch.no_grad()
    def step(self, closure=None):
        """One update of all parameters (see the module docstring).

        The preconditioned directions of the layers (:meth:`_directions`), then, unless the
        step is bad and rolled back (:meth:`_settle`), applying them (:meth:`_apply`).
        """
        if not self._recorder.attached:
            raise FisherlabError(
                "step() on a closed optimizer: close() removed its hooks, so it records no "
                "statistics any more; make a new optimizer"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        grad_scale, stat_scale, found_inf = amp.loss_scale(self, self.grad_scaler)
        if found_inf is not None and not self.sync_free and bool(found_inf):
            self._recorder.clear()  # GradScaler: an overflow, skipped quietly
            self._skipped.add()
            return loss
        if grad_scale is not None:
            amp.unscale(self.param_groups, grad_scale)
        stats, normaliser = self._statistics(stat_scale)
        jobs = self._jobs(stats)
        stats = stats or {}
        # statistics are replaced, never mutated, so references suffice to roll back
        saved = rollback.snapshot(self.layer_state)
        if self._probe_due():
            self._probe(jobs, normaliser)
        try:
            directions = self._directions(jobs, normaliser)
        except (FisherlabError, RuntimeError) as err:  # e.g. overflowing factors
            reason = f"the curvature could not be inverted ({err})"
            self._skip(self._diagnosis(stats) or reason, saved)
            return loss
        directions = self._revise(directions, {n: job.grad for n, job in jobs.items()})
        taken, ok = self._settle(saved, directions, stats, found_inf)
        if taken:
            self._apply(jobs, directions, ok)
            self.steps += 1
            self._recorder.idle = not self._statistics_expected()
        return loss

    def _statistics(
        self, scale: Tensor | float | None
    ) -> tuple[dict[str, tuple[Tensor, Tensor]] | None, float]:
        """``({name: (A, G)}, ν)`` of this step; ``(None, 1)`` between statistics steps."""
        if not self._statistics_due():  # what was recorded is not used (``stat_every``)
            self._recorder.clear()
            return None, 1.0
        stats, normaliser = self._take_statistics(scale)
        if self.gather_samples and distributed():
            stats, normaliser = gather_samples(stats, normaliser)
        return stats, normaliser

    def _jobs(self, stats: dict[str, tuple[Tensor, Tensor]] | None) -> dict[str, LayerJob]:
        """What each layer with a gradient computes its direction from.

        Between statistics steps (``stats`` is None) its ``A = G = None``. Layers with
        gradients but no statistics in a statistics step are left out (they get the plain
        step; refused when no layer has statistics: :meth:`_no_statistics`).
        """
        jobs, missing = {}, []
        for name in self.layers:
            trained = self._trained(name)
            if trained is None:
                continue
            layer, params = trained
            if stats is None:
                A = G = None
            elif name not in stats:
                missing.append(name)
                continue
            else:
                A, G = stats[name]
                if A.shape[-1] != layer.d_in + layer.has_bias:  # frozen bias: drop the 1 column
                    A = A[..., : layer.d_in]
            group = self.param_groups[self._group_index[name]]
            grad = torch.cat([p.grad.reshape(-1) for p in params]).to(self.stat_dtype)
            jobs[name] = LayerJob(layer, params, A, G, grad, group)
        if missing:
            self._no_statistics(missing, bool(jobs))
        return jobs

    def _directions(self, jobs: dict[str, LayerJob], normaliser: float) -> dict[str, Tensor]:
        """``{layer: d}``, the preconditioned gradients (:meth:`_prepare`, :meth:`_direction`).

        The finiteness checks of the linear algebra are deferred to one, in :meth:`_settle`.
        """
        directions = {}
        with deferred_checks():
            self._prepare({n: (j.A, j.G, j.group) for n, j in jobs.items()}, normaliser)
            for name, (layer, _, A, G, grad, group) in jobs.items():
                directions[name] = self._direction(name, layer, A, G, normaliser, grad, group)
        return directions

    def _settle(
        self,
        saved: LayerStates,
        directions: dict[str, Tensor],
        stats: dict[str, tuple[Tensor, Tensor]],
        found_inf: Tensor | None,
    ) -> tuple[bool, Tensor | None]:
        """Whether the step goes on, and the device flag its updates apply under.

        Sync-free (every replaced statistic restorable on the device): statistics become
        ``where(ok, new, old)`` and the step goes on under ``ok``. Otherwise one host
        synchronisation: a bad step (a ``GradScaler`` overflow, quietly; non-finite values,
        with a warning) is rolled back to ``saved`` and counted.
        """
        changed = rollback.changes(self.layer_state, saved)
        if self.sync_free and self._can_keep_on_device(changed):
            ok = self._finite_flag(changed, directions)
            if found_inf is not None:
                ok = ok & (found_inf == 0)
            rollback.keep_where(ok, self.layer_state, changed)
            self._skipped.add_unless(ok)
            return True, ok
        if found_inf is not None and bool(found_inf):  # GradScaler: quietly, rolled back
            self.layer_state = saved
            self._skipped.add()
            return False, None
        bad = self._non_finite(changed, directions)
        if bad is not None:
            reason = f"the curvature of layers {bad} overflowed (non-finite factors or directions)"
            self._skip(self._diagnosis(stats) or reason, saved)
            return False, None
        return True, None

    def _apply(
        self, jobs: dict[str, LayerJob], directions: dict[str, Tensor], ok: Tensor | None
    ) -> None:
        """Step the parameters: :meth:`_scale` (KL clipping), lr, momentum, weight decay.

        See :mod:`fisherlab.optim.update`; parameters without a direction take ``p.grad``.
        """
        grads = {n: job.grad for n, job in jobs.items()}
        groups = {n: job.group for n, job in jobs.items()}
        factors = self._scale(directions, grads, groups)
        if self.track_direction_cosine and directions:
            self._add_cosine(directions, factors, grads, ok)
        params_of = {n: job.params for n, job in jobs.items()}
        updates = parameter_updates(directions, factors, params_of)
        apply_updates(self.param_groups, self.state, updates, ok)

    # ------------------------------------------------------------ sync-free steps
    def _can_keep_on_device(self, changed: list[rollback.Change]) -> bool:
        """Whether every replaced statistic has an old value to fall back to on the device.

        False at a layer's first step, when a shape or the damping changes, with sparse
        gradients or new momentum buffers: those steps synchronise once, as usual.
        """
        return rollback.restorable(changed) and steps_on_device(self.param_groups, self.state)

    def _finite_flag(self, changed: list[rollback.Change], directions: dict[str, Tensor]) -> Tensor:
        """Whether every gradient, replaced statistic and direction is finite (on the device)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return rollback.all_finite(
            [*directions.values(), *rollback.changed_tensors(changed), *grads]
        )

    def _revise(self, directions: dict[str, Tensor], grads: dict[str, Tensor]) -> dict:
        """Last changes to the directions once all are computed (FNGD's fallback)."""
        return directions

    def _non_finite(
        self, changed: list[rollback.Change], directions: dict[str, Tensor]
    ) -> list[str] | None:
        """``None`` if every gradient, replaced statistic and direction is finite, else layers.

        One host synchronisation; the layers holding non-finite values are found only when the
        test fails.
        """
        if bool(self._finite_flag(changed, directions)):
            return None
        named = [*directions.items()]
        named += [(c.layer, t) for c in changed for t in tensors(c.new)]
        return rollback.non_finite(named)

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove the optimizer's hooks (also done on garbage collection); no step after it."""
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            recorder.remove()

    def __del__(self) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus the per-layer curvature statistics and the counters."""
        state = super().state_dict()
        state["fisherlab"] = {
            "optimizer": type(self).__name__,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "layers": clone(self.layer_state),  # plain dicts
            "shapes": {n: list(layer.weight.shape) for n, layer in self.layers.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, statistics on the parameters' device and dtype.

        The statistics are cast to the statistics' dtype, as ``torch.optim`` casts its state:
        a float32 run's state continues a float64 model and back.

        Raises:
            FisherlabError: when the state was saved by another optimizer class, for other
                layers, for layers of other shapes, or for other param groups.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("fisherlab", None)
        if extra is None:
            raise FisherlabError(
                "this is not the state of a fisherlab optimizer (no 'fisherlab' entry)"
            )
        kind = extra.get("optimizer", type(self).__name__)
        if kind != type(self).__name__:
            raise FisherlabError(f"the state was saved by {kind}, not by {type(self).__name__}")
        saved, ours = sorted(extra["layers"]), sorted(self.layers)
        if saved != ours:
            raise FisherlabError(
                f"the state was saved for layers {saved}, but this optimizer preconditions "
                f"{ours}: load it into an optimizer over the same model and param groups"
            )
        for name, shape in extra.get("shapes", {}).items():
            here = list(self.layers[name].weight.shape)
            if list(shape) != here:
                raise FisherlabError(
                    f"the state was saved for layer {name!r} with weight shape {tuple(shape)}, "
                    f"but the model's is {tuple(here)}"
                )
        device = next(iter(self.layers.values())).weight.device if self.layers else None
        try:  # as torch.optim casts its state to the parameters': to the statistics' dtype
            layer_state = LayerStates(
                {name: clone(s, device, self.stat_dtype) for name, s in extra["layers"].items()}
            )
        except (TypeError, FisherlabError) as err:
            raise FisherlabError(f"the state's per-layer statistics do not fit: {err}") from None
        try:
            super().load_state_dict(state_dict)
        except ValueError as err:
            raise FisherlabError(f"the state does not fit this optimizer: {err}") from None
        self.steps, self.layer_state = extra["steps"], layer_state
        self._recorder.idle = not self._statistics_expected()  # from the loaded state
        self._skipped = SkippedSteps(extra.get("skipped_steps", 0))


class _StepRecorder(Recorder):
    """The optimizer's recorder: while ``idle`` (between statistics steps) it records nothing."""

    idle = False

    def _ignoring(self) -> bool:
        return self.idle or super()._ignoring()


def _outside_span(g: Tensor, span: list[Tensor]) -> Tensor:
    """``‖g − Π g‖`` with ``Π`` the orthogonal projector on ``span`` (Gram–Schmidt, twice)."""
    basis: list[Tensor] = []
    for v in span:
        size = v.norm()
        for _ in range(2):
            for q in basis:
                v = v - q * torch.dot(q, v)
        norm = v.norm()
        keep = norm > 1e-8 * size  # a column (nearly) in the span already adds nothing
        basis.append(torch.where(keep, v / torch.where(keep, norm, 1.0), 0.0))
    r = g
    for _ in range(2):
        for q in basis:
            r = r - q * torch.dot(q, r)
    return r.norm()


__all__ = ["CurvatureOptimizer"]
