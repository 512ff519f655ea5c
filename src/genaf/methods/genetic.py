r"""The genetic (topology-preserving) regulariser of Gen-AF stage 1.

Given a student batch ``A`` (n×d), a target batch ``B`` (n×d), labels ``y`` (n,) and per-sample
weights ``s`` (n,) (the per-sample clean cross-entropy), with ``e = 1e-7``:

1. ``W_ij = tanh((s_i + s_j) / 32)``; ``M_ij = +1`` if ``y_i != y_j`` else ``-1``;
   ``Δ_ij = 2 · M_ij · W_ij``.
2. Rows of ``A`` and ``B`` are L2-normalised (rows of zeros stay zero).
3. ``D^A_ij = 1 − â_i·â_j``; each row's minimum over ``j ≠ i`` is subtracted (nearest-neighbour
   shift), the diagonal set to 0, the result clamped to ``[e, 2 − e]``; ``S^A = 1 − D^A``.
4. ``D^B`` likewise from ``B``; ``D̃ = (1 − W) ⊙ D^B + Δ`` clamped to ``[e, 2 − e]``;
   ``S^B = 1 − D̃`` (same-class pairs pulled towards distance 0, different-class pairs pushed
   towards 2, more strongly for high-loss samples).
5. ``P = rownorm((S^A + 1)/2)``, ``Q = rownorm((S^B + 1)/2)`` (each row divided by its sum).
6. ``L = Σ_ij [Q log((Q+e)/(P+e)) + (1−Q) log((1−Q+e)/(1−P+e))]``.

``reduction="sum"`` is the reference (it grows with n²); ``"mean"`` divides by n², so a
weight tuned at one batch size carries over to another. The function works on whatever
batch it receives (a per-process batch or a gathered one) and needs n ≥ 2.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

EPS = 1e-7


def shifted_cosine_distance(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Steps 2–3: row-normalise, cosine distance, subtract each row's off-diagonal minimum,
    zero the diagonal, clamp to ``[eps, 2 − eps]``. Returns (n, n)."""
    norm = z.norm(dim=1, keepdim=True)
    # exact unit rows for any positive norm (so the result is invariant to rescaling a row);
    # zero rows stay zero, and the safe denominator keeps their gradient finite
    zn = z / torch.where(norm > 0, norm, torch.ones_like(norm))
    d = 1.0 - zn @ zn.t()
    n = d.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=d.device)
    row_min = d.masked_fill(eye, float("inf")).min(dim=1, keepdim=True).values
    d = (d - row_min).masked_fill(eye, 0.0)
    return d.clamp(eps, 2.0 - eps)


def genetic_regularizer(
    student: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    reduction: str = "sum",
    eps: float = EPS,
) -> torch.Tensor:
    """The genetic regulariser ``L_GR(A=student, B=target, y, s)``; see the module docstring.

    Args:
        student: (n, d) float — the batch whose neighbourhood graph is trained (``A``).
        target: (n, d') float — the batch whose label-adjusted graph is the target (``B``).
        labels: (n,) int class labels.
        weights: (n,) float per-sample weights ``s`` (e.g. clean cross-entropy).
        reduction: ``"sum"`` over the n² entries (reference) or ``"mean"``.
    Returns:
        a scalar tensor, finite and non-negative.
    """
    if student.dim() != 2 or target.dim() != 2:
        raise ConfigError(
            f"genetic regulariser wants (n, d) inputs, got {tuple(student.shape)} and {tuple(target.shape)}"
        )
    n = student.shape[0]
    if n < 2 or target.shape[0] != n or labels.shape[0] != n or weights.shape[0] != n:
        raise ConfigError(
            f"genetic regulariser needs matching batches of n >= 2 (got {n}, {target.shape[0]}, "
            f"{labels.shape[0]}, {weights.shape[0]})"
        )
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"reduction must be 'sum' or 'mean', got '{reduction}'")
    # Autocast would run the Gram matrices in bf16/fp16 whatever the inputs' dtype (the loss is
    # then off by >10 % and, for nearly collinear rows, its gradient is exactly zero): the
    # regulariser computes with autocast off, in at least float32 (float64 stays float64).
    with torch.autocast(device_type=student.device.type, enabled=False):
        return _genetic(student, target, labels, weights, reduction, eps)


def _genetic(student, target, labels, weights, reduction: str, eps: float) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(student.dtype, target.dtype), torch.float32)
    student, target, weights = student.to(dtype), target.to(dtype), weights.to(dtype)
    w = torch.tanh((weights[:, None] + weights[None, :]) / 32.0)
    m = (labels[:, None] != labels[None, :]).to(dtype) * 2.0 - 1.0
    delta = 2.0 * m * w
    s_a = 1.0 - shifted_cosine_distance(student, eps)
    d_b = shifted_cosine_distance(target, eps)
    s_b = 1.0 - ((1.0 - w) * d_b + delta).clamp(eps, 2.0 - eps)
    p = (s_a + 1.0) / 2.0
    p = p / p.sum(dim=1, keepdim=True)
    q = (s_b + 1.0) / 2.0
    q = q / q.sum(dim=1, keepdim=True)
    loss = q * torch.log((q + eps) / (p + eps)) + (1 - q) * torch.log((1 - q + eps) / (1 - p + eps))
    return loss.sum() if reduction == "sum" else loss.mean()
