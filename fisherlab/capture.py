r"""Capture of per-layer statistics: the one recorder shared by the analyses and the optimizers.

For every supported layer, a :class:`Capture` holds the homogeneous inputs ``Ã`` and the output
gradient rows ``G`` such that the rows of the Fisher's square root are

.. math::
    j_{n,r} = \operatorname{vec}(G_{r,n}^\top Ã_n), \qquad
    F = \frac{1}{ν}\sum_{n,r} j_{n,r} j_{n,r}^\top,

with ``ν`` the loss's normaliser (:meth:`fisherlab.losses.LossSpec.normaliser`). Shapes:
``A: [N, T, d_in (+1)]`` and ``G: [R, N, T, d_out]``, with ``R`` rows per sample for the Fisher
type (``C`` for ``"true"``, ``k`` for ``"mc"``, ``1`` for ``"empirical"``).

:class:`Recorder` is the one mechanism that produces captures. Its hooks record, for every
forward call of a layer with grad enabled, the layer's ``Ã``, and, for every backward pass that
reaches that call's output, its ``G``; the statistics accumulate over passes until
:meth:`Recorder.take` returns them as one :class:`Capture` (samples of all passes concatenated,
``ν`` of all passes combined). :func:`capture` uses it one-shot, with ``R`` backward passes of
output rows; the optimizers keep one attached across training steps and take it at each step.

Example:
    >>> import torch, fisherlab as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    >>> cap = fl.capture(model, torch.nn.CrossEntropyLoss(), x, y, fisher_type="true")
    >>> cap["0"].A.shape, cap["0"].G.shape
    (torch.Size([5, 1, 5]), torch.Size([2, 5, 1, 3]))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError, check_memory, format_bytes
from fisherlab.layers import Layer
from fisherlab.losses import LossSpec
from fisherlab.problem import Batch, Problem, as_problem


@dataclass(frozen=True)
class LayerCapture:
    """Captured statistics of one layer.

    Attributes:
        layer: The layer (name, module, adapter).
        A: Homogeneous inputs ``[N, T, d_in (+1)]``.
        G: Output-gradient rows ``[R, N, T, d_out]`` of the per-sample summed loss.
    """

    layer: Layer
    A: Tensor
    G: Tensor

    @property
    def positions(self) -> int:
        """``T``, the positions per sample sharing the weight."""
        return self.A.shape[1]

    @property
    def rows(self) -> int:
        """``M = R·N``, the rows of the Fisher's square root."""
        return self.G.shape[0] * self.G.shape[1]

    def jacobian_rows(self) -> Tensor:
        """The rows ``j_{n,r}`` in parameter order, ``[R, N, P]`` (no ``1/√ν`` applied)."""
        return self.layer.gradients_from_rows(self.A, self.G)

    def per_sample_gradients(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias gradient rows, ``[R, N, *weight.shape]`` and ``[R, N, *bias.shape]``."""
        parts = self.layer.split_parameters(self.jacobian_rows())
        return parts[0], (parts[1] if self.layer.has_bias else None)


@dataclass(frozen=True)
class Capture(Mapping[str, LayerCapture]):
    """Captured statistics of every supported layer, keyed by module name.

    Attributes:
        layers: Per-layer captures.
        fisher_type: The Fisher type the rows were computed for.
        mc_samples: Labels drawn per input (``"mc"`` only).
        loss: Loss kind and reduction.
        normaliser: ``ν``, so that ``F = (1/ν) Σ j jᵀ``.
        num_samples: ``N``, the samples of all recorded passes.
        precision: The least precise floating-point dtype the statistics were computed in
            before they were stored (e.g. ``bfloat16`` under autocast), when recorded.
    """

    layers: dict[str, LayerCapture]
    fisher_type: str
    mc_samples: int
    loss: LossSpec | None
    normaliser: float
    num_samples: int = field(default=0)
    precision: torch.dtype | None = None

    def __getitem__(self, name: str) -> LayerCapture:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        """``N`` (the same as :attr:`num_samples`)."""
        return self.num_samples

    @property
    def nbytes(self) -> int:
        """Bytes held by the captured tensors."""
        return sum(
            t.numel() * t.element_size() for lc in self.layers.values() for t in (lc.A, lc.G)
        )


# ------------------------------------------------------------------------------ the recorder
@dataclass
class _Call:
    """One forward call of one layer: its ``Ã`` and the output gradients that reached it."""

    A: Tensor
    output: Tensor | None
    grads: dict[str, list[Tensor]] = field(default_factory=dict)
    #: Training recorders: the gradient accumulators of the layer's trainable parameters (the
    #: autograd nodes that write their ``.grad``), to tell which backward passes reach them.
    sinks: tuple[Any, ...] = ()


@dataclass
class _Pass:
    """One forward pass of the model with grad enabled."""

    normaliser: float | None = None
    num_samples: int | None = None
    output: Tensor | None = None
    calls: dict[str, list[_Call]] = field(default_factory=dict)
    #: Why the pass's output cannot be read (a tuple without ``output=``, …), if it cannot.
    problem: str | None = None
    #: Gradients w.r.t. the network output, kept only while :attr:`Recorder.watch_output`.
    output_value: Tensor | None = None
    output_grads: list[Tensor] = field(default_factory=list)


def _reaches_grad(sinks: tuple[Any, ...]) -> bool:
    """Whether the running backward pass writes the ``.grad`` of a parameter with these sinks.

    Called from a gradient hook. ``loss.backward()`` executes every accumulator; a
    ``torch.autograd.grad`` call executes none (it returns its gradients instead), nor does
    ``backward(inputs=…)`` for parameters outside ``inputs``. No sinks (nothing trainable):
    ``True``.
    """
    if not sinks:
        return True
    for node in sinks:
        try:
            if torch._C._will_engine_execute_node(node):
                return True
        except RuntimeError:  # autograd.grad w.r.t. the parameter itself: no .grad is written
            continue
    return False


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, …) runs.

    Its passes are not recorded: they are someone's own per-sample computation, not training.
    """
    return torch._C._are_functorch_transforms_active()


#: Channels whose gradients are those of the user's reduced loss (summed over backward calls).
_LOSS_CHANNELS = frozenset({"loss"})

#: What selects the network output from what the model returns.
OutputSelector = int | str | Callable[[Any], Tensor] | None


def _selector(output: OutputSelector) -> Callable[[Any], Any]:
    if output is None:
        return lambda out: out
    if callable(output):
        return output
    if isinstance(output, int | str) and not isinstance(output, bool):
        return lambda out: out[output]
    raise FisherlabError(
        f"output= must be an index, a key or a function of the model's output, got {output!r}"
    )


class Recorder:
    r"""Hooks that accumulate ``Ã`` and ``G`` of every supported layer until taken.

    A forward pass of ``model`` with grad enabled opens a pass; each supported layer called in it
    stores its ``Ã`` and hooks its output, so that every backward pass through that output
    delivers ``G`` (into the current *channel*). Forward passes without backward and passes
    under ``no_grad`` add nothing and erase nothing. A layer called several times in one pass
    contributes every call, as more positions of the same sample (its per-sample gradient is
    the sum over the calls). :meth:`take` returns everything recorded since the last take as
    one :class:`Capture` and forgets it.

    Channels say what the incoming gradients are:

    * ``"loss"`` (the default): gradients of the scalar the user back-propagates. Several
      backward calls through one pass add up (as they do in ``p.grad``), and the rows are
      scaled by the ``ν`` of all passes taken together: the statistics are the per-sample
      decomposition of the gradient accumulated since the last take, read as the gradient of
      the loss over all those samples, :math:`\nabla L = \frac1ν \sum_n j_n` (the usual
      accumulation, micro-batch losses weighted by ``ν_pass/ν``; one batch: any loss).
    * any other name (``"rows"``, ``"mc"``): per-sample rows already, one row per backward
      call, taken as they are.

    A training recorder counts in ``"loss"`` only the backward passes that write the ``.grad``
    of a recorded layer's trainable parameters: ``torch.autograd.grad`` calls (an adversarial
    attack's gradient w.r.t. the input, a gradient penalty) add nothing, as they add nothing
    to ``p.grad``.

    The hooks are global module hooks that act only on this model's modules, so the model
    itself carries none: copies and pickles of it are not tied to the recorder.

    Args:
        model: The network whose forward calls open passes.
        layers: Its supported layers.
        loss: The loss, if known: it gives each pass's ``ν`` (else ``ν = N``, a mean over the
            batch) and the distribution to sample labels from (:meth:`sample_backward`).
        dtype: Dtype the statistics are stored in (default: as computed).
        force_grad: Where a layer's output does not require grad (nothing upstream does),
            replace it by a leaf that does, so that ``G`` can be taken without changing any
            parameter's ``requires_grad`` (one-shot use).
        training: A recorder attached for training (an optimizer's): it ignores the passes
            fisherlab's own computations make on the model (:func:`analysis_scope`).
        output: Selects the network output ``[N, ...]`` from what the model returns (an index,
            a key or a function), for models returning tuples or dicts.
    """

    #: While positive, recorders made for training record nothing (:func:`analysis_scope`).
    _paused: ClassVar[int] = 0

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, Layer],
        loss: LossSpec | None = None,
        dtype: torch.dtype | None = None,
        force_grad: bool = False,
        training: bool = False,
        output: OutputSelector = None,
    ):
        self.model, self.loss, self.dtype = model, loss, dtype
        self.force_grad, self.training = force_grad, training
        self.select = _selector(output)
        self.layers: dict[str, Layer] = {}
        self._names: dict[int, str] = {}
        self._forwards: dict[int, Callable[..., Any]] = {}
        for name, layer in layers.items():
            self.add_layer(name, layer)
        #: Keep the gradients w.r.t. the network output (see :meth:`output_gradients`).
        self.watch_output = False
        self.channel = "loss"
        self._passes: list[_Pass] = []
        self._open: _Pass | None = None
        self._precision: torch.dtype | None = None
        self._handles = [
            register_module_forward_pre_hook(self._pre_hook),
            register_module_forward_hook(self._hook, with_kwargs=True),
        ]

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def add_layer(self, name: str, layer: Layer) -> None:
        """Record ``layer`` too (its module must belong to the model).

        A layer whose adapter gives ``recording_module(module) = (owner, record_forward)`` is
        recorded by ``owner``'s forward hook instead: ``record_forward(owner, args, kwargs,
        record)`` computes ``owner``'s output again, handing every use of a layer's parameters
        to ``record`` (a module that uses several layers' parameters functionally, as
        ``nn.MultiheadAttention`` does; :mod:`fisherlab.layers.attention`).
        """
        self.layers[name] = layer
        self._names[id(layer.module)] = name
        recording = layer.adapter.recording_module(layer.module)
        if recording is not None:
            owner, record_forward = recording
            self._forwards[id(owner)] = record_forward

    def remove(self) -> None:
        """Remove the hooks and forget everything recorded (the model is then as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place (until :meth:`remove`)."""
        return bool(self._handles)

    def clear(self) -> None:
        """Forget everything recorded since the last take."""
        self._passes = []
        self._open = None
        self._precision = None

    def discard_gradients(self) -> None:
        """Forget the gradients recorded so far, keep the passes (``optimizer.zero_grad()``).

        A pass whose backward comes later still contributes then.
        """
        for p in self._passes:
            p.output_grads.clear()
            for calls in p.calls.values():
                for call in calls:
                    call.grads.clear()

    @contextlib.contextmanager
    def recording(self, channel: str) -> Iterator[None]:
        """Backward passes inside the block deliver their gradients into ``channel``."""
        previous, self.channel = self.channel, channel
        try:
            yield
        finally:
            self.channel = previous

    def input_bytes(self) -> int:
        """Bytes of the layers' inputs ``Ã`` recorded since the last take."""
        return sum(
            call.A.numel() * call.A.element_size()
            for p in self._passes
            for calls in p.calls.values()
            for call in calls
        )

    @property
    def num_passes(self) -> int:
        """Forward passes recorded since the last take."""
        return len(self._passes)

    # -------------------------------------------------------------------- hooks
    def _ignoring(self) -> bool:
        return self.training and Recorder._paused > 0

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if module is not self.model:
            return
        if not torch.is_grad_enabled() or self._ignoring() or _transformed():
            self._open = None
            return
        if self._passes:  # only the latest pass keeps its outputs (for mc sampling)
            last = self._passes[-1]
            last.output = None
            for calls in last.calls.values():
                for call in calls:
                    call.output = None
        self._open = _Pass()
        self._passes.append(self._open)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        replaced = None
        record_forward = self._forwards.get(id(module))
        if record_forward is not None:
            if self._recording():
                replaced = record_forward(module, args, kwargs, self._record_use)
        else:
            name = self._names.get(id(module))
            if name is not None:
                replaced = self._record_call(name, module, args, output)
        if module is self.model:
            self._close_pass(output if replaced is None else replaced)
        return replaced

    def _close_pass(self, output: Any) -> None:
        current, self._open = self._open, None
        if current is None:
            return
        try:
            selected = self.select(output)
        except (KeyError, IndexError, TypeError) as err:
            current.problem = (
                f"output= could not select the network output from the model's "
                f"{type(output).__name__} ({type(err).__name__}: {err})"
            )
            return
        if not isinstance(selected, Tensor) or selected.ndim == 0:
            current.problem = (
                f"the model returns {type(selected).__name__}; fisherlab needs the network "
                "output [N, ...] the loss is computed from: pass output= (an index, a key or a "
                "function of the model's output) to select it"
            )
            return
        current.output = selected
        current.num_samples = selected.shape[0]
        current.normaliser = (
            self.loss.normaliser(selected) if self.loss is not None else float(selected.shape[0])
        )
        if self.watch_output and selected.requires_grad:
            current.output_value = selected.detach()

            sinks = tuple(n for calls in current.calls.values() for c in calls for n in c.sinks)

            def watch(g: Tensor) -> None:
                if self.channel in _LOSS_CHANNELS and (not self.training or _reaches_grad(sinks)):
                    current.output_grads.append(g.detach())

            selected.register_hook(watch)

    def _recording(self) -> bool:
        """Whether a layer call now is recorded (an open pass, grad enabled, not paused)."""
        return self._open is not None and torch.is_grad_enabled() and not self._ignoring()

    def _record_call(self, name: str, module: nn.Module, args: tuple, output: Any) -> Any:
        if not isinstance(output, Tensor) or not self._recording():
            return None
        adapter = self.layers[name].adapter
        A = adapter.inputs(module, args[0].detach())
        replaced = self._store(name, A, output, lambda g: adapter.output_rows(module, g))
        return replaced if replaced is not output else None

    def _record_use(
        self, module: nn.Module, A: Tensor, output: Tensor, rows: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """One use of the parameters of ``module`` inside a recorded forward.

        See :meth:`add_layer`. ``A [N, T, D]``, the use's ``output`` and ``rows`` mapping
        ``∂/∂output`` to ``G [N, T, d_out]``. Returns the tensor to compute on with.
        """
        name = self._names.get(id(module))
        if name is None or not self._recording():
            return output
        return self._store(name, A, output, rows)

    def _store(
        self, name: str, A: Tensor, output: Tensor, rows: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """Store a call of layer ``name`` and hook its output.

        Returns the output to compute on with (a leaf replacing it where it does not require
        grad and :attr:`force_grad`).
        """
        if not output.requires_grad:
            if not self.force_grad:
                return output
            output = output.detach().requires_grad_(True)
        self._note_precision(A.dtype)
        keep = self.dtype is None or not A.is_floating_point()  # token indices stay integers
        sinks = ()
        if self.training:  # only backward passes that write p.grad count as the loss's
            sinks = tuple(
                torch.autograd.graph.get_gradient_edge(p).node
                for p in self.layers[name].parameters()
                if p.requires_grad
            )
        call = _Call(A if keep else A.to(self.dtype), output, sinks=sinks)
        self._open.calls.setdefault(name, []).append(call)

        def grad_hook(g: Tensor) -> None:
            if self._ignoring():
                return
            if self.channel in _LOSS_CHANNELS and not _reaches_grad(call.sinks):
                return  # e.g. torch.autograd.grad(loss, x) of an adversarial attack
            G = rows(g.detach())
            self._note_precision(G.dtype)
            G = G if self.dtype is None else G.to(self.dtype)
            call.grads.setdefault(self.channel, []).append(G)

        output.register_hook(grad_hook)
        return output

    def _note_precision(self, dtype: torch.dtype) -> None:
        if dtype.is_floating_point and (
            self._precision is None or torch.finfo(dtype).eps > torch.finfo(self._precision).eps
        ):
            self._precision = dtype

    # -------------------------------------------------------------------- use
    def channels(self) -> set[str]:
        """The channels that received gradients since the last take."""
        return {
            c
            for p in self._passes
            for calls in p.calls.values()
            for call in calls
            for c in call.grads
        }

    def layer_outputs(self) -> list[tuple[str, Tensor]]:
        """``(name, output)`` of every layer call in the latest pass (to take gradients)."""
        if not self._passes:
            return []
        return [
            (name, call.output)
            for name, calls in self._passes[-1].calls.items()
            for call in calls
            if call.output is not None
        ]

    def network_output(self) -> Tensor | None:
        """The network output of the latest pass (``None`` if there is none)."""
        return self._passes[-1].output if self._passes else None

    def output_gradients(self) -> list[tuple[Tensor, Tensor]]:
        """``(output, ∂/∂output)`` of the passes since the last take, while watching outputs."""
        return [
            (p.output_value, torch.stack(p.output_grads).sum(0))
            for p in self._passes
            if p.output_value is not None and p.output_grads
        ]

    def sample_backward(self, mc_samples: int = 1) -> None:
        """Backward passes with labels drawn from the model, into the ``"mc"`` channel.

        Only the statistics see them (gradients w.r.t. the layers' outputs; no ``.grad`` is
        touched).
        """
        out = self.network_output()
        if self.loss is None or out is None:
            raise FisherlabError(
                "the Monte-Carlo Fisher needs the loss (pass loss_fn= to the optimizer) and a "
                "forward pass with grad enabled before mc_backward()"
            )
        rows = self.loss.output_rows(out, out.detach(), "mc", mc_samples)
        outputs = [z for _, z in self.layer_outputs()]
        with self.recording("mc"):
            for r in range(rows.shape[0]):
                torch.autograd.grad(out, outputs, rows[r], retain_graph=True, allow_unused=True)

    def take(
        self,
        channel: str = "loss",
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        rows: int | None = None,
        scale: Tensor | float | None = None,
    ) -> Capture:
        """Everything recorded in ``channel`` since the last take, as one capture; then clears.

        Args:
            channel: Whose gradients to take.
            fisher_type: Recorded in the capture.
            mc_samples: Recorded in the capture.
            rows: ``R``, when every recorded call must have exactly ``R`` gradients (one-shot
                use: a layer the output does not depend on gets zero rows). ``None``: calls
                without gradients in ``channel`` are left out.
            scale: A factor the back-propagated loss was multiplied by (a ``GradScaler``'s
                scale), divided out of ``"loss"`` gradients.

        Raises:
            FisherlabError: when a pass that received gradients has an output fisherlab cannot
                read, or when the calls of a layer cannot be concatenated (different numbers
                of samples or rows).
        """
        passes, self._passes, self._open = self._passes, [], None
        precision, self._precision = self._precision, None
        for p in passes:  # break output → hook → call → output cycles now, not at collection
            p.output = None
            for calls in p.calls.values():
                for call in calls:
                    call.output = None
        summed = channel in _LOSS_CHANNELS
        used: list[_Pass] = []
        per_layer: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        for p in passes:
            found = {}
            for name, calls in p.calls.items():
                parts = []
                for call in calls:
                    grads = call.grads.get(channel, [])
                    if rows is not None and len(grads) < rows:
                        shape = (call.A.shape[0], call.A.shape[1], self.layers[name].d_out)
                        dtype = call.A.dtype  # token indices (Embedding): the weight's
                        if not call.A.is_floating_point():
                            dtype = self.dtype or self.layers[name].weight.dtype
                        zeros = torch.zeros(shape, dtype=dtype, device=call.A.device)
                        grads = grads + [zeros] * (rows - len(grads))
                    if len(grads) == 1:
                        parts.append((call.A, grads[0].unsqueeze(0)))
                    elif grads:
                        G = torch.stack(grads)
                        parts.append((call.A, G.sum(0, keepdim=True) if summed else G))
                if parts:  # several calls: more positions of the same samples
                    found[name] = (
                        _concat(name, [a for a, _ in parts], 1, "positions (calls)"),
                        _concat(name, [g for _, g in parts], 2, "positions (calls)"),
                    )
            if not found:
                continue
            if p.problem is not None:
                raise FisherlabError(p.problem)
            if p.normaliser is None:
                continue
            used.append(p)
            for name, (A, G) in found.items():
                a_list, g_list = per_layer.setdefault(name, ([], []))
                a_list.append(A)
                g_list.append(G)
        if self.loss is not None:
            normaliser = self.loss.total_normaliser(p.normaliser for p in used)
        else:
            normaliser = float(sum(p.normaliser for p in used)) if used else 1.0
        layers = {}
        for name, (a_list, g_list) in per_layer.items():
            G = _concat(name, g_list, 1, "samples")
            if summed and (scale is not None or normaliser != 1):
                G = G * normaliser if scale is None else G * (normaliser / scale)
            layers[name] = LayerCapture(self.layers[name], _concat(name, a_list, 0, "samples"), G)
        return Capture(
            layers,
            fisher_type,
            mc_samples,
            self.loss,
            normaliser,
            sum(p.num_samples for p in used),
            precision,
        )


class RangeCheck:
    r"""Refuses captured statistics whose sums overflow their dtype, for every method alike.

    Every method sums products of the captured ``Ã`` and ``G`` over the data in their dtype:
    the factor sums ``Σ ÃᵀÃ`` and ``Σ GᵀG`` (KFAC, EKFAC, SKFAC, the Woodbury Gram), and
    ``Σ j jᵀ`` with ``j = Σ_t g ãᵀ`` (exact, diagonal, EKFAC's scalings). Their traces are
    bounded by ``a²·NT·D``, ``g²·RNT·d`` and ``(T·a·g)²·RN·P``, with ``a``, ``g`` the largest
    magnitudes seen, ``N`` the samples so far, ``R`` rows, ``T`` positions, ``D``, ``d`` and ``P``
    the factor and block sizes; a batch that takes a bound beyond the dtype's largest number
    (or holds NaN/Inf) is refused before any method sums it, whatever the method.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, float, int]] = {}  # name -> (a, g, N)

    def add(self, cap: Capture) -> None:
        """Check one batch's capture (accumulating ``a``, ``g`` and ``N`` over the data)."""
        if not cap.layers:
            return
        extremes = []
        for lc in cap.values():  # integer inputs are token indices: a one-hot Ã, a = 1
            a_part = lc.A if lc.A.is_floating_point() else lc.G.new_ones(1)
            extremes.extend(torch.aminmax(a_part))
            extremes.extend(torch.aminmax(lc.G))
        values = torch.stack([e.double() for e in extremes]).abs().tolist()  # one sync
        for i, (name, lc) in enumerate(cap.items()):
            a_min, a_max, g_min, g_max = values[4 * i : 4 * i + 4]
            old = self._seen.get(name, (0.0, 0.0, 0))
            a, g = max(a_min, a_max, old[0]), max(g_min, g_max, old[1])
            n = old[2] + lc.A.shape[0]
            self._seen[name] = (a, g, n)
            r, t, d_out = lc.G.shape[0], lc.A.shape[1], lc.G.shape[3]
            d_in = lc.layer.d_in + lc.layer.has_bias  # the width of Ã (the matrix view)
            bound = max(
                a * a * n * t * d_in,
                g * g * r * n * t * d_out,
                (t * a * g) ** 2 * r * n * lc.layer.num_params,
            )
            largest = torch.finfo(lc.G.dtype).max
            if not math.isfinite(a + g):
                raise FisherlabError(
                    f"the statistics of layer {name!r} hold NaN or Inf (its inputs or output "
                    "gradients overflowed in the forward or backward pass); rescale the data or "
                    "compute in float64 (model.double() and double inputs)"
                )
            if not bound < largest:
                raise FisherlabError(
                    f"the statistics of layer {name!r} overflow {lc.A.dtype}: its inputs reach "
                    f"{a:.3g} and its output gradients {g:.3g} over {n} samples × {t} positions, "
                    f"so the sums every method forms can reach {bound:.3g}, beyond the largest "
                    f"{lc.A.dtype} ({largest:.3g}); rescale the data or compute in float64 "
                    "(model.double() and double inputs)"
                )


@contextlib.contextmanager
def analysis_scope() -> Iterator[None]:
    """Within the block, training recorders (optimizers' hooks) record nothing.

    fisherlab's own passes over a model (captures, exact blocks, the model probe) run inside
    it, so that an optimizer attached to the same model never mixes them into its statistics.
    """
    Recorder._paused += 1
    try:
        yield
    finally:
        Recorder._paused -= 1


def _concat(name: str, tensors: list[Tensor], dim: int, along: str = "samples") -> Tensor:
    if len(tensors) == 1:
        return tensors[0]
    shapes = {tuple(t.shape[:dim]) + tuple(t.shape[dim + 1 :]) for t in tensors}
    if len(shapes) > 1:
        raise FisherlabError(
            f"the recorded calls of layer {name!r} cannot be combined along the {along}: their "
            f"shapes {sorted(tuple(t.shape) for t in tensors)} differ beyond them (different "
            "numbers of samples, positions per sample, or rows)"
        )
    return torch.cat(tensors, dim=dim)


# ------------------------------------------------------------------------- one-shot captures
def capture_batch(problem: Problem, batch: Batch, max_bytes: int | None = None) -> Capture:
    """The statistics of one batch of a problem: one forward, ``R`` backward passes of rows.

    The first batch captured for a problem is also checked by :func:`_check_module_calls`
    (every layer's parameters are used only inside its module's call). With ``max_bytes``, the
    capture (the layers' inputs and ``R`` output-gradient rows per sample) is estimated after
    the forward pass and refused beyond it, before any backward pass.

    The model is left as it was: hooks are removed, parameters, ``requires_grad`` flags and
    ``.grad`` are untouched.
    """
    check = not problem._calls_checked
    params = _layer_parameters(problem) if check else {}
    recorder = Recorder(problem.model, problem.layers, problem.loss, force_grad=True)
    with analysis_scope(), recorder, torch.enable_grad():
        if check:  # leaves of our own, so that autograd gives every parameter's full gradient
            outputs = functional_call(problem.model, params, (batch.inputs,), strict=False)
        else:
            outputs = problem.model(batch.inputs)
        if not isinstance(outputs, Tensor):
            raise FisherlabError(
                f"the model returns {type(outputs).__name__}; fisherlab needs a tensor of "
                "network outputs [N, ...]"
            )
        zs = recorder.layer_outputs()
        missing = [name for name in problem.layers if name not in {n for n, _ in zs}]
        if missing:
            raise FisherlabError(f"layers {missing} were not called in the forward pass")
        problem.loss.check_outputs(outputs, batch.targets)
        with problem.seeded(batch):
            rows = problem.loss.output_rows(
                outputs, batch.targets, problem.fisher_type, problem.mc_samples
            )
        extra = check and problem.fisher_type != "empirical"
        if extra:  # one more row: the loss gradient (the empirical rows are that already)
            loss_rows = problem.loss.output_rows(outputs, batch.targets, "empirical")
            rows = torch.cat([rows, loss_rows])
        wrt = [z for _, z in zs]
        if max_bytes is not None:
            check_memory(
                f"the capture of batch {batch.index} (the layers' inputs and "
                f"{rows.shape[0] - extra} output-gradient rows per sample × {batch.size} samples)",
                recorder.input_bytes()
                + rows.shape[0] * sum(z.numel() * z.element_size() for z in wrt),
                max_bytes,
                "use smaller batches, fisher_type='mc' or 'empirical' (fewer rows per sample), or "
                "raise max_bytes= if the machine has the memory",
            )
        with recorder.recording("rows"):
            for r in range(rows.shape[0]):
                last = r == rows.shape[0] - 1
                grads = torch.autograd.grad(
                    outputs,
                    wrt + (list(params.values()) if check and last else []),
                    grad_outputs=rows[r],
                    retain_graph=not last,
                    allow_unused=True,
                )
        cap = recorder.take("rows", problem.fisher_type, problem.mc_samples, rows=rows.shape[0])
    if check:
        loss_grads = dict(zip(params, grads[len(wrt) :]))
        cap = _check_module_calls(problem, cap, loss_grads, drop_last_row=extra)
        problem._calls_checked = True
    return cap


def _layer_parameters(problem: Problem) -> dict[str, Tensor]:
    """Detached copies (requiring grad) of the layers' parameters, by full parameter name."""
    return {
        f"{name}.{p_name}" if name else p_name: p.detach().requires_grad_(True)
        for name, layer in problem.layers.items()
        for p_name, p in layer.module.named_parameters(recurse=False)
    }


def _check_module_calls(
    problem: Problem, cap: Capture, loss_grads: dict[str, Tensor | None], drop_last_row: bool
) -> Capture:
    r"""Refuse layers whose parameters are used outside their module's call.

    Captures see a parameter only through its module's call: its gradient is
    ``Σ_n G_nᵀ Ã_n`` of the loss rows. Autograd's gradient of the loss w.r.t. the parameter
    also holds any other use (``x @ layer.weight`` in the forward, a use by another module);
    where the two differ beyond rounding (``‖Δ‖ > tol·Σ_n ‖G_n‖‖Ã_n‖``), the captured
    statistics miss part of the parameter's gradient and no block built from them is the
    Fisher of the parameter.

    Args:
        problem: The problem.
        cap: The batch's capture; its last row is the loss gradient's.
        loss_grads: Autograd's gradient of the per-sample summed loss per parameter name.
        drop_last_row: Whether the last row was added for this check (not a Fisher row).

    Returns:
        The capture without the added row.
    """
    outside = []
    for name, lc in cap.items():
        A, G = lc.A, lc.G[-1]  # A as the adapter stores it ([N, T, …]), G [N, T, d_out]
        A64 = A.double() if A.is_floating_point() else A  # integer inputs: token indices
        captured = lc.layer.gradients_from_rows(A64, G.double().unsqueeze(0))[0].sum(0)
        a_norms = A64.flatten(1).norm(dim=1) if A.is_floating_point() else A.shape[1] ** 0.5
        scale = float((a_norms * G.double().flatten(1).norm(dim=1)).sum())
        eps = torch.finfo(A.dtype if A.is_floating_point() else G.dtype).eps
        tol = min(1e3 * eps, 0.05) * scale
        offset = 0
        for p_name, p in zip(lc.layer.parameter_names(), lc.layer.parameters()):
            key = f"{name}.{p_name}" if name else p_name
            part = captured[offset : offset + p.numel()]
            offset += p.numel()
            full = loss_grads.get(key)
            full = torch.zeros_like(part) if full is None else full.reshape(-1).double()
            difference = float((full - part).norm())
            if difference > tol:
                relative = difference / max(float(full.norm()), 1e-300)
                outside.append(f"{key!r} (relative difference of the gradients {relative:.2g})")
    if outside:
        raise FisherlabError(
            f"parameters {', '.join(outside)} are also used outside their module's call (e.g. "
            "x @ layer.weight in the forward, or by another module): the captured statistics "
            "see only the module's call, so no block built from them is the Fisher of those "
            "parameters; route every use through the module's call, or use "
            "fl.exact_blocks(problem), which differentiates the whole forward"
        )
    if not drop_last_row:
        return cap
    layers = {name: dataclasses.replace(lc, G=lc.G[:-1].clone()) for name, lc in cap.layers.items()}
    return dataclasses.replace(cap, layers=layers)


def captures(
    problem: Problem, desc: str = "capture", quiet: bool = False, max_bytes: int | None = None
) -> Iterator[Capture]:
    """One pass over a problem's data: the capture of each batch.

    Within :func:`cached_captures`, a complete pass is kept (when it fits) and replayed. With
    ``max_bytes``, each batch's capture is pre-flighted (:func:`capture_batch`).
    """
    cache = problem._cache
    if cache is not None and cache.items is not None:
        yield from cache.items
        return
    keep = cache is not None and not cache.too_large
    items: list[Capture] = []
    nbytes = seen = 0
    total = problem.num_samples_hint
    for batch in problem.batches(desc, quiet):
        cap = capture_batch(problem, batch, max_bytes)
        if keep:
            nbytes, seen = nbytes + cap.nbytes, seen + batch.size
            # the pass's size estimated from its first batches, before it is kept
            if _pass_bytes(nbytes, seen, total) <= cache.max_bytes:
                items.append(cap)
            else:  # too large to keep: later passes capture again
                keep, items, cache.too_large = False, [], True
        yield cap
    if keep:
        cache.items = items


def _pass_bytes(nbytes: int, seen: int, total: int | None) -> float:
    """The captures of a whole pass, estimated from ``nbytes`` of its first ``seen`` samples.

    ``total``: the data's ``N`` where known (else the estimate is what was seen).
    """
    return nbytes if total is None or total <= seen else nbytes / seen * total


@dataclass
class _Cache:
    max_bytes: int
    items: list[Capture] | None = None  # a complete pass, once recorded
    too_large: bool = False


@contextlib.contextmanager
def cached_captures(problem: Problem, max_bytes: int | None = None) -> Iterator[Problem]:
    """Keep the captures of a complete pass for later passes.

    Within the block, later passes replay them (up to ``max_bytes`` of captures, default the
    problem's ``cache_bytes``) instead of running the model again; the model must not change in
    the block.
    """
    outer = problem._cache
    if outer is None:
        problem._cache = _Cache(problem.cache_bytes if max_bytes is None else max_bytes)
    try:
        yield problem
    finally:
        if outer is None:
            problem._cache = None


def capture(
    model: nn.Module | Problem,
    loss_fn: nn.Module | None = None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
    fisher_type: str | None = None,
    mc_samples: int | None = None,
    skip_unsupported: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Capture:
    """Capture ``Ã`` and ``G`` of every supported layer for a batch (or all of a problem's data).

    One forward pass records the inputs; one backward pass per output row (``R`` in total) gives
    the output gradients. The model is left as it was: hooks are removed, parameters,
    ``requires_grad`` flags and ``.grad`` are untouched. With a :class:`Problem` over several
    batches, the captures of all batches are concatenated (memory grows with ``N``; the
    streamed computations in :mod:`fisherlab.blocks` and :mod:`fisherlab.exact` avoid that).

    Args:
        model: A :class:`Problem`, or any ``nn.Module`` graph whose parametrised modules are
            ``Linear``/``Conv2d``.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (``reduction`` ``"mean"``/``"sum"``).
        inputs: Batch inputs ``[N, ...]``.
        targets: Batch targets.
        fisher_type: ``"true"`` (default), ``"mc"`` or ``"empirical"``.
        mc_samples: Labels drawn per input for ``"mc"`` (default 1).
        skip_unsupported: Leave out unsupported parametrised modules with a warning.
        max_bytes: Memory budget of the captures: each batch's is estimated after its
            forward pass, and those of a problem over several batches, kept and concatenated
            (twice their size), from the first batch and the data's ``N`` where known; refused
            beyond it with the size and an alternative.

    Returns:
        A :class:`Capture` mapping layer names to :class:`LayerCapture`.

    Raises:
        MemoryBudgetError: when the captures of a problem's data would exceed ``max_bytes``.
    """
    problem = as_problem(model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported)
    parts: list[Capture] = []
    nbytes = seen = 0
    total = problem.num_samples_hint
    for cap in captures(problem, max_bytes=max_bytes):
        parts.append(cap)
        if problem.single_batch:
            continue
        nbytes, seen = nbytes + cap.nbytes, seen + cap.num_samples
        estimate = _pass_bytes(nbytes, seen, total)
        check_memory(
            f"the captures of {'all ' + str(total) if total else 'the'} samples "
            f"({format_bytes(nbytes / seen)} each), kept and concatenated",
            int(2 * estimate),
            max_bytes,
            "use fl.curvature(...), which streams the batches, iterate "
            "fisherlab.capture.captures(problem) for one batch's capture at a time, or raise "
            "max_bytes= if the machine has the memory",
        )
    if len(parts) == 1:
        return parts[0]
    layers = {
        name: LayerCapture(
            parts[0][name].layer,
            _concat(name, [c[name].A for c in parts], 0),
            _concat(name, [c[name].G for c in parts], 1),
        )
        for name in parts[0]
    }
    return Capture(
        layers,
        problem.fisher_type,
        problem.mc_samples,
        problem.loss,
        problem.normaliser,
        problem.num_samples,
    )
