r"""Capture of per-layer statistics: the factor code shared by analysis and optimizers.

For every supported layer, :func:`capture` returns the homogeneous inputs ``Ã`` and the output
gradient rows ``G`` of a batch, such that the rows of the Fisher's square root are

.. math::
    j_{n,r} = \operatorname{vec}(G_{r,n}^\top Ã_n), \qquad
    F = \frac{1}{ν}\sum_{n,r} j_{n,r} j_{n,r}^\top,

with ``ν`` the loss's normaliser (:meth:`fisherlab.losses.LossSpec.normaliser`). Shapes:
``A: [N, T, d_in (+1)]`` and ``G: [R, N, T, d_out]``, with ``R`` rows per sample for the Fisher
type (``C`` for ``"true"``, ``k`` for ``"mc"``, ``1`` for ``"empirical"``).

Example:
    >>> import torch, fisherlab as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    >>> cap = fl.capture(model, torch.nn.CrossEntropyLoss(), x, y, fisher_type="true")
    >>> cap["0"].A.shape, cap["0"].G.shape
    (torch.Size([5, 1, 5]), torch.Size([2, 5, 1, 3]))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisherlab.conventions import FisherlabError
from fisherlab.layers import Layer
from fisherlab.losses import LossSpec
from fisherlab.problem import Problem


class LayerRecorder:
    """Context manager that records each layer's ``Ã`` and output tensor in a forward pass.

    Hooks are registered on entry and removed on exit, also when the forward raises. A layer
    called twice in one forward pass (shared weights) is refused. Where a layer's output does
    not require grad (nothing upstream does), it is replaced by a leaf that does, so that its
    output gradients can be taken without changing any parameter's ``requires_grad``.
    """

    def __init__(self, layers: Mapping[str, Layer], record_inputs: bool = True):
        self.layers = layers
        self.record_inputs = record_inputs
        self.calls: dict[str, int] = {}
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerRecorder:
        try:
            for name, layer in self.layers.items():
                self._handles.append(layer.module.register_forward_hook(self._hook(name, layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, layer: Layer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if name in self.calls:
                raise FisherlabError(
                    f"module {name!r} ({layer.kind}) was called more than once in one forward "
                    "pass (shared weights); its Fisher block is not defined per call"
                )
            self.calls[name] = 1
            if not self.record_inputs:
                return None
            self.inputs[name] = layer.adapter.homogeneous_inputs(module, args[0].detach())
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            return output

        return hook


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

    def jacobian_rows(self) -> Tensor:
        """The rows ``j_{n,r}`` in parameter order, ``[R, N, P]`` (no ``1/√ν`` applied)."""
        return self.layer.gradients_from_rows(self.A, self.G)

    def per_sample_gradients(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias gradient rows, ``[R, N, *weight.shape]`` and ``[R, N, d_out]``."""
        rows = self.jacobian_rows()
        weight = self.layer.module.weight
        n_w = weight.numel()
        grad_w = rows[..., :n_w].reshape(*rows.shape[:-1], *weight.shape)
        grad_b = rows[..., n_w:] if self.layer.has_bias else None
        return grad_w, grad_b


@dataclass(frozen=True)
class Capture(Mapping[str, LayerCapture]):
    """Captured statistics of every supported layer, keyed by module name.

    Attributes:
        layers: Per-layer captures.
        fisher_type: The Fisher type the rows were computed for.
        mc_samples: Labels drawn per input (``"mc"`` only).
        loss: Loss kind and reduction.
        normaliser: ``ν``, so that ``F = (1/ν) Σ j jᵀ``.
        outputs: The network outputs of the batch (detached).
    """

    layers: dict[str, LayerCapture]
    fisher_type: str
    mc_samples: int
    loss: LossSpec
    normaliser: float
    outputs: Tensor = field(repr=False)

    def __getitem__(self, name: str) -> LayerCapture:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        """``N``."""
        return self.outputs.shape[0]


def capture(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    fisher_type: str = "true",
    mc_samples: int = 1,
    skip_unsupported: bool = False,
) -> Capture:
    """Capture ``Ã`` and ``G`` of every supported layer for a batch.

    One forward pass records the inputs; one backward pass per output row (``R`` in total) gives
    the output gradients. The model is left as it was: hooks are removed, parameters,
    ``requires_grad`` flags and ``.grad`` are untouched.

    Args:
        model: Any ``nn.Module`` graph whose parametrised modules are ``Linear``/``Conv2d``.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (``reduction`` ``"mean"``/``"sum"``).
        inputs: Batch inputs ``[N, ...]``.
        targets: Batch targets.
        fisher_type: ``"true"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Labels drawn per input for ``"mc"``.
        skip_unsupported: Leave out unsupported parametrised modules with a warning.

    Returns:
        A :class:`Capture` mapping layer names to :class:`LayerCapture`.
    """
    problem = Problem.build(
        model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported
    )
    return capture_problem(problem)


def checked_forward(problem: Problem) -> Tensor:
    """The network outputs of the batch (no graph), checking that every layer runs once."""
    with LayerRecorder(problem.layers, record_inputs=False) as recorder, torch.no_grad():
        outputs = problem.model(problem.inputs)
    missing = [name for name in problem.layers if name not in recorder.calls]
    if missing:
        raise FisherlabError(f"layers {missing} were not called in the forward pass")
    problem.loss.check_outputs(outputs, problem.targets)
    return outputs


