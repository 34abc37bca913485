"""The slow, obvious twin of the reference preset, shared by tests and benchmarks."""

from __future__ import annotations

import numpy as np
import torch


def published_loes(
    x: torch.Tensor,
    y_labels: torch.Tensor,
    k: int,
    reg=1e-3,
    alpha=1.0,
    gamma=0.5,
    eta=0.1,
    seed=0,
    dtype=torch.float64,
):
    """A direct, slow transcription of the published algorithm (spec section 2).

    Every candidate recomputes its isotropy, the selected-set solve and the
    redundancy from scratch, as the published code does; ``dtype=torch.float32``
    matches its arithmetic, float64 is the default for exact comparisons.
    """
    g = torch.Generator().manual_seed(seed)
    x = x.to(dtype)
    views = [x[:, l] for l in range(x.shape[1])]
    y = torch.nn.functional.one_hot(y_labels, int(y_labels.max()) + 1).to(dtype)

    def iso(v):
        vc = v - v.mean(0)
        n, d = vc.shape
        if d > 512:
            lam = torch.linalg.svdvals(vc) ** 2 / n
        else:
            lam = torch.linalg.eigvalsh(vc.T @ vc / n + 1e-6 * torch.eye(d, dtype=v.dtype))
        lam = lam.clamp(min=1e-6)
        return float(lam.mean() / (lam.std(unbiased=False) + 1e-6))

    def ridge(v, t):
        vc, tc = v - v.mean(0), t - t.mean(0)
        w = torch.linalg.solve(vc.T @ vc + reg * torch.eye(v.shape[1], dtype=v.dtype), vc.T @ tc)
        b = t.mean(0) - v.mean(0) @ w
        return v @ w + b

    def red(v, sel):
        return max(
            float(
                torch.linalg.norm(v.T @ views[j])
                / (torch.linalg.norm(v) * torch.linalg.norm(views[j]) + 1e-8)
            )
            for j in sel
        )

    def tri(v, labels):
        u = torch.unique(labels)
        if len(u) < 3:
            return 0.0
        c = torch.stack([v[labels == a].mean(0) for a in u])
        idx = torch.randint(0, len(u), (min(200, 3 * len(u)), 3), generator=g)
        a, b, d = c[idx[:, 0]], c[idx[:, 1]], c[idx[:, 2]]
        ab, ac = a - b, a - d
        return float(
            (
                0.5
                * torch.sqrt(((ab**2).sum(1) * (ac**2).sum(1) - (ab * ac).sum(1) ** 2).clamp(min=0))
            ).mean()
        )

    scores = [float(((ridge(v, y) - y) ** 2).mean()) + alpha * (1 - iso(v)) for v in views]
    best = int(np.argmin(scores))
    selected, picked = [best], [scores[best]]
    y_hat = ridge(views[best], y)
    for _ in range(1, k):
        r = y - y_hat
        xs = torch.cat([views[j] for j in selected], 1)
        xsc = xs - xs.mean(0)
        cand = []
        for l, v in enumerate(views):
            if l in selected:
                continue
            vc = v - v.mean(0)
            b = torch.linalg.solve(
                xsc.T @ xsc + 1e-6 * torch.eye(xs.shape[1], dtype=v.dtype), xsc.T @ vc
            )
            xt = vc - xsc @ b + v.mean(0)
            pred = ridge(xt, r)
            s = (
                float(((pred - r) ** 2).mean())
                + alpha * (1 - iso(v))
                + gamma * red(v, selected)
                - eta * tri(xt, y_labels)
            )
            cand.append((s, l, pred))
        s, l, pred = min(cand, key=lambda c: c[0])
        selected.append(l)
        picked.append(s)
        y_hat = y_hat + pred
    return selected, picked
