r"""Plain-PyTorch reference steps: the arithmetic of fisherlab's optimizers, written out.

Each class is the textbook step of one method on the ``Linear`` and ``Conv2d`` layers of a
model trained with a mean cross-entropy, in the shortest code that does fisherlab's arithmetic:
hooks record the homogeneous inputs ``Ã [N, T, D]`` (im2col patches for a convolution, a column
of ones for the bias) and the output-gradient rows ``G [N, T, d_out]`` of the per-sample loss
(``ν = N`` times the output gradient of the mean loss); ``step()`` replaces each layer's
``p.grad`` by its preconditioned direction, in Kronecker layout ``V = [∇W | ∇b]``
(``d_out × D``), and takes ``torch.optim.SGD``'s step (heavy-ball momentum on the direction, as
fisherlab). The benchmark (``bench_optim.py``) times fisherlab against these ("÷ plain"), and
``tests/test_reference_steps.py`` checks in float64 that each gives fisherlab's parameter
change — the guard that they do the same arithmetic.

Methods (``λ`` the damping, ``ν = N``; factors are those of the batch, ``Ω = ÃᵀÃ/(NT)`` and
``Γ = GᵀG/ν`` over all positions, averaged over steps as ``S ← βS + (1−β)S_b``):

* :class:`KFACReference`: eigen damping ``U_Γ[(U_ΓᵀVU_Ω) / (λ_Γλ_Ωᵀ + λ)]U_Ωᵀ`` with the
  factors' eigenbases every ``inv_every`` steps, or factored damping
  ``(Γ + √λ/π I)⁻¹ V (Ω + π√λ I)⁻¹``, ``π = √((tr Ω/D)/(tr Γ/d_out))``, inverses every
  ``inv_every`` steps; statistics every ``stat_every`` steps.
* :class:`EKFACReference`: KFAC's eigenbasis, scalings ``s = Σ_n (U_Γᵀ G_nᵀ Ã_n U_Ω)²/ν`` of
  each statistics step (averaged over a factor's null space, where the basis is arbitrary),
  ``U_Γ[(U_ΓᵀVU_Ω)/(s + λ)]U_Ωᵀ``.
* :class:`TENGraDReference`: ``(g − Jᵀ(νλI + K)⁻¹Jg)/λ`` with ``K = JJᵀ`` (``(ÃÃᵀ)∘(GGᵀ)``
  for ``T = 1``, explicit per-sample gradients otherwise) — the ``Jg`` route, which
  preconditions any ``p.grad``; ``route="paper"``: ``Jᵀ(νλI + K)⁻¹1``, which equals it only
  when ``p.grad`` is the batch gradient ``Jᵀ1/ν``.
* :class:`FNGDReference`: TENGraD's step during the first epoch, keeping
  ``w = (νλI + K)⁻¹1`` per step index; later ``s·Jᵀw`` with ``s`` the factor of ``p.grad`` on
  the batch gradient ``ĝ = Jᵀ1/ν`` (both from one product ``Jᵀ[w, 1/ν]``), checked to be
  ``p.grad`` up to rounding (else TENGraD's solve).
* :class:`SKFACReference`: running averages of the factor rows ``X`` (``Ã``, position mean
  for convolutions) and ``Y`` (``G``, position sum), ``Γ = YᵀY/ν``, ``Ω = XᵀX/S``; the
  non-zero eigenpairs of each from the smaller of its two Grams, and
  ``V/λ + U[(UᵀVU)(1/(γωᵀ + λ) − 1/λ)]Uᵀ``.

Decompositions run in float64 for float32 statistics, as fisherlab's. Each class counts the
floating-point operations of its decompositions (``decomposition_flops``; LAPACK's are not
seen by ``torch.utils.flop_counter``): ``eigh`` of an ``n×n`` matrix ``9n³`` (Golub & Van Loan,
symmetric QR with vectors), a Cholesky factor ``n³/3``, an inverse from it ``2n³/3``, a
Cholesky solve ``2n²k``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float32 else t.dtype


class Capture:
    """Hooks recording ``Ã [N, T, D]`` and ``G [N, T, d_out]`` of every Linear/Conv2d layer."""

    def __init__(self, model: nn.Module):
        self.layers = {
            name: m for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
        }
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        self.active = True
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name: str):
        def forward(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (self.active and torch.is_grad_enabled()):
                return
            x = inputs[0].detach()
            if isinstance(module, nn.Conv2d):
                x = F.unfold(
                    x, module.kernel_size, module.dilation, module.padding, module.stride
                ).transpose(1, 2)
            else:
                x = x.unsqueeze(1)
            if module.bias is not None:
                x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
            self.A[name] = x
            n = x.shape[0]  # ν of a mean cross-entropy

            def backward(g: Tensor) -> None:
                g = g.detach() * n
                self.G[name] = g.flatten(2).transpose(1, 2) if g.ndim == 4 else g.unsqueeze(1)

            output.register_hook(backward)

        return forward

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def kron_grad(module: nn.Module) -> Tensor:
    """``[∇W | ∇b]`` as ``[d_out, D]``."""
    g = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return g
    return torch.cat([g, module.bias.grad.unsqueeze(1)], dim=1)


def set_grad(module: nn.Module, direction: Tensor) -> None:
    """Write a ``[d_out, D]`` direction back into ``p.grad``."""
    d_in = module.weight[0].numel()
    module.weight.grad.copy_(direction[:, :d_in].reshape_as(module.weight))
    if module.bias is not None:
        module.bias.grad.copy_(direction[:, d_in])


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors, computed in float64 for float32."""
    work = matrix.to(_work_dtype(matrix))
    values, vectors = torch.linalg.eigh((work + work.T) / 2)
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