def capture_problem(problem: Problem) -> Capture:
    """:func:`capture` for an already validated :class:`~fisherlab.problem.Problem`."""
    with LayerRecorder(problem.layers) as recorder, torch.enable_grad():
        outputs = problem.model(problem.inputs)
    missing = [name for name in problem.layers if name not in recorder.outputs]
    if missing:
        raise FisherlabError(f"layers {missing} were not called in the forward pass")
    problem.loss.check_outputs(outputs, problem.targets)
    rows = problem.loss.output_rows(
        outputs, problem.targets, problem.fisher_type, problem.mc_samples
    )
    names = list(problem.layers)
    zs = [recorder.outputs[name] for name in names]
    per_row: list[tuple[Tensor | None, ...]] = []
    for r in range(rows.shape[0]):
        per_row.append(
            torch.autograd.grad(
                outputs,
                zs,
                grad_outputs=rows[r],
                retain_graph=r < rows.shape[0] - 1,
                allow_unused=True,
            )
        )
    layers = {}
    for i, name in enumerate(names):
        layer = problem.layers[name]
        G = torch.stack(
            [
                layer.adapter.output_rows(
                    layer.module, torch.zeros_like(zs[i]) if g[i] is None else g[i]
                )
                for g in per_row
            ]
        )
        layers[name] = LayerCapture(layer, recorder.inputs[name], G)
    return Capture(
        layers=layers,
        fisher_type=problem.fisher_type,
        mc_samples=problem.mc_samples,
        loss=problem.loss,
        normaliser=problem.loss.normaliser(outputs),
        outputs=outputs.detach(),
    )


class TrainingRecorder:
    """Persistent hooks that collect ``Ã`` and ``G`` during ordinary training steps.

    On every forward pass with grad enabled (which starts the step's statistics anew), each
    layer's homogeneous inputs are stored and a hook is put on its output; the loss's own
    backward then delivers ``G``. One forward and one backward per optimizer step. Gradients of a
    reduced loss carry ``1/ν``; :meth:`pop` undoes it (``G = ν·∂L/∂z``), so the rows are in
    units of the per-sample summed loss, as everywhere in fisherlab. :meth:`sample_backward`
    runs one extra backward with labels sampled from the model (``"mc"`` Fisher), for the
    statistics only (no parameter's ``.grad`` is touched).

    Args:
        model: The network.
        layers: Its supported layers.
        loss: The loss, if known: it gives ``ν`` (else ``ν = N``, a mean over the batch) and
            the distribution to sample labels from.
        dtype: Dtype the statistics are stored in.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, Layer],
        loss: LossSpec | None,
        dtype: torch.dtype,
    ):
        self.layers, self.loss, self.dtype = layers, loss, dtype
        self._sampling = False
        self.clear()
        self._handles = [
            model.register_forward_pre_hook(self._root_pre_hook),
            model.register_forward_hook(self._root_hook),
        ]
        for name, layer in layers.items():
            self._handles.append(layer.module.register_forward_hook(self._layer_hook(name, layer)))

    def clear(self) -> None:
        """Forget the statistics of the last step."""
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.sampled: dict[str, Tensor] = {}
        self.network_output: Tensor | None = None

    def remove(self) -> None:
        """Remove all hooks (the model is then as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():  # a new forward pass: the statistics of the step start anew
            self.clear()

    def _root_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):
            self.network_output = output

    def _layer_hook(self, name: str, layer: Layer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            if name in self.inputs:
                raise FisherlabError(
                    f"module {name!r} ({layer.kind}) was called more than once in one forward "
                    "pass (shared weights); its statistics are not defined per call"
                )
            self.inputs[name] = layer.adapter.homogeneous_inputs(module, args[0].detach()).to(
                self.dtype
            )
            self.outputs[name] = output

            def grad_hook(g: Tensor) -> None:
                rows = layer.adapter.output_rows(module, g.detach()).to(self.dtype)
                (self.sampled if self._sampling else self.grads)[name] = rows

            output.register_hook(grad_hook)

        return hook

    def sample_backward(self) -> None:
        """One extra backward with labels drawn from the model (``"mc"``, one sample)."""
        if self.loss is None or self.network_output is None:
            raise FisherlabError(
                "the Monte-Carlo Fisher needs the loss (pass loss_fn= to the optimizer) and a "
                "forward pass with grad enabled before mc_backward()"
            )
        out = self.network_output
        rows = self.loss.output_rows(out, out.detach(), "mc", 1)[0]
        names = list(self.outputs)
        self._sampling = True
        try:
            torch.autograd.grad(
                out, [self.outputs[n] for n in names], rows, retain_graph=True, allow_unused=True
            )
        finally:
            self._sampling = False

    def pop(self, fisher_type: str) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
        """``{name: (A [N,T,D], G [1,N,T,d_out])}`` of the last step and ``ν``; then clears.

        Layers that were not used in the last forward/backward are left out.
        """
        out = self.network_output
        if out is None or not self.inputs:
            self.clear()
            return {}, 1.0
        normaliser = self.loss.normaliser(out) if self.loss is not None else float(out.shape[0])
        if fisher_type == "mc":
            if not self.sampled:
                raise FisherlabError(
                    "fisher_type='mc' needs optimizer.mc_backward() after the forward pass and "
                    "before loss.backward()"
                )
            source, scale = self.sampled, 1.0
        else:
            source, scale = self.grads, normaliser
        stats = {
            name: (self.inputs[name], (source[name] * scale).unsqueeze(0))
            for name in self.inputs
            if name in source
        }
        self.clear()
        return stats, normaliser
