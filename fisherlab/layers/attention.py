r"""``nn.MultiheadAttention``: its input and output projections, two Linear layers over tokens.

The module uses its parameters functionally (``F.multi_head_attention_forward``): the packed
input projection ``in_proj_weight [3E, E]`` with ``in_proj_bias [3E]``, and ``out_proj``
(a ``Linear`` whose own ``forward`` is never called). fisherlab reads them as two layers, keyed
as the modules that hold the parameters:

* ``"<name>"`` (kind ``"mha_in_proj"``): ``[q; k; v]_t = W_in ã_t``, ``W̃ = [in_proj_weight |
  in_proj_bias]``, ``d_out = 3E``, ``d_in = E``. In self-attention every token ``x_t`` is one
  position with output gradient ``g_t = [g_q; g_k; g_v]``. In cross-attention the query, key
  and value tokens are different inputs of the same weight: each is a position of its own, its
  output gradient zero outside its third of the rows (``[g_q; 0; 0]`` for a query token, …), so
  that ``Σ_t g_t ã_tᵀ`` is the exact per-sample gradient ``[G_qᵀQ̃; G_kᵀK̃; G_vᵀṼ]`` and
  ``T = L + 2S`` (``L + S`` when key and value are one tensor). This is the rule for any weight
  used several times: the uses are more positions of the same sample (KFAC-expand over uses).
* ``"<name>.out_proj"`` (kind ``"linear"``): ``y_t = W_o o_t + b_o`` at the ``L`` query
  positions, ``o_t`` the concatenated heads' output.

**How it is recorded.** A module's forward hooks see only its arguments and its output, not the
projections computed inside. So, while a :class:`~fisherlab.capture.Recorder` records, the
module's output is replaced by :meth:`MultiheadAttentionAdapter.record_forward`, a re-run of
PyTorch's own computation (``MultiheadAttention.forward`` and
``F.multi_head_attention_forward``, operation for operation, the same values bit for bit) in
which the projections' inputs and outputs are handed to the recorder. The module's forward ran
first (it validated the arguments); the attention is computed twice in recorded passes.

Supported: ``batch_first`` either way, self- and cross-attention with ``kdim = vdim = E``,
``need_weights`` and ``average_attn_weights``, ``attn_mask`` (2-D/3-D, bool or float),
``key_padding_mask``, ``is_causal``, ``bias=False``, training mode with ``dropout=0``.
Refused by name: ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim`` different from
``embed_dim`` (separate q/k/v weights sharing one bias), ``dropout > 0`` in training mode
(its mask could not be replayed), unbatched (2-D) inputs and subclasses that override
``forward``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fisherlab.conventions import FisherlabError
from fisherlab.layers.base import LayerAdapter, adapter_for, append_ones
from fisherlab.layers.linear import LinearAdapter

#: ``record(module, A, z, rows) → z'``: one call of the layer whose parameters ``module`` holds,
#: with ``A [N, T, D]``, its output ``z`` and ``rows`` mapping ``∂/∂z`` to ``G [N, T, d_out]``;
#: returns the tensor to compute on with (``z`` or a leaf replacing it).
Record = Callable[[nn.Module, Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor]

_FORWARD = inspect.signature(nn.MultiheadAttention.forward)


class MultiheadAttentionAdapter(LayerAdapter):
    """The input projection of ``nn.MultiheadAttention`` (see the module docstring)."""

    kind = "mha_in_proj"
    module_types = (nn.MultiheadAttention,)

    def unsupported_reason(self, module: nn.MultiheadAttention) -> str | None:
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv=True (its bias_k/bias_v are not supported)"
        if module.add_zero_attn:
            return "add_zero_attn=True is not supported"
        if not module._qkv_same_embed_dim:
            return (
                f"kdim={module.kdim}/vdim={module.vdim} differ from embed_dim={module.embed_dim} "
                "(separate q/k/v weights sharing one bias are not supported)"
            )
        return None

    def training_problem(self, module: nn.MultiheadAttention) -> str | None:
        """Why the module's mode makes its curvature undefined here (``None`` if not)."""
        if module.training and module.dropout > 0:
            return (
                f"is in training mode with dropout={module.dropout}: the curvature would be "
                "that of one random mask (and the recording cannot replay it); call model.eval()"
            )
        return None

    def parameter_names(self, module: nn.MultiheadAttention) -> tuple[str, str | None]:
        return "in_proj_weight", ("in_proj_bias" if module.in_proj_bias is not None else None)

    def sublayers(self, module: nn.MultiheadAttention) -> dict[str, LayerAdapter]:
        """Submodules whose parameters this module uses functionally, with their adapters."""
        return {"out_proj": AttentionOutputAdapter(module)}

    def recording_module(self, module: nn.Module) -> tuple[nn.Module, Callable[..., Any]]:
        """The module whose forward records this layer, and the function that records it."""
        return module, self.record_forward

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        raise FisherlabError(
            "the input projection of nn.MultiheadAttention is recorded by record_forward"
        )

    output_rows = inputs

    # ------------------------------------------------------------------ recording
    def record_forward(
        self, module: nn.MultiheadAttention, args: tuple, kwargs: dict, record: Record
    ) -> tuple[Tensor, Tensor | None]:
        """``module(*args, **kwargs)`` computed again, its projections handed to ``record``.

        Mirrors ``MultiheadAttention.forward`` (slow path) and
        ``F.multi_head_attention_forward`` operation for operation.

        Raises:
            FisherlabError: for unbatched inputs and dropout in training mode.
        """
        bound = _FORWARD.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key, value = a["query"], a["key"], a["value"]
        problem = self.training_problem(module)
        if problem is None and query.dim() != 3:
            problem = (
                f"got an unbatched query of shape {tuple(query.shape)}: fisherlab needs the "
                "samples' batch dimension"
            )
        if problem is not None:
            raise FisherlabError(f"nn.MultiheadAttention {problem}")
        attn_mask, key_padding_mask = a["attn_mask"], a["key_padding_mask"]
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if module.batch_first:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = _attention(
            module,
            query,
            key,
            value,
            key_padding_mask,
            a["need_weights"],
            attn_mask,
            a["average_attn_weights"],
            a["is_causal"],
            record,
        )
        return (out.transpose(1, 0) if module.batch_first else out), weights