def damped_inverse(matrix: Tensor, shift: Tensor) -> Tensor:
    """``(M + cI)⁻¹`` by Cholesky, in float64 for float32."""
    work = matrix.to(_work_dtype(matrix))
    eye = torch.eye(len(work), dtype=work.dtype, device=work.device)
    work = (work + work.T) / 2 + shift.to(work.dtype) * eye
    return torch.cholesky_inverse(torch.linalg.cholesky(work)).to(matrix.dtype)


class ReferenceStep:
    """``zero_grad``/``step`` as a ``torch.optim`` optimizer; subclasses give ``direction``."""

    #: Steps between statistics steps (``Ã`` and ``G`` are recorded only for those).
    stat_every = 1

    def __init__(self, model: nn.Module, lr: float, damping: float, momentum: float = 0.0):
        self.capture = Capture(model)
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        self.damping = damping
        self.steps = 0
        self.state: dict[str, dict] = {name: {} for name in self.capture.layers}
        self.decomposition_flops = 0.0

    def zero_grad(self) -> None:
        self.sgd.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        for name, module in self.capture.layers.items():
            if module.weight.grad is not None:
                set_grad(module, self.direction(name, kron_grad(module)))
        self.sgd.step()
        self.steps += 1
        self.capture.active = self.steps % self.stat_every == 0

    def statistics(self, name: str) -> tuple[Tensor, Tensor]:
        """The layer's ``Ã [N, T, D]`` and ``G [N, T, d_out]`` of this step."""
        return self.capture.A[name], self.capture.G[name]

    def direction(self, name: str, V: Tensor) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        self.capture.close()


class KFACReference(ReferenceStep):
    """KFAC with eigen or factored damping (module docstring)."""

    def __init__(
        self, model, lr, damping, momentum=0.0, damping_mode="eigen", stat_decay=0.95,
        stat_every=1, inv_every=10,
    ):  # fmt: skip
        super().__init__(model, lr, damping, momentum)
        self.damping_mode, self.decay = damping_mode, stat_decay
        self.stat_every, self.inv_every = stat_every, inv_every

    def update_factors(self, name: str) -> dict:
        state = self.state[name]
        if self.steps % self.stat_every == 0:
            A, G = self.statistics(name)
            a, g = A.flatten(0, 1), G.flatten(0, 1)
            omega, gamma = a.T @ a / a.shape[0], g.T @ g / A.shape[0]
            if "omega" in state:
                omega = self.decay * state["omega"] + (1 - self.decay) * omega
                gamma = self.decay * state["gamma"] + (1 - self.decay) * gamma
            state["omega"], state["gamma"] = omega, gamma
        return state

    def direction(self, name: str, V: Tensor) -> Tensor:
        state = self.update_factors(name)
        gamma, omega = state["gamma"], state["omega"]
        if self.steps % self.inv_every == 0:
            if self.damping_mode == "factored":
                pi = torch.sqrt((omega.trace() / len(omega)) / (gamma.trace() / len(gamma)))
                root = math.sqrt(self.damping)
                state["inv_gamma"] = damped_inverse(gamma, root / pi)
                state["inv_omega"] = damped_inverse(omega, root * pi)
                self.decomposition_flops += len(gamma) ** 3 + len(omega) ** 3
            else:
                state["eig_gamma"], state["eig_omega"] = eigh(gamma), eigh(omega)
                self.decomposition_flops += 9 * (len(gamma) ** 3 + len(omega) ** 3)
        if self.damping_mode == "factored":
            return state["inv_gamma"] @ V @ state["inv_omega"]
        (lg, ug), (lo, uo) = state["eig_gamma"], state["eig_omega"]
        return ug @ ((ug.T @ V @ uo) / (torch.outer(lg, lo) + self.damping)) @ uo.T


