r"""``nn.Embedding``: a lookup ``z_t = W[i_t]``, read as the Linear layer ``z_t = Wᵀ e_{i_t}``.

With the one-hot ``ã_t = e_{i_t} ∈ R^V`` of the token ``i_t`` (``V = num_embeddings``), the
layer is ``z_t = Wᵀ ã_t``: its matrix view is ``Wᵀ ∈ R^{E × V}`` (``d_out = E =
embedding_dim``, ``d_in = V``, no bias) and the per-sample gradient is Kronecker-structured,

.. math::
    \nabla_{W^\top} ℓ_n = \sum_t g_t\, e_{i_t}^\top = G_n^\top Ã_n ,

so KFAC's factors are ``Γ`` over the embedding dimensions and an input factor that is
*diagonal*: ``Ω = (1/(N·T)) Σ_{n,t} e_{i_t} e_{i_t}ᵀ = diag(token counts)/(N·T)``.

What the capture stores is compact: the token indices ``[N, T]`` (long), not the one-hot rows.
The exact rows (:meth:`EmbeddingAdapter.gradient_rows`) are scattered from ``G`` by index
(only the rows of the tokens used are written; no one-hot product), and only the Kronecker
methods expand the one-hot ``Ã`` (:meth:`EmbeddingAdapter.kron_inputs`).

**Parameter order** is that of ``W [V, E]`` row-major, i.e. ``vec_r(W) = vec_c(Wᵀ)``: not the
matrix view's, so the adapter gives its own permutation (:attr:`standard_layout` is false).

Configurations: ``padding_idx`` is treated exactly (its row gets no gradient, as in PyTorch:
its tokens have a zero one-hot row and scatter nothing); ``max_norm`` (the forward pass
rescales rows of ``W`` in place), ``scale_grad_by_freq`` (the gradient depends on the batch's
token counts, coupling the samples) and ``sparse=True`` (sparse ``.grad``) are refused by name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fisherlab.layers.base import LayerAdapter


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding`` on token indices ``[N, *]`` (every index of a sample is a position)."""

    kind = "embedding"
    module_types = (nn.Embedding,)
    standard_layout = False

    def unsupported_reason(self, module: nn.Embedding) -> str | None:
        if module.max_norm is not None:
            return (
                f"max_norm={module.max_norm} (the forward pass renormalises rows of the weight in "
                "place, so the layer is not a function of its parameters)"
            )
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True (the gradient is divided by the batch's token counts, "
                "which couples the samples)"
            )
        if module.sparse:
            return "sparse=True (sparse gradients; use sparse=False for curvature)"
        return None

    def parameter_names(self, module: nn.Embedding) -> tuple[str, str | None]:
        return "weight", None

    def matrix_shape(self, module: nn.Embedding) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def kron_to_param_index(self, d_out: int, d_in: int, bias: bool) -> Tensor:
        """``θ_param = vec_r(W)`` from ``θ_kron = vec_r(Wᵀ)``: entry ``(v, e)`` is ``e·V + v``."""
        return (torch.arange(d_out) * d_in + torch.arange(d_in).unsqueeze(1)).flatten()

    def inputs(self, module: nn.Embedding, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def output_rows(self, module: nn.Embedding, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def kron_inputs(self, module: nn.Embedding, A: Tensor) -> Tensor:
        """One-hot ``Ã [N, T, V]`` in the weight's dtype; a ``padding_idx`` token's row is zero."""
        if A.is_floating_point():  # already expanded
            return A
        onehot = F.one_hot(A, module.num_embeddings).to(module.weight.dtype)
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0
        return onehot

    def gradient_rows(self, module: nn.Embedding, A: Tensor, G: Tensor) -> Tensor:
        """``Σ_t g_t e_{i_t}ᵀ`` as ``[..., N, E, V]``, scattered by index (no one-hot).

        ``A [N, T]`` token indices, ``G [..., N, T, E]``; positions holding ``padding_idx``
        add nothing.
        """
        if A.is_floating_point():  # an expanded one-hot Ã
            return super().gradient_rows(module, A, G)
        n, t = A.shape
        vocab, dim = module.num_embeddings, module.embedding_dim
        lead = G.shape[:-3]
        index = (torch.arange(n, device=A.device).unsqueeze(1) * vocab + A).flatten()
        source = G.reshape(*lead, n * t, dim)
        if module.padding_idx is not None:
            keep = A.flatten() != module.padding_idx
            index, source = index[keep], source[..., keep, :]
        out = G.new_zeros(*lead, n * vocab, dim)
        out.index_add_(-2, index, source)
        return out.reshape(*lead, n, vocab, dim).transpose(-1, -2)
