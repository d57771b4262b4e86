"""Block-diagonal curvature: every representation built from the same captured statistics.

``fl.curvature(method, model, loss_fn, inputs, targets, fisher_type=..., **options)`` captures
``Ã`` and ``G`` once and returns ``{module_name: block}``; every block implements
:class:`~fisherlab.blocks.base.CurvatureBlock` (``to_dense``, ``matvec``, ``solve``,
``eigvalsh``, ``nbytes``, ``as_linear_operator``). ``build(method, capture, **options)`` builds
from an existing :class:`~fisherlab.capture.Capture`, so several methods share one capture.

Methods and their options (defaults first):

=============  ===============================================================================
``exact``      dense ``(1/ν)JᵀJ``
``kfac``       ``kfac_approx="expand"|"reduce"``, ``damping_mode="eigen"|"factored"``
``ekfac``      ``kfac_approx``, ``basis=`` (an earlier ``ekfac`` result or ``{name: (U_Γ, U_Ω)}``)
``woodbury``   ``conv_gram="exact"|"reduce_sum"``, ``gram_route="auto"|"covariance"|"gradients"``
``skfac``      ``conv_reduction="sum"|"subsample"``, ``spatial_samples``, ``seed=0``,
               ``damping_mode="eigen"|"factored"``
``diag``       the diagonal of ``F``
=============  ===============================================================================
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fisherlab.blocks.base import CurvatureBlock, check_damping
from fisherlab.blocks.diag import DiagBlock, fisher_diagonal
from fisherlab.blocks.ekfac import EKFACBlock, kfe_scalings
from fisherlab.blocks.exact import ExactBlock, dense_from_rows
from fisherlab.blocks.factors import (
    KFAC_APPROX,
    check_choice,
    gradient_factor,
    input_factor,
    reduce_positions,
    symmetric_eigh,
)
from fisherlab.blocks.kfac import DAMPING_MODES, KronBlock
from fisherlab.blocks.skfac import CONV_REDUCTIONS, SKFACBlock, skfac_rows
from fisherlab.blocks.woodbury import CONV_GRAMS, GRAM_ROUTES, WoodburyBlock, choose_gram_route
from fisherlab.capture import Capture, LayerCapture, capture
from fisherlab.conventions import DEFAULT_MAX_BYTES, FisherlabError, check_memory

OPTIONS: dict[str, dict[str, Any]] = {
    "exact": {},
    "kfac": {"kfac_approx": "expand", "damping_mode": "eigen"},
    "ekfac": {"kfac_approx": "expand", "basis": None},
    "woodbury": {"conv_gram": "exact", "gram_route": "auto"},
    "skfac": {"conv_reduction": "sum", "spatial_samples": None, "seed": 0, "damping_mode": "eigen"},
    "diag": {},
}
METHODS = tuple(OPTIONS)


class CurvatureDict(dict):
    """``{module_name: CurvatureBlock}`` that records how it was built.

    Attributes:
        method: The method name.
        fisher_type: The Fisher type of the captured statistics.
        options: All options (defaults filled in).
        normaliser: ``ν`` of the loss.
    """

    def __init__(
        self,
        blocks: dict[str, CurvatureBlock],
        method: str,
        fisher_type: str,
        options: dict,
        normaliser: float,
    ):
        super().__init__(blocks)
        self.method, self.fisher_type, self.options, self.normaliser = (
            method,
            fisher_type,
            options,
            normaliser,
        )


def _resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    if method not in OPTIONS:
        raise FisherlabError(f"unknown method {method!r}; valid methods are {METHODS}")
    unknown = set(options) - set(OPTIONS[method])
    if unknown:
        raise FisherlabError(
            f"unknown option(s) {sorted(unknown)} for method {method!r}; valid options: "
            f"{sorted(OPTIONS[method]) or 'none'}"
        )
    resolved = {**OPTIONS[method], **options}
    checks = {
        "kfac_approx": KFAC_APPROX,
        "damping_mode": DAMPING_MODES,
        "conv_gram": CONV_GRAMS,
        "gram_route": GRAM_ROUTES,
        "conv_reduction": CONV_REDUCTIONS,
    }
    for name, choices in checks.items():
        if name in resolved:
            check_choice(name, resolved[name], choices)
    return resolved


def _basis_for(basis: Any, name: str) -> tuple[Tensor, Tensor]:
    try:
        entry = basis[name]
    except (KeyError, TypeError, IndexError):
        raise FisherlabError(
            f"the basis passed to 'ekfac' has no entry for layer {name!r}"
        ) from None
    return entry.basis if isinstance(entry, EKFACBlock) else tuple(entry)


def _itemsize(lc: LayerCapture) -> int:
    return lc.A.element_size()


def _build_block(
    method: str, lc: LayerCapture, cap: Capture, options: dict, max_bytes: int
) -> CurvatureBlock:
    layer, A, G, nu, ft = lc.layer, lc.A, lc.G, cap.normaliser, cap.fisher_type
    size = layer.num_params
    if method == "exact":
        check_memory(
            f"the exact block of layer {layer.name!r} ({size}×{size})",
            size * size * _itemsize(lc),
            max_bytes,
            "use method 'woodbury' (the same matrix, never formed) or raise max_bytes=",
        )
        return ExactBlock(layer, dense_from_rows(A, G, nu), ft, options)
    if method == "kfac":
        approx = options["kfac_approx"]
        return KronBlock(
            layer, gradient_factor(G, nu, approx), input_factor(A, approx), ft, options
        )
    if method == "ekfac":
        approx = options["kfac_approx"]
        if options["basis"] is None:
            u_gamma = symmetric_eigh(gradient_factor(G, nu, approx))[1]
            u_omega = symmetric_eigh(input_factor(A, approx))[1]
        else:
            u_gamma, u_omega = _basis_for(options["basis"], layer.name)
            expected = (layer.d_out, layer.d_in + layer.has_bias)
            if u_gamma.shape != (expected[0],) * 2 or u_omega.shape != (expected[1],) * 2:
                raise FisherlabError(
                    f"the EKFAC basis for layer {layer.name!r} has shapes {tuple(u_gamma.shape)} "
                    f"and {tuple(u_omega.shape)}, but the layer's [W | b] is {expected}: it comes "
                    "from a layer of another shape"
                )
            u_gamma, u_omega = u_gamma.to(A), u_omega.to(A)
        return EKFACBlock(
            layer, u_gamma, u_omega, kfe_scalings(A, G, u_gamma, u_omega, nu), ft, options
        )
    if method == "woodbury":
        if options["conv_gram"] == "reduce_sum":
            A, G = reduce_positions(A, G)
        rows = G.shape[0] * G.shape[1]
        route = choose_gram_route(A, G, options["gram_route"])
        extra = rows * size if route == "gradients" else 0
        check_memory(
            f"the Woodbury Gram of layer {layer.name!r} ({rows}×{rows}"
            + (f", and {rows}×{size} gradient rows" if extra else "")
            + ")",
            (rows * rows * 2 + extra) * _itemsize(lc),
            max_bytes,
            "use a smaller batch or fisher_type='empirical'/'mc' (fewer rows), "
            "conv_gram='reduce_sum', or method 'kfac'",
        )
        return WoodburyBlock(layer, A, G, nu, ft, {**options, "gram_route": route})
    if method == "skfac":
        X, Y = skfac_rows(
            A, G, options["conv_reduction"], options["spatial_samples"], options["seed"]
        )
        return SKFACBlock(layer, X, Y, nu, ft, options)
    return DiagBlock(layer, fisher_diagonal(A, G, nu), ft, options)


def build(
    method: str, cap: Capture, max_bytes: int = DEFAULT_MAX_BYTES, **options: Any
) -> CurvatureDict:
    """Blocks of one method from an existing capture (see the module docstring for options)."""
    resolved = _resolve_options(method, options)
    blocks = {name: _build_block(method, lc, cap, resolved, max_bytes) for name, lc in cap.items()}
    return CurvatureDict(blocks, method, cap.fisher_type, resolved, cap.normaliser)


def build_block(
    method: str, cap: Capture, name: str, max_bytes: int = DEFAULT_MAX_BYTES, **options: Any
) -> CurvatureBlock:
    """One layer's block of one method from an existing capture."""
    return _build_block(method, cap[name], cap, _resolve_options(method, options), max_bytes)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"woodbury:conv_gram=reduce_sum,gram_route=auto"`` → ``("woodbury", {...})``.

    Values that read as integers become ``int``.
    """
    method, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise FisherlabError(f"option {item!r} in method {spec!r} is not of the form key=value")
        options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    _resolve_options(method, options)
    return method, options


def curvature(
    method: str,
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    fisher_type: str = "true",
    mc_samples: int = 1,
    skip_unsupported: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    **options: Any,
) -> CurvatureDict:
    """Per-layer curvature blocks of one method for a batch.

    Args:
        method: ``"exact"``, ``"kfac"``, ``"ekfac"``, ``"woodbury"``, ``"skfac"`` or ``"diag"``.
        model: The network (left unchanged).
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss``.
        inputs: Batch inputs.
        targets: Batch targets.
        fisher_type: ``"true"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Labels drawn per input for ``"mc"``.
        skip_unsupported: Leave out unsupported parametrised modules with a warning.
        max_bytes: Memory budget for large objects (dense blocks, Grams); refused beyond it.
        **options: Method options (module docstring).

    Returns:
        A :class:`CurvatureDict` ``{module_name: block}``.

    Example:
        >>> import torch, fisherlab as fl
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> curv = fl.curvature("ekfac", model, nn.CrossEntropyLoss(), x, y)
        >>> curv["0"].solve(torch.ones(15), damping=1e-3).shape
        torch.Size([15])
    """
    _resolve_options(method, options)
    cap = capture(model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported)
    return build(method, cap, max_bytes=max_bytes, **options)


__all__ = [
    "METHODS",
    "CurvatureBlock",
    "CurvatureDict",
    "build",
    "build_block",
    "check_damping",
    "curvature",
    "parse_method",
]