def pool_null_spaces(s: Tensor, values_gamma: Tensor, values_omega: Tensor) -> Tensor:
    """Scalings averaged over each factor's null space (eigenvalues ``≤ n·ε·λ_max``)."""
    for dim, values in ((1, values_omega), (0, values_gamma)):
        null = values <= len(values) * torch.finfo(values.dtype).eps * values.abs().max()
        shape = (1, -1) if dim == 1 else (-1, 1)
        mask = null.reshape(shape).to(s.dtype)
        mean = (s * mask).sum(dim, keepdim=True) / mask.sum().clamp_min(1)
        s = torch.where(null.reshape(shape), mean, s)
    return s


class EKFACReference(KFACReference):
    """EKFAC: KFAC's eigenbasis, the batch's own scalings (module docstring)."""

    def __init__(self, model, lr, damping, momentum=0.0, stat_decay=0.95, stat_every=1,
                 inv_every=10):  # fmt: skip
        super().__init__(model, lr, damping, momentum, "eigen", stat_decay, stat_every, inv_every)

    def direction(self, name: str, V: Tensor) -> Tensor:
        state = self.update_factors(name)
        if self.steps % self.inv_every == 0:
            state["eig_gamma"], state["eig_omega"] = eigh(state["gamma"]), eigh(state["omega"])
            self.decomposition_flops += 9 * (len(state["gamma"]) ** 3 + len(state["omega"]) ** 3)
        (lg, ug), (lo, uo) = state["eig_gamma"], state["eig_omega"]
        if self.steps % self.stat_every == 0:
            A, G = self.statistics(name)
            a, g = A @ uo, G @ ug  # rows in the eigenbasis
            if A.shape[1] == 1:
                s = (g[:, 0] ** 2).T @ (a[:, 0] ** 2)
            else:
                s = ((g.transpose(1, 2) @ a) ** 2).sum(0)
            state["s"] = pool_null_spaces(s / A.shape[0], lg, lo)
        return ug @ ((ug.T @ V @ uo) / (state["s"].clamp_min(0) + self.damping)) @ uo.T


