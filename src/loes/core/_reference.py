"""``preset="reference"``: the published LOES formulas (spec section 2).

The arithmetic follows the published implementation term by term, computed in
float64 and without repeated work: each layer's isotropy is computed once, the
selected set's normal matrix is factorised once per step, and each redundancy
pair once. Differences from the published code, all deliberate:

- class triplets for the triangle term are drawn from a ``torch.Generator``
  seeded with ``random_state`` instead of the global RNG (same distribution:
  uniform with replacement, ``min(200, 3C)`` of them);
- fp16/bf16 inputs are upcast instead of raising.
"""

from __future__ import annotations

import logging
import time

import torch

from loes._linalg import center, gram
from loes._progress import progress
from loes._rng import torch_generator
from loes._validation import Targets
from loes.core._engine import EngineOutput, ReferenceOptions, score_total
from loes.result import StepTable

__all__ = ["run_reference"]

_EPS = 1e-6


def _isotropy(xc: torch.Tensor) -> float:
    """Published isotropy on an already centred layer (see ``reference_isotropy``)."""
    n, d = xc.shape
    if d > 512:
        lam = torch.linalg.eigvalsh(gram(xc) / n)
    else:
        lam = torch.linalg.eigvalsh(
            xc.T @ xc / n + _EPS * torch.eye(d, dtype=xc.dtype, device=xc.device)
        )
    lam = lam.clamp(min=_EPS)
    return float(lam.mean() / (lam.std(unbiased=False) + _EPS))


def _ridge_mse(xc: torch.Tensor, r: torch.Tensor, reg: float):
    """In-sample ridge fit of ``r`` on centred ``xc`` with intercept: (mse, prediction)."""
    rm = r.mean(0, keepdim=True)
    eye = torch.eye(xc.shape[1], dtype=xc.dtype, device=xc.device)
    w = torch.linalg.solve(xc.T @ xc + reg * eye, xc.T @ (r - rm))
    pred = xc @ w + rm
    return float(((pred - r) ** 2).mean()), pred


