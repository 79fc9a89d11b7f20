"""A linear metric learned with a supervised objective: neighbourhood components analysis (NCA).

The projection ``W`` maps the archive's top principal coordinates (PCA-whitened, at most
:data:`MAX_INPUT` of them) to ``m`` dimensions, starting from the shrinkage-LDA solution (padded
with the next whitened principal directions, scaled down). It is trained full-batch, on the CPU,
to maximise NCA's leave-one-out objective over cosine similarities: each item's softmax weights
over all other items (temperature learned) should fall on items of its own class. A penalty
``weight_decay * ||W - W0||² / ||W0||²`` keeps it near the LDA start, and training stops after
:data:`STEPS` steps. The result is again one linear map, stored like any other adapter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from caselens.retrieval.adaptation.linear import Basis, Projection, lda_grid

MAX_INPUT = 128  # whitened principal coordinates the metric is learned on
MAX_SAMPLE = 3000  # items per step (a random subset when the archive is larger)
STEPS = 60
LEARNING_RATE = 0.01
LDA_SHRINKAGE = 0.2
EXTRA_DIMS = 8  # output dimensions beyond the C - 1 of LDA


def metric_grid(basis: Basis, labels: np.ndarray, grid: list[dict[str, Any]], seed: int = 0) -> list[Projection]:
    """One NCA-refined projection per {weight_decay} of ``grid`` (see module docstring)."""
    import torch

    classes, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    r = min(MAX_INPUT, len(basis.variances))
    std = np.sqrt(basis.variances[:r])
    white = basis.coords[:, :r] / (std + 0.01 * std[0])  # whitened inputs, n x r
    sub = Basis(mean=np.zeros(r), directions=np.eye(r), variances=white.var(0), coords=white)  # centred already
    start = lda_grid(sub, labels, [{"shrinkage": LDA_SHRINKAGE, "dims": "all", "offset": 0.0}])[0].matrix
    start = np.asarray(start, np.float64)
    scale = float(np.linalg.norm(start, axis=0).mean())
    extra = np.eye(r)[:, : max(0, min(EXTRA_DIMS, r - start.shape[1]))] * 0.1 * scale
    w0 = np.hstack([start, extra])
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.tensor(sub.coords, dtype=torch.float32)
    y_all = torch.tensor(y)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small full-batch steps: one thread is faster than contending ones
    try:
        for params in grid:
            out.append(_train(basis, sub, params, w0, x_all, y_all, gen, r, std))
    finally:
        torch.set_num_threads(threads)
    return out


def _train(basis: Basis, sub: Basis, params: dict[str, Any], w0: np.ndarray, x_all: Any, y_all: Any, gen: Any,
           r: int, std: np.ndarray) -> Projection:
    """NCA steps from ``w0`` on the whitened coordinates ``x_all`` (see module docstring)."""
    import torch

    wd = float(params["weight_decay"])
    w_init = torch.tensor(w0, dtype=torch.float32)
    w = w_init.clone().requires_grad_(True)
    log_scale = torch.tensor(float(np.log(10.0)), requires_grad=True)
    opt = torch.optim.Adam([w, log_scale], lr=LEARNING_RATE)
    norm0 = float((w_init ** 2).sum())
    loss = torch.tensor(0.0)
    for _ in range(STEPS):
        if len(y_all) > MAX_SAMPLE:
            pick = torch.randperm(len(y_all), generator=gen)[:MAX_SAMPLE]
            xb, yb = x_all[pick], y_all[pick]
        else:
            xb, yb = x_all, y_all
        z = torch.nn.functional.normalize(xb @ w, dim=1)
        s = (z @ z.T) * log_scale.exp()
        s = s - torch.eye(len(yb)) * 1e4  # never one's own neighbour
        logp = torch.log_softmax(s, dim=1)
        same = yb[:, None] == yb[None, :]
        loss = -torch.logsumexp(logp.masked_fill(~same, -1e4), dim=1).mean()
        loss = loss + wd * ((w - w_init) ** 2).sum() / norm0
        opt.zero_grad()
        loss.backward()
        opt.step()
    w_np = w.detach().numpy().astype(np.float64)
    # back to encoder space: x -> (x - mean) @ V_r / (std + eps) @ W
    matrix = (basis.directions[:, :r] / (std + 0.01 * std[0])) @ w_np
    return Projection("metric", dict(params), basis.mean.astype(np.float32), matrix.astype(np.float32),
                      extra={"out_dim": int(matrix.shape[1]), "final_loss": round(float(loss.item()), 4)})