class TENGraDReference(ReferenceStep):
    """The exact damped block of the batch, by Woodbury (module docstring)."""

    def __init__(self, model, lr, damping, momentum=0.0, route="jg"):
        super().__init__(model, lr, damping, momentum)
        self.route = route

    def gram_system(self, name: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """``Ã``, ``G``, the per-sample gradients ``[N, d_out·D]`` (``T > 1``) and the
        Cholesky factor of ``νλI + K``."""
        A, G = self.statistics(name)
        n = A.shape[0]
        rows = None
        if A.shape[1] == 1:
            K = (A[:, 0] @ A[:, 0].T) * (G[:, 0] @ G[:, 0].T)
        else:
            rows = (G.transpose(1, 2) @ A).flatten(1)
            K = rows @ rows.T
        K = K.to(_work_dtype(K))
        K.diagonal().add_(n * self.damping)
        self.decomposition_flops += n**3 / 3
        return A, G, rows, torch.linalg.cholesky(K)

    @staticmethod
    def jv(A: Tensor, G: Tensor, rows: Tensor | None, V: Tensor) -> Tensor:
        """``Jv`` ``[N]``."""
        if rows is not None:
            return rows @ V.flatten()
        return ((G[:, 0] @ V) * A[:, 0]).sum(1)

    @staticmethod
    def jtw(A: Tensor, G: Tensor, rows: Tensor | None, w: Tensor) -> Tensor:
        """``Jᵀw`` ``[d_out, D]`` for ``w [N]`` (or ``[N, k]``: ``[k, d_out, D]``)."""
        W = w if w.ndim == 2 else w.unsqueeze(1)
        if rows is not None:
            out = (W.T @ rows).reshape(W.shape[1], G.shape[2], A.shape[2])
        else:
            out = torch.stack([(G[:, 0] * W[:, [k]]).T @ A[:, 0] for k in range(W.shape[1])])
        return out if w.ndim == 2 else out[0]

    def solve(self, A, G, rows, chol, V: Tensor) -> Tensor:
        u = self.jv(A, G, rows, V).to(chol.dtype)
        w = torch.cholesky_solve(u.unsqueeze(1), chol).squeeze(1).to(V.dtype)
        self.decomposition_flops += 2 * len(chol) ** 2
        return (V - self.jtw(A, G, rows, w)) / self.damping

    def coefficients(self, chol: Tensor, dtype: torch.dtype) -> Tensor:
        """``w = (νλI + K)⁻¹1``."""
        ones = torch.ones(len(chol), 1, dtype=chol.dtype, device=chol.device)
        self.decomposition_flops += 2 * len(chol) ** 2
        return torch.cholesky_solve(ones, chol).squeeze(1).to(dtype)

    def direction(self, name: str, V: Tensor) -> Tensor:
        A, G, rows, chol = self.gram_system(name)
        if self.route == "paper":
            return self.jtw(A, G, rows, self.coefficients(chol, V.dtype))
        return self.solve(A, G, rows, chol, V)


class FNGDReference(TENGraDReference):
    """FNGD: TENGraD's weights of the first epoch, reused (module docstring)."""

    def __init__(self, model, lr, damping, momentum=0.0, steps_per_epoch=10):
        super().__init__(model, lr, damping, momentum)
        self.steps_per_epoch = steps_per_epoch

    def direction(self, name: str, V: Tensor) -> Tensor:
        weights = self.state[name].setdefault("weights", {})
        index = self.steps % self.steps_per_epoch
        if self.steps < self.steps_per_epoch:
            A, G, rows, chol = self.gram_system(name)
            weights[index] = self.coefficients(chol, V.dtype)
            return self.solve(A, G, rows, chol, V)
        A, G = self.statistics(name)
        rows = (G.transpose(1, 2) @ A).flatten(1) if A.shape[1] > 1 else None
        w = weights[index]
        shared, batch = self.jtw(A, G, rows, torch.stack([w, torch.full_like(w, 1 / len(w))], 1))
        s = (V * batch).sum() / (batch * batch).sum()
        tolerance = torch.finfo(V.dtype).eps ** 0.5
        if torch.linalg.vector_norm(V - s * batch) > tolerance * torch.linalg.vector_norm(V):
            A, G, rows, chol = self.gram_system(name)  # p.grad is not s·ĝ: TENGraD's solve
            return self.solve(A, G, rows, chol, V)
        return s * shared


def low_rank_eigh(rows: Tensor, scale: float) -> tuple[Tensor, Tensor, float]:
    """Non-zero eigenpairs of ``rowsᵀrows/scale`` (by the ``S×S`` Gram when ``S < d``) and
    the decomposition's FLOPs."""
    s, d = rows.shape
    if s >= d:
        values, vectors = eigh(rows.T @ rows / scale)
        return values, vectors, 9 * d**3
    sigma, v = eigh(rows @ rows.T)
    keep = sigma > sigma.max() * s * torch.finfo(sigma.dtype).eps
    sigma, v = sigma[keep], v[:, keep]
    return sigma / scale, (rows.T @ v) / sigma.sqrt(), 9 * s**3


class SKFACReference(ReferenceStep):
    """SKFAC with reduce-sum rows and eigen damping (module docstring)."""

    def __init__(self, model, lr, damping, momentum=0.0, stat_decay=0.95):
        super().__init__(model, lr, damping, momentum)
        self.decay = stat_decay

    def direction(self, name: str, V: Tensor) -> Tensor:
        A, G = self.statistics(name)
        n, state = A.shape[0], self.state[name]
        X, Y = (A[:, 0], G[:, 0]) if A.shape[1] == 1 else (A.mean(1), G.sum(1))
        if "X" in state:
            X = self.decay * state["X"] + (1 - self.decay) * X
            Y = self.decay * state["Y"] + (1 - self.decay) * Y
        state["X"], state["Y"] = X, Y
        lg, ug, flops_g = low_rank_eigh(Y, n)
        lo, uo, flops_o = low_rank_eigh(X, X.shape[0])
        self.decomposition_flops += flops_g + flops_o
        scale = 1 / (torch.outer(lg, lo) + self.damping) - 1 / self.damping
        return V / self.damping + ug @ ((ug.T @ V @ uo) * scale) @ uo.T


#: Each method's reference, by the benchmark's name for it.
REFERENCES = {
    "kfac": lambda m, **kw: KFACReference(m, damping_mode="eigen", **kw),
    "kfac-factored": lambda m, **kw: KFACReference(m, damping_mode="factored", **kw),
    "ekfac": EKFACReference,
    "tengrad": TENGraDReference,
    "tengrad-paper": lambda m, **kw: TENGraDReference(m, route="paper", **kw),
    "fngd": FNGDReference,
    "skfac": SKFACReference,
}
