"""``fl.compare``: every approximation against the exact Fisher, per layer, in one table.

The exact reference is the Woodbury block (the exact Fisher, never formed), so the comparison
runs at scale: Frobenius errors from the captured statistics and the ``M×M`` Gram
(:func:`fisherlab.metrics.frobenius_at_scale`), exact spectra from the Gram, and exact damped
solves by Woodbury's identity. Direction quality uses the mini-batch gradient ``g`` of the loss
(the empirical rows summed, ``g = Jᵀ1/ν``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.blocks import build_block, parse_method
from fisherlab.blocks.base import check_damping
from fisherlab.capture import Capture, capture
from fisherlab.conventions import DEFAULT_MAX_BYTES
from fisherlab.metrics import (
    direction_quality,
    fisher_norm_sq,
    frobenius_at_scale,
    spectrum_distance,
)

DEFAULT_METHODS = ("kfac", "ekfac", "woodbury", "woodbury:conv_gram=reduce_sum", "skfac", "diag")


def batch_gradients(cap: Capture) -> dict[str, Tensor]:
    """The mini-batch loss gradient per layer (parameter order) from an empirical capture."""
    return {name: lc.jacobian_rows().sum(dim=(0, 1)) / cap.normaliser for name, lc in cap.items()}


def compare(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    methods: Sequence[str] = DEFAULT_METHODS,
    fisher_type: str = "true",
    damping: float = 1e-3,
    mc_samples: int = 1,
    skip_unsupported: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """A row per layer × method: errors against the exact Fisher, timings and memory.

    Args:
        model: The network (left unchanged).
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss``.
        inputs: Batch inputs.
        targets: Batch targets.
        methods: Method specs, ``"name"`` or ``"name:option=value,…"``.
        fisher_type: Fisher type of every block (and of the exact reference).
        damping: ``λ`` of the damped solves.
        mc_samples: Labels drawn per input for ``"mc"``.
        skip_unsupported: Leave out unsupported parametrised modules with a warning.
        max_bytes: Memory budget of each block.
        progress: Show a progress bar.

    Returns:
        Rows with columns ``layer, method, P, rel_frobenius, spectrum_distance,
        direction_cosine, direction_rel_error, build_s, solve_s, memory_mb``.
    """
    damping = check_damping(damping)
    specs = [(spec, *parse_method(spec)) for spec in methods]
    cap = capture(model, loss_fn, inputs, targets, fisher_type, mc_samples, skip_unsupported)
    grads = batch_gradients(
        capture(model, loss_fn, inputs, targets, "empirical", 1, skip_unsupported)
    )
    rows = []
    work = [(name, spec) for name in cap for spec in specs]
    exact_cache: dict[str, tuple] = {}
    for name, (spec, method, options) in tqdm(work, desc="compare", disable=not progress):
        layer = cap[name]
        if name not in exact_cache:
            exact = build_block("woodbury", cap, name, max_bytes=max_bytes)
            exact_cache[name] = (
                exact,
                exact.eigvalsh().flip(0),
                fisher_norm_sq(layer, cap.normaliser),
            )
        exact, exact_spectrum, f_sq = exact_cache[name]
        start = time.perf_counter()
        block = build_block(method, cap, name, max_bytes=max_bytes, **options)
        built = time.perf_counter()
        block.solve(grads[name], damping)
        solved = time.perf_counter()
        error, norm = frobenius_at_scale(block, layer, cap.normaliser, f_sq)
        direction = direction_quality(block, exact, grads[name], damping)
        rows.append(
            {
                "layer": name,
                "method": spec,
                "P": block.size,
                "rel_frobenius": error / norm if norm > 0 else 0.0,
                "spectrum_distance": spectrum_distance(exact_spectrum, block.eigvalsh().flip(0)),
                "direction_cosine": direction.cosine,
                "direction_rel_error": direction.relative_error,
                "build_s": built - start,
                "solve_s": solved - built,
                "memory_mb": block.nbytes / 2**20,
            }
        )
    return rows


__all__ = ["DEFAULT_METHODS", "batch_gradients", "compare"]
