r"""Loss functions fisherlab understands: target checks, the normaliser ``ν`` and output rows.

For a loss :math:`L = \frac{1}{ν}\sum_n \ell(f_n, y_n)` the Fisher of every type is

.. math::
    F = \frac{1}{ν} \sum_{n} \sum_{r} J_n^\top s_{n,r} s_{n,r}^\top J_n,

where :math:`J_n` is the Jacobian of the network output :math:`f_n` and the *output rows*
:math:`s_{n,r}` are, per Fisher type,

* ``"true"``: the columns of a square root of :math:`\nabla^2_f \ell` (``R = C`` rows):
  :math:`\sqrt{p_c}(e_c - p)` for cross-entropy, :math:`\sqrt2\, e_c` for MSE;
* ``"mc"``: :math:`\nabla_f \ell(f_n, \tilde y)/\sqrt{k}` for ``k`` labels
  :math:`\tilde y \sim p(y | f_n)` (a categorical for cross-entropy, a Gaussian with variance
  ``1/2`` for MSE), drawn exactly as BackPACK's ``SqrtGGNMC`` draws them, so that the same
  seed gives the same matrix on every path;
* ``"empirical"``: :math:`\nabla_f \ell(f_n, y_n)` with the true label (``R = 1``).

The rows are in units of the per-sample *summed* loss: this is the one place where a
reduction's scaling is undone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal

from fisherlab.conventions import FisherlabError, check_finite, check_fisher_type

SUPPORTED_LOSSES = "CrossEntropyLoss, MSELoss"


@dataclass(frozen=True)
class LossSpec:
    """What fisherlab needs to know about a loss module.

    Attributes:
        kind: ``"cross_entropy"`` or ``"mse"``.
        reduction: ``"mean"`` or ``"sum"``.
    """

    kind: str
    reduction: str

    @classmethod
    def from_module(cls, loss_fn: nn.Module) -> LossSpec:
        """Read the loss type and reduction, refusing anything fisherlab cannot treat exactly."""
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            unsupported = []
            if loss_fn.weight is not None:
                unsupported.append("weight")
            if loss_fn.ignore_index != -100:
                unsupported.append("ignore_index")
            if loss_fn.label_smoothing != 0.0:
                unsupported.append("label_smoothing")
            if unsupported:
                raise FisherlabError(
                    "CrossEntropyLoss with " + ", ".join(unsupported) + " is not supported: "
                    "the Fisher of a weighted or smoothed likelihood is not implemented"
                )
            kind = "cross_entropy"
        elif isinstance(loss_fn, nn.MSELoss):
            kind = "mse"
        else:
            raise FisherlabError(
                f"loss {type(loss_fn).__name__} is not supported; supported losses: "
                f"{SUPPORTED_LOSSES}"
            )
        if loss_fn.reduction not in ("mean", "sum"):
            raise FisherlabError(
                f"loss reduction {loss_fn.reduction!r} is not supported; use 'mean' or 'sum'"
            )
        return cls(kind=kind, reduction=loss_fn.reduction)

    # ------------------------------------------------------------------ checks
    def check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Checks that need no forward pass: finiteness, batch size, target dtype."""
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise FisherlabError("inputs and targets must be torch tensors")
        if inputs.ndim == 0 or inputs.shape[0] == 0:
            raise FisherlabError(
                f"inputs must hold a non-empty batch, got shape {tuple(inputs.shape)}"
            )
        check_finite("inputs", inputs)
        check_finite("targets", targets)
        if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
            raise FisherlabError(
                f"targets of shape {tuple(targets.shape)} do not match the batch of "
                f"{inputs.shape[0]} inputs (first dimension)"
            )
        if self.kind == "cross_entropy":
            if targets.dtype != torch.long or targets.ndim != 1:
                raise FisherlabError(
                    "CrossEntropyLoss targets must be class indices: an int64 tensor of shape "
                    f"(N,), got dtype {targets.dtype} and shape {tuple(targets.shape)}"
                )
        elif not targets.is_floating_point():
            raise FisherlabError(
                f"MSELoss targets must be floating point, got dtype {targets.dtype}"
            )

    def check_outputs(self, outputs: Tensor, targets: Tensor) -> None:
        """Checks of the network output against the targets."""
        if self.kind == "cross_entropy":
            if outputs.ndim != 2:
                raise FisherlabError(
                    "CrossEntropyLoss needs network outputs of shape (N, C), got "
                    f"{tuple(outputs.shape)}"
                )
            num_classes = outputs.shape[1]
            if bool(((targets < 0) | (targets >= num_classes)).any()):
                raise FisherlabError(
                    f"CrossEntropyLoss targets must lie in [0, {num_classes}), got values in "
                    f"[{int(targets.min())}, {int(targets.max())}]"
                )
        elif outputs.shape != targets.shape:
            raise FisherlabError(
                f"MSELoss targets of shape {tuple(targets.shape)} do not match the network "
                f"outputs of shape {tuple(outputs.shape)}"
            )
        if outputs.dtype != targets.dtype and targets.is_floating_point():
            raise FisherlabError(
                f"targets have dtype {targets.dtype} but the network outputs {outputs.dtype}"
            )

    # ---------------------------------------------------------------- numbers
    def normaliser(self, outputs: Tensor) -> float:
        """The loss's own normaliser ``ν``: ``N`` (mean CE), ``N·C`` (mean MSE) or ``1`` (sum)."""
        if self.reduction == "sum":
            return 1.0
        return float(outputs.shape[0] if self.kind == "cross_entropy" else outputs.numel())

    def batch_normaliser(self, targets: Tensor) -> float:
        """``ν`` of one batch from its targets alone (MSE targets have the outputs' shape)."""
        if self.reduction == "sum":
            return 1.0
        return float(targets.shape[0] if self.kind == "cross_entropy" else targets.numel())

    def total_normaliser(self, normalisers: Iterable[float]) -> float:
        """``ν`` of several batches taken together: their sum for ``"mean"``, ``1`` for ``"sum"``.

        This is the normaliser of the data set, ``F = (1/ν) Σ_batches JᵀJ`` (curvlinops' convention
        for a list of batches).
        """
        if self.reduction == "sum":
            return 1.0
        return float(sum(normalisers))

    def num_rows(self, outputs: Tensor, fisher_type: str, mc_samples: int) -> int:
        """Number ``R`` of output rows per sample for a Fisher type."""
        if fisher_type == "true":
            return outputs[0].numel()
        return mc_samples if fisher_type == "mc" else 1

    def output_rows(
        self, outputs: Tensor, targets: Tensor, fisher_type: str, mc_samples: int = 1
    ) -> Tensor:
        """Rows ``s`` of shape ``[R, *outputs.shape]`` so that ``F = (1/ν) Σ Jᵀ s sᵀ J``.

        Args:
            outputs: Network outputs ``[N, ...]`` (detached or not; rows carry no graph).
            targets: Targets as given to the loss.
            fisher_type: One of ``"true"``, ``"mc"``, ``"empirical"``.
            mc_samples: Labels drawn per input for ``"mc"``.

        Returns:
            Rows in units of the per-sample summed loss.
        """
        check_fisher_type(fisher_type, mc_samples)
        f = outputs.detach()
        n = f.shape[0]
        if fisher_type == "empirical":
            return self._gradient(f, targets).unsqueeze(0)
        if fisher_type == "mc":
            if self.kind == "cross_entropy":
                dist = Categorical(probs=torch.softmax(f, dim=1))
            else:
                dist = Normal(f, torch.tensor(math.sqrt(0.5), dtype=f.dtype, device=f.device))
            labels = dist.sample(torch.Size([mc_samples]))  # one call, as BackPACK draws them
            return self._gradient(f, labels) / math.sqrt(mc_samples)
        # true Fisher: a square root of the per-sample loss Hessian
        if self.kind == "cross_entropy":
            p = torch.softmax(f, dim=1)  # [N, C]
            eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
            # s_c = sqrt(p_c) (e_c - p): rows [C, N, C]
            return p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))
        c = f[0].numel()
        eye = torch.eye(c, dtype=f.dtype, device=f.device) * math.sqrt(2.0)
        return eye.unsqueeze(1).expand(c, n, c).reshape(c, *f.shape).clone()

    def _gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Gradient of the per-sample summed loss w.r.t. outputs ``f``, for labels ``[..., N]``."""
        if self.kind == "cross_entropy":
            return torch.softmax(f, dim=1) - nn.functional.one_hot(y, f.shape[1]).to(f.dtype)
        return 2.0 * (f - y)
