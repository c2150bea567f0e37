"""Paper 002's measures: proportional effective rank of weights and linear CKA of activations.

PER: p_j = s_j / sum(s) (L1 over singular values), ER = exp(-sum p_j ln p_j), PER = ER / r.
CKA: X, Y (n x d) column-centred, CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).
"""

from __future__ import annotations

import torch


def proportional_effective_rank(singular_values: torch.Tensor, rank: int | None = None) -> float:
    """PER = exp(entropy of s / sum(s)) / r, with r = `rank` or the number of singular values."""
    s = singular_values.double().clamp_min(0)
    r = rank if rank is not None else s.numel()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()) / r)


def condition_number(singular_values: torch.Tensor) -> float:
    s = singular_values.double()
    smallest = s.min()
    return float(s.max() / smallest) if smallest > 0 else float("inf")


def ov_singular_values(circuits: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Singular values of each head's OV circuit W_O_h @ W_V_h (d x d, rank <= head_dim), from the
    (W_O_h, W_V_h) pairs a model family gives (`Family.ov_circuits`, GQA-aware).

    The d x d product is never formed: with thin QRs W_O_h = Q_o R_o and W_V_h^T = Q_v R_v, its non-zero
    singular values are those of the head_dim x head_dim R_o R_v^T.
    """
    out = []
    for w_o, w_v in circuits:
        r_o = torch.linalg.qr(w_o.double(), mode="r").R
        r_v = torch.linalg.qr(w_v.double().T, mode="r").R
        out.append(torch.linalg.svdvals(r_o @ r_v.T))
    return out


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two activation matrices over the same n examples (rows)."""
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")