def _triangle(xc: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> float:
    """Mean area of ``min(200, 3C)`` random centroid triangles (with replacement)."""
    classes = torch.unique(labels)
    c = len(classes)
    if c < 3:
        return 0.0
    cent = torch.stack([xc[labels == u].mean(0) for u in classes])
    idx = torch.randint(0, c, (min(200, 3 * c), 3), generator=generator).to(xc.device)
    a, b, d = cent[idx[:, 0]], cent[idx[:, 1]], cent[idx[:, 2]]
    ab, ac = a - b, a - d
    area = 0.5 * torch.sqrt(
        ((ab * ab).sum(1) * (ac * ac).sum(1) - (ab * ac).sum(1) ** 2).clamp(min=0)
    )
    return float(area.mean())


def run_reference(
    layers: list[torch.Tensor],
    tgt: Targets | None,
    k: int,
    *,
    task: str,
    opts: ReferenceOptions,
    seed: int,
    show_progress,
    log: logging.Logger,
) -> EngineOutput:
    """Greedy selection with the published score (see the module docstring).

    Parameters
    ----------
    layers : list of n_layers tensors of shape (n_samples, dim_l)
    tgt : Targets or None (``task="label_free"``)
    k : int, layers to select
    task, opts, seed, show_progress, log
        As validated by :func:`loes.select_layers_from_custom_embeddings`.
    """
    t0 = time.perf_counter()
    device = layers[0].device
    reg, alpha, gamma, eta = opts.reg, opts.alpha, opts.gamma, opts.eta
    raw = [layer.to(torch.float64) for layer in layers]
    xcs = [center(x) for x in raw]
    n_layers = len(raw)
    iso_pen = [  # the unweighted term 1 - iso, as stored in the step tables
        1.0 - _isotropy(xc)
        for xc in progress(xcs, show_progress, desc="LOES: isotropy", unit="layer")
    ]
    norms = [float(torch.linalg.norm(x)) for x in raw]
    red_cache: dict[tuple, float] = {}

    def redundancy(l: int, selected: list[int]) -> float:
        vals = []
        for j in selected:
            key = (min(l, j), max(l, j))
            if key not in red_cache:
                red_cache[key] = float(torch.linalg.norm(raw[l].T @ raw[j])) / (
                    norms[l] * norms[j] + 1e-8
                )
            vals.append(red_cache[key])
        return max(vals) if vals else 0.0

    t1 = time.perf_counter()
    generator = torch_generator(seed)

    def total(fit: float, l: int, red: float, tri: float) -> float:
        return score_total(fit, iso_pen[l], red, tri, alpha, gamma, eta)

    steps: list[StepTable] = []
    selected: list[int] = []
    scores: list[float] = []

    if task == "label_free":
        cands = list(range(n_layers))
        first = [total(0.0, l, 0.0, 0.0) for l in cands]
        best = min(cands, key=first.__getitem__)
        steps.append(
            _table(
                1, best, cands, [0.0] * n_layers, iso_pen, [0.0] * n_layers, [0.0] * n_layers, first
            )
        )
        selected, scores = [best], [first[best]]
        for t in progress(
            range(2, k + 1), show_progress, desc="LOES: greedy selection", total=k - 1, unit="layer"
        ):
            cands = [l for l in range(n_layers) if l not in selected]
            red = {l: redundancy(l, selected) for l in cands}
            totals = [total(0.0, l, red[l], 0.0) for l in cands]
            best = cands[min(range(len(cands)), key=totals.__getitem__)]
            steps.append(
                _table(
                    t,
                    best,
                    cands,
                    [0.0] * len(cands),
                    [iso_pen[l] for l in cands],
                    [red[l] for l in cands],
                    [0.0] * len(cands),
                    totals,
                    full=False,
                )
            )
            selected.append(best)
            scores.append(min(totals))
            log.info("step %d: layer %d (score %.6f)", t, best, scores[-1])
        return EngineOutput(
            selected,
            scores,
            steps,
            [],
            {"prepare": t1 - t0, "select": time.perf_counter() - t1},
            {"triplet_rng": "torch.Generator(random_state)"},
        )

    assert tgt is not None
    y = tgt.y.to(device=device, dtype=torch.float64)
    labels = None
    if task == "classification" and tgt.labels is not None and tgt.classes is not None:
        labels = tgt.labels.to(device)
        # The published code one-hot encodes integer labels with max(label)+1
        # columns (unused ids give all-zero columns, which count in the MSE).
        if all(isinstance(c, int) and c >= 0 for c in tgt.classes) and y.shape[1] == len(
            tgt.classes
        ):
            raw_ids = torch.tensor(tgt.classes, device=device)[labels]
            y = torch.nn.functional.one_hot(raw_ids, int(raw_ids.max()) + 1).to(torch.float64)

    # step 1: in-sample ridge loss + isotropy
    fits, preds = [], []
    for xc in progress(xcs, show_progress, desc="LOES: score layers", unit="layer"):
        mse, pred = _ridge_mse(xc, y, reg)
        fits.append(mse)
        preds.append(pred)
    first = [total(fits[l], l, 0.0, 0.0) for l in range(n_layers)]
    best = min(range(n_layers), key=first.__getitem__)
    cands = list(range(n_layers))
    zeros = [0.0] * n_layers
    steps.append(_table(1, best, cands, fits, iso_pen, zeros, zeros, first, full=False))
    selected, scores = [best], [first[best]]
    y_hat = preds[best]
    log.info("step 1: layer %d (score %.6f)", best, scores[0])

    for t in progress(
        range(2, k + 1), show_progress, desc="LOES: greedy selection", total=k - 1, unit="layer"
    ):
        residual = y - y_hat
        xs = torch.cat([xcs[j] for j in selected], dim=1)
        eye = torch.eye(xs.shape[1], dtype=xs.dtype, device=device)
        chol = torch.linalg.cholesky(xs.T @ xs + 1e-6 * eye)  # once per step, not per candidate
        cands = [l for l in range(n_layers) if l not in selected]
        rows = {name: [] for name in ("fit", "red", "tri", "total")}
        best_pred, best_total, best = None, float("inf"), -1
        for l in cands:
            b = torch.cholesky_solve(xs.T @ xcs[l], chol)
            x_tilde = xcs[l] - xs @ b
            mse, pred = _ridge_mse(x_tilde, residual, reg)
            red = redundancy(l, selected)
            tri = _triangle(x_tilde, labels, generator) if labels is not None else 0.0
            score = total(mse, l, red, tri)
            for name, v in (("fit", mse), ("red", red), ("tri", tri), ("total", score)):
                rows[name].append(v)
            if score < best_total:
                best_total, best, best_pred = score, l, pred
        steps.append(
            _table(
                t,
                best,
                cands,
                rows["fit"],
                [iso_pen[l] for l in cands],
                rows["red"],
                rows["tri"],
                rows["total"],
                full=False,
            )
        )
        selected.append(best)
        scores.append(best_total)
        y_hat = y_hat + best_pred
        log.info(
            "step %d: layer %d (score %.6f, residual mse %.6f)",
            t,
            best,
            best_total,
            float(((y - y_hat) ** 2).mean()),
        )
    return EngineOutput(
        selected,
        scores,
        steps,
        [],
        {"prepare": t1 - t0, "select": time.perf_counter() - t1},
        {"triplet_rng": "torch.Generator(random_state)"},
    )


def _table(step, best, cands, fit, iso, red, tri, total, full=True) -> StepTable:
    """Build a StepTable; ``full`` means the per-term lists are indexed by layer, not by candidate."""
    pick = (lambda v: [float(v[l]) for l in cands]) if full else (lambda v: [float(x) for x in v])
    return StepTable(
        step=step,
        selected=int(best),
        candidates=[int(c) for c in cands],
        terms={
            "fit": pick(fit),
            "isotropy": pick(iso),
            "redundancy": pick(red),
            "geometry": pick(tri),
            "total": pick(total),
        },
    )