class AttentionOutputAdapter(LinearAdapter):
    """``out_proj`` of one ``nn.MultiheadAttention``: a Linear layer recorded by its parent.

    One instance per attention module (it knows its parent); not registered by type, so a
    plain ``nn.Linear`` is never read with it. Were ``out_proj`` called as a module too, that
    call would be recorded as one more use of the layer (more positions).
    """

    kind = "linear"
    module_types = ()

    def __init__(self, parent: nn.MultiheadAttention | None = None):
        self.parent = parent

    def recording_module(self, module: nn.Module) -> tuple[nn.Module, Callable[..., Any]]:
        """The parent attention module, whose forward records this layer, and its recorder."""
        return self.parent, adapter_for(self.parent).record_forward


# ---------------------------------------------------------------------------- the mirror
def _seq_first_rows(g: Tensor) -> Tensor:
    """``∂/∂z`` of a projection on ``[T, N, …]`` → ``[N, T, …]``."""
    return g.transpose(0, 1)


def _in_projection(
    module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, record: Record
) -> tuple[Tensor, Tensor, Tensor]:
    """``F._in_projection_packed`` with each projection recorded.

    Each distinct input is one use of ``W̃_in``; its rows are zero outside the third(s) of
    ``W_in`` that produced it.
    """
    w, b = module.in_proj_weight, module.in_proj_bias
    E = query.size(-1)
    bias = b is not None

    def use(x: Tensor, first: int, parts: int, z: Tensor) -> Tensor:
        A = append_ones(x.detach().transpose(0, 1), bias)

        def rows(g: Tensor) -> Tensor:
            g = _seq_first_rows(g)
            if parts == 3:
                return g
            return F.pad(g, (first * E, (3 - first - parts) * E))

        return record(module, A, z, rows)

    if key is value:
        if query is key:  # self-attention: one projection of every token
            proj = use(query, 0, 3, F.linear(query, w, b))
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            proj = proj.contiguous()
            return proj[0], proj[1], proj[2]
        w_q, w_kv = w.split([E, E * 2])
        b_q, b_kv = (None, None) if b is None else b.split([E, E * 2])
        q = use(query, 0, 1, F.linear(query, w_q, b_q))
        kv = use(key, 1, 2, F.linear(key, w_kv, b_kv))
        kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return q, kv[0], kv[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return (
        use(query, 0, 1, F.linear(query, w_q, b_q)),
        use(key, 1, 1, F.linear(key, w_k, b_k)),
        use(value, 2, 1, F.linear(value, w_v, b_v)),
    )


def _out_projection(
    module: nn.MultiheadAttention, o: Tensor, tgt_len: int, bsz: int, record: Record
) -> Tensor:
    """``linear(o, W_o, b_o)`` on ``o [L·N, E]`` (rows ``t·N + n``), recorded, as ``[L, N, E]``."""
    proj = module.out_proj
    A = append_ones(o.detach().view(tgt_len, bsz, -1).transpose(0, 1), proj.bias is not None)
    z = F.linear(o, proj.weight, proj.bias)
    z = record(proj, A, z, lambda g: g.view(tgt_len, bsz, -1).transpose(0, 1))
    return z.view(tgt_len, bsz, z.size(1))


def _attention(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    record: Record,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` with recorded projections.

    For the supported configurations: batched inputs ``[L, N, E]``/``[S, N, E]``, packed
    weights, no ``bias_k``/``bias_v``/zero attention, no dropout. The arguments were validated
    by the module's own forward.
    """
    tgt_len, bsz, embed_dim = query.shape
    num_heads = module.num_heads
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False
    head_dim = embed_dim // num_heads
    q, k, v = _in_projection(module, query, key, value, record)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        o = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = _out_projection(module, o, tgt_len, bsz, record)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        return out, (weights.mean(dim=1) if average_attn_weights else weights)
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
    o = o.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    return _out_projection(module, o, tgt_len, bsz, record), None
