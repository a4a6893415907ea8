"""R-CNN's second stage (Girshick et al., 2014, section 2.3 and appendix B/C):
per-class linear SVMs on the CNN's RoI features with hard-negative mining, and
class-specific ridge box regression.

Pure tensor code: features in, weights out. :class:`SVMPredictor` holds the
result as buffers (saved with the model) and answers like a box predictor.
"""

from __future__ import annotations

import torch
from torch import nn


def train_linear_svm(
    pos: torch.Tensor, neg: torch.Tensor, c: float = 1.0, iters: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised squared-hinge linear SVM (liblinear's default loss),
    full-batch L-BFGS. ``pos [P, D]``, ``neg [N, D]`` -> ``(w [D], b)``."""
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), -torch.ones(len(neg))]).double()
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        margin = (1 - y * (x @ w[:-1] + w[-1])).clamp(min=0)
        loss = 0.5 * (w[:-1] ** 2).sum() + c * (margin**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach().float()
    return w[:-1], w[-1]


def mine_svm(
    pos: torch.Tensor,
    neg: torch.Tensor,
    c: float = 1.0,
    rounds: int = 3,
    start: int = 2000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hard-negative mining: train on a random ``start`` negatives, then add every
    negative inside the margin (score > -1), retrain; ``rounds`` times.
    Returns ``(w, b, negatives used)``."""
    g = torch.Generator().manual_seed(seed)
    active = torch.randperm(len(neg), generator=g)[:start]
    w, b = train_linear_svm(pos, neg[active], c)
    for _ in range(rounds):
        hard = ((neg @ w + b) > -1).nonzero().flatten()
        grown = torch.unique(torch.cat([active, hard]))
        if len(grown) == len(active):
            break
        active = grown
        w, b = train_linear_svm(pos, neg[active], c)
    return w, b, len(active)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1000.0) -> torch.Tensor:
    """Closed-form ridge regression ``[D+1, T]`` (last row: bias, not penalised)."""
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    reg = lam * torch.eye(xb.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0
    return torch.linalg.solve(xb.T @ xb + reg, xb.T @ y.double()).float()


class SVMPredictor(nn.Module):
    """``features [R, D] -> (scores [R, K+1], box deltas [R, (K+1) * 4])``.

    Column 0 (background) scores a constant 0; object scores are SVM margins.
    """

    def __init__(self, representation: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, representation))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("reg", torch.zeros(num_classes, representation + 1, 4))
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        scores = x @ self.weight.T + self.bias
        scores[:, 0] = 0.0
        xb = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        deltas = torch.einsum("rd,kdt->rkt", xb, self.reg).reshape(len(x), -1)
        return scores, deltas
