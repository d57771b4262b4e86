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
  ``1/2`` for MSE). Within :func:`keyed_draws` (how a :class:`~fisherlab.problem.Problem` draws
  them) the labels of sample ``n`` are a function of ``(seed, global index of n)`` alone, the
  same on every path and under any batching or sharding of the data; outside, they come from
  torch's global RNG (the optimizers' Monte-Carlo passes);
* ``"empirical"``: :math:`\nabla_f \ell(f_n, y_n)` with the true label (``R = 1``).

The rows are in units of the per-sample *summed* loss: this is the one place where a
reduction's scaling is undone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal

from fisherlab.conventions import FisherlabError, check_finite, check_fisher_type

SUPPORTED_LOSSES = "CrossEntropyLoss, MSELoss"

#: ``(seed, indices)`` while keyed Monte-Carlo labels are drawn (see :func:`keyed_draws`).
_KEYS: ContextVar[tuple[int, Tensor] | None] = ContextVar("fisherlab_mc_keys", default=None)


@contextlib.contextmanager
def keyed_draws(seed: int, indices: Tensor) -> Iterator[None]:
    """Within: the ``"mc"`` labels of sample ``n`` depend on ``(seed, indices[n])`` alone.

    Every sample draws from its own stream of numpy's counter-based Philox generator, keyed by
    the 128 bits ``(indices[n], seed)`` (both mod ``2⁶⁴``): its labels do not depend on the
    batch it is in, its position there, the rank holding it or any RNG state, and the caller's
    RNG is untouched. Distinct keys are independent streams (Salmon et al., 2011).

    Args:
        seed: The problem's seed.
        indices: ``[N]`` integer keys of the samples of the batch whose rows are drawn next
            (their global indices in the data).
    """
    token = _KEYS.set((seed, indices))
    try:
        yield
    finally:
        _KEYS.reset(token)


def _keyed(seed: int, indices: Tensor, shape: tuple[int, ...], normal: bool) -> Tensor:
    """``[N, *shape]`` float64 draws, sample ``n``'s from the Philox stream of its key.

    Standard normals if ``normal``, else uniforms on ``[0, 1)``.
    """
    bits = np.random.Philox(key=0)
    rng = np.random.Generator(bits)
    out = np.empty((indices.shape[0], *shape))
    zeros = np.zeros(4, dtype=np.uint64)
    for n, index in enumerate(indices.tolist()):
        bits.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": zeros,
                "key": np.array([index % 2**64, seed % 2**64], dtype=np.uint64),
            },
            "buffer": zeros,
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        out[n] = rng.standard_normal(shape) if normal else rng.random(shape)
    return torch.from_numpy(out)


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
            keys = _KEYS.get()
            if keys is not None:
                return self._keyed_rows(f, mc_samples, *keys)
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

    def _keyed_rows(self, f: Tensor, mc_samples: int, seed: int, indices: Tensor) -> Tensor:
        """``"mc"`` rows ``[k, *f.shape]`` from labels keyed per sample (:func:`keyed_draws`).

        Cross-entropy: the label is the class whose cumulative probability interval holds a
        keyed uniform ``u`` (inverse CDF, in float64). MSE: ``ỹ = f + √½·z`` with keyed
        standard normals ``z`` of the output's shape.
        """
        if indices.shape[0] != f.shape[0]:
            raise FisherlabError(
                f"{indices.shape[0]} sample keys for a batch of {f.shape[0]} outputs"
            )
        if self.kind == "cross_entropy":
            u = _keyed(seed, indices, (mc_samples,), normal=False).to(f.device)  # [N, k]
            cdf = torch.softmax(f.double(), dim=1).cumsum(dim=1)  # [N, C]
            labels = (cdf.unsqueeze(1) < u.unsqueeze(-1)).sum(dim=-1)  # [N, k]
            labels = labels.clamp_max(f.shape[1] - 1).T  # [k, N]
        else:
            z = _keyed(seed, indices, (mc_samples, *f.shape[1:]), normal=True)  # [N, k, ...]
            labels = f + math.sqrt(0.5) * z.to(f).movedim(1, 0)  # [k, N, ...]
        return self._gradient(f, labels) / math.sqrt(mc_samples)

    def _gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Gradient of the per-sample summed loss w.r.t. outputs ``f``, for labels ``[..., N]``."""
        if self.kind == "cross_entropy":
            return torch.softmax(f, dim=1) - nn.functional.one_hot(y, f.shape[1]).to(f.dtype)
        return 2.0 * (f - y)
