"""Each metric against a slow textbook twin and on cases with known answers."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loes import LOESError
from loes._linalg import linear_cka
from loes.metrics import (
    cka_matrix,
    curvature,
    dataset_entropy,
    dime,
    effective_rank,
    infonce,
    lidar,
    matrix_entropy,
    prompt_entropy,
    rankme,
    twonn_dimension,
)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------ twins
def slow_entropy(z, alpha):
    """Textbook matrix-based Rényi entropy of Z Zᵀ / tr, divided by log min(n, D)."""
    k = z @ z.T
    lam = np.linalg.eigvalsh(k / np.trace(k))
    lam = lam[lam > lam.max() * len(lam) * np.finfo(float).eps]  # drop numerical zeros
    if alpha == 1:
        h = -np.sum(lam * np.log(lam))
    else:
        h = np.log(np.sum(lam**alpha)) / (1 - alpha)
    return h / np.log(min(z.shape))


def slow_curvature(z):
    angles = []
    for k in range(len(z) - 2):
        a, b = z[k + 1] - z[k], z[k + 2] - z[k + 1]
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        angles.append(math.acos(max(-1.0, min(1.0, cos))))
    return np.mean(angles)


def random_masks(rng, b, t):
    """Half left-padded, half right-padded, lengths 3..t."""
    mask = np.zeros((b, t), dtype=bool)
    for i in range(b):
        n = rng.integers(3, t + 1)
        if i % 2:
            mask[i, :n] = True
        else:
            mask[i, t - n :] = True
    return mask


# ---------------------------------------------------------------- entropy
@pytest.mark.parametrize("alpha", [0.5, 1, 2, 3.5])
@pytest.mark.parametrize("dim", [5, 24])  # tokens > dim and tokens < dim
def test_prompt_entropy_matches_twin(rng, alpha, dim):
    tokens = rng.normal(size=(6, 12, dim)) + rng.normal(size=(6, 1, dim))
    mask = random_masks(rng, 6, 12)
    fast = prompt_entropy(tokens, mask, alpha=alpha, reduction="none").numpy()
    slow = [slow_entropy(tokens[i][mask[i]], alpha) for i in range(6)]
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-10)
    assert prompt_entropy(tokens, mask, alpha=alpha) == pytest.approx(np.mean(slow), rel=1e-9)


@pytest.mark.parametrize("alpha", [0.5, 1, 2])
def test_isotropic_gaussian_has_maximal_dataset_entropy(rng, alpha):
    iso = dataset_entropy(rng.normal(size=(5000, 10)), alpha=alpha)
    assert iso > 0.995
    for _ in range(5):
        scales = np.exp(rng.normal(size=10))
        aniso = dataset_entropy(rng.normal(size=(5000, 10)) * scales, alpha=alpha)
        assert aniso < iso
    # a rank-3 data set reaches at most log 3 / log 10
    low = rng.normal(size=(5000, 3)) @ rng.normal(size=(3, 10))
    assert dataset_entropy(low, alpha=alpha) <= math.log(3) / math.log(10) + 1e-9


def test_entropy_equal_eigenvalues_is_one_and_scale_free(rng):
    assert matrix_entropy(np.eye(7), alpha=2) == pytest.approx(1.0, abs=1e-12)
    x = rng.normal(size=(50, 8))
    assert dataset_entropy(x * 1e3) == pytest.approx(dataset_entropy(x), rel=1e-10)
    # a single token or an all-zero prompt has no entropy: NaN per prompt, skipped in the mean
    tokens = rng.normal(size=(2, 4, 3))
    tokens[1] = 0
    per = prompt_entropy(tokens, reduction="none")
    assert math.isnan(per[1]) and not math.isnan(per[0])
    assert prompt_entropy(tokens) == pytest.approx(float(per[0]))


def test_dataset_entropy_center_removes_shared_offset(rng):
    x = rng.normal(size=(500, 6)) + 50.0
    assert dataset_entropy(x) < 0.3
    assert dataset_entropy(x, center=True) > 0.99


# ----------------------------------------------------------- effective rank
@pytest.mark.parametrize("r", [1, 3, 7])
def test_rank_r_matrix_has_effective_rank_r(rng, r):
    u, _ = np.linalg.qr(rng.normal(size=(60, r)))
    v, _ = np.linalg.qr(rng.normal(size=(20, r)))
    x = 4.0 * u @ v.T
    assert effective_rank(x) == pytest.approx(r, rel=1e-9)
    assert rankme(x) == pytest.approx(r, rel=1e-4)


def test_effective_rank_matches_twin(rng):
    x = rng.normal(size=(40, 12)) * np.exp(rng.normal(size=12))
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)
    q = p + 1e-7
    assert rankme(x) == pytest.approx(np.exp(-np.sum(q * np.log(q))), rel=1e-10)
    xc = x - x.mean(0)
    s = np.linalg.svd(xc, compute_uv=False)
    p = s / s.sum()
    assert effective_rank(x, center=True) == pytest.approx(
        np.exp(-np.sum(p * np.log(p))), rel=1e-10
    )


# --------------------------------------------------------------- curvature
def test_straight_token_path_has_zero_curvature(rng):
    start, direction = rng.normal(size=8), rng.normal(size=8)
    steps = np.cumsum(rng.uniform(0.5, 2.0, size=10))  # uneven step lengths
    line = start + steps[:, None] * direction
    batch = np.stack([line, line])
    mask = np.ones((2, 10), dtype=bool)
    mask[1, :4] = False  # left padding, garbage in padded slots
    batch[1, :4] = rng.normal(size=(4, 8)) * 100
    assert curvature(batch, mask) == pytest.approx(0.0, abs=1e-7)


def test_curvature_known_angles():
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], dtype=float)
    assert curvature(square) == pytest.approx(math.pi / 2)
    # a reversal is a turn of pi; |cos| would call it straight
    back = np.array([[0, 0], [1, 0], [0, 0], [1, 0]], dtype=float)
    assert curvature(back) == pytest.approx(math.pi)
    assert curvature(back, degrees=True) == pytest.approx(180.0)


def test_curvature_matches_twin(rng):
    tokens = rng.normal(size=(7, 9, 6))
    mask = random_masks(rng, 7, 9)
    fast = curvature(tokens, mask, reduction="none").numpy()
    slow = [slow_curvature(tokens[i][mask[i]]) for i in range(7)]
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- TwoNN
def torus(rng, n, d, ambient):
    """A flat d-torus (no boundary) isometrically embedded in R^ambient."""
    theta = rng.uniform(0, 2 * np.pi, size=(n, d))
    flat = np.concatenate([np.cos(theta), np.sin(theta)], 1)
    q, _ = np.linalg.qr(rng.normal(size=(ambient, 2 * d)))
    return flat @ q.T


@pytest.mark.parametrize("d", [1, 2, 4])
@pytest.mark.parametrize("method", ["fit", "mle"])
def test_twonn_recovers_planted_dimension(rng, d, method):
    x = torus(rng, 2500, d, ambient=30)
    assert twonn_dimension(x, method=method) == pytest.approx(d, rel=0.12)


def test_twonn_matches_brute_force_and_chunking(rng):
    x = rng.normal(size=(300, 5))
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    two = np.sort(dist, axis=1)[:, :2]
    mu = np.sort(two[:, 1] / two[:, 0])
    assert twonn_dimension(x, method="mle") == pytest.approx(
        (len(mu) - 1) / np.log(mu).sum(), rel=1e-9
    )
    keep = int(np.floor(len(mu) * 0.9))
    xs = np.log(mu[:keep])
    ys = -np.log(1 - np.arange(1, len(mu) + 1)[:keep] / len(mu))
    assert twonn_dimension(x) == pytest.approx((xs * ys).sum() / (xs * xs).sum(), rel=1e-9)
    assert twonn_dimension(x, chunk_size=7) == pytest.approx(twonn_dimension(x), rel=1e-12)


def test_twonn_rejects_all_duplicates():
    with pytest.raises(LOESError, match="distinct neighbours"):
        twonn_dimension(np.ones((10, 3)))


# --------------------------------------------------------------------- CKA
@pytest.mark.parametrize("method", ["gram", "feature", "auto"])
@pytest.mark.parametrize("n", [15, 120])
def test_cka_matrix_matches_pairwise_linear_cka(rng, method, n):
    layers = [rng.normal(size=(n, d)) for d in (10, 30, 20)]
    layers.append(layers[0] @ rng.normal(size=(10, 10)) + 0.1 * rng.normal(size=(n, 10)))
    layers.append(np.full((n, 4), 2.0))  # constant layer: CKA 0 with everything
    fast = cka_matrix(layers, method=method).numpy()
    slow = np.array([[linear_cka(a, b) for b in layers] for a in layers])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
    assert fast[4].max() == 0.0


def test_cka_matrix_from_stacked_embeddings(rng):
    x = rng.normal(size=(40, 3, 8))
    m = cka_matrix(x).numpy()
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=1e-12)
    np.testing.assert_allclose(m, m.T, rtol=1e-12)


# ---------------------------------------------------------------- InfoNCE
def slow_infonce(a, b, tau):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(a)
    ab = ba = 0.0
    for i in range(n):
        row = np.array([a[i] @ b[j] for j in range(n)]) / tau
        col = np.array([a[j] @ b[i] for j in range(n)]) / tau
        ab += -row[i] + np.log(np.exp(row).sum())
        ba += -col[i] + np.log(np.exp(col).sum())
    return ab / n, 0.5 * (ab + ba) / n


def test_infonce_matches_twin(rng):
    a, b = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    one_way, sym = slow_infonce(a, b, 0.2)
    assert infonce(a, b, 0.2) == pytest.approx(sym, rel=1e-10)
    assert infonce(a, b, 0.2, symmetric=False) == pytest.approx(one_way, rel=1e-10)


def test_infonce_known_answers(rng):
    a = rng.normal(size=(300, 64))
    unrelated = infonce(a, rng.normal(size=(300, 64)), temperature=1.0)
    assert unrelated == pytest.approx(math.log(300), abs=0.05)
    noisy = infonce(a, a + 0.3 * rng.normal(size=a.shape), temperature=0.1)
    assert noisy < 0.5 < math.log(300)
    with pytest.raises(LOESError, match="temperature"):
        infonce(a, a, temperature=0)


# ------------------------------------------------------------------ LiDAR
def slow_lidar(views, delta=1e-4, eps=1e-8):
    e = np.stack(views, 1)
    n, q, d = e.shape
    mu_i = e.mean(1)
    mu = mu_i.mean(0)
    sb = sum(np.outer(m - mu, m - mu) for m in mu_i) / (n - 1)
    sw = sum(np.outer(e[i, j] - mu_i[i], e[i, j] - mu_i[i]) for i in range(n) for j in range(q)) / (
        n * (q - 1)
    )
    sw = sw + delta * np.trace(sw) / d * np.eye(d)
    lam = np.clip(scipy.linalg.eigh(sb, sw, eigvals_only=True), 0, None)
    p = lam / lam.sum() + eps
    return np.exp(-np.sum(p * np.log(p)))


def test_lidar_matches_generalised_eigenproblem(rng):
    base = rng.normal(size=(40, 7))
    views = [base + 0.5 * rng.normal(size=base.shape) * np.arange(1, 8) for _ in range(3)]
    assert lidar(views) == pytest.approx(slow_lidar(views), rel=1e-7)
    assert lidar(np.stack(views)) == pytest.approx(slow_lidar(views), rel=1e-7)


@pytest.mark.parametrize("r", [2, 5])
def test_lidar_counts_directions_that_survive_augmentation(rng, r):
    q, _ = np.linalg.qr(rng.normal(size=(24, r)))
    base = rng.normal(size=(400, r)) @ q.T
    views = [base + 0.02 * rng.normal(size=base.shape) for _ in range(4)]
    assert lidar(views) == pytest.approx(r, rel=0.05)
    assert lidar([7.0 * v for v in views]) == pytest.approx(lidar(views), rel=1e-8)


# ------------------------------------------------------------------- DiME
def slow_dime(a, b, n_perm, seed, alpha=1.0):
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ka, kb = unit(a) @ unit(a).T, unit(b) @ unit(b).T

    def joint(kb_):
        k = ka * kb_
        lam = np.linalg.eigvalsh(k / np.trace(k))
        lam = lam[lam > lam.max() * len(lam) * np.finfo(float).eps]
        if alpha == 1:
            return -np.sum(lam * np.log(lam))
        return np.log(np.sum(lam**alpha)) / (1 - alpha)

    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(len(a), generator=g).numpy() for _ in range(n_perm)]
    return np.mean([joint(kb[p][:, p]) for p in perms]) - joint(kb)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_dime_matches_twin(rng, alpha):
    a = rng.normal(size=(50, 3))
    b = a + 0.3 * rng.normal(size=(50, 3))
    fast = dime(a, b, alpha=alpha, n_permutations=4, random_state=7)
    assert fast == pytest.approx(slow_dime(a, b, 4, 7, alpha), rel=1e-9)


def test_dime_known_answers(rng):
    a = rng.normal(size=(300, 3))
    independent = dime(a, rng.normal(size=(300, 3)))
    dependent = dime(a, a + 0.1 * rng.normal(size=(300, 3)))
    assert abs(independent) < 0.05
    assert dependent > 0.3
    # N > D: permuting samples (not features) keeps identical views maximally dependent
    assert dime(a, a) >= dependent
    assert dime(a, a, random_state=3) == pytest.approx(dime(a, a, random_state=3))
    with pytest.raises(LOESError, match="random_state must be None, an int seed"):
        dime(a, a, random_state="3")
    g = torch.Generator().manual_seed(3)  # a torch.Generator is used as it is
    assert dime(a, a, random_state=g) == pytest.approx(dime(a, a, random_state=3))


def test_view_metrics_check_shapes(rng):
    with pytest.raises(LOESError, match="same shape"):
        lidar([rng.normal(size=(10, 3)), rng.normal(size=(9, 3))])
    with pytest.raises(LOESError, match="at least 2 views"):
        lidar([rng.normal(size=(10, 3))])


# -------------------------------------------------------------- invariances
def test_rotation_and_sample_order_invariance(rng):
    x = rng.normal(size=(200, 6)) * np.arange(1, 7)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    perm = rng.permutation(200)
    for fn in (dataset_entropy, effective_rank, twonn_dimension):
        assert fn(x @ q) == pytest.approx(fn(x), rel=1e-8)
        assert fn(x[perm]) == pytest.approx(fn(x), rel=1e-8)
    views = [x + 0.3 * rng.normal(size=x.shape) for _ in range(3)]
    assert lidar([v @ q for v in views]) == pytest.approx(lidar(views), rel=1e-6)
    assert infonce(views[0] @ q, views[1] @ q) == pytest.approx(
        infonce(views[0], views[1]), rel=1e-10
    )
    tokens = rng.normal(size=(3, 8, 6))
    assert curvature(tokens @ q) == pytest.approx(curvature(tokens), rel=1e-10)
    assert prompt_entropy(tokens @ q) == pytest.approx(prompt_entropy(tokens), rel=1e-10)


def test_low_precision_input_is_upcast(rng):
    x = rng.normal(size=(300, 8)).astype(np.float32)
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(x).to(dtype)
        ref = t.double()
        assert dataset_entropy(t) == pytest.approx(dataset_entropy(ref), rel=1e-12)
        assert effective_rank(t) == pytest.approx(effective_rank(ref), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 4),
    t=st.integers(1, 9),
    d=st.integers(1, 7),
    alpha=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_token_metrics_stay_in_range(b, t, d, alpha, seed):
    g = np.random.default_rng(seed)
    tokens = g.normal(size=(b, t, d))
    mask = g.random((b, t)) < 0.8
    mask[:, 0] = True
    mask = np.maximum.accumulate(mask[:, ::-1], axis=1)[:, ::-1]  # contiguous, right padded
    pe = prompt_entropy(tokens, mask, alpha=alpha, reduction="none").numpy()
    cu = curvature(tokens, mask, reduction="none").numpy()
    ok = ~np.isnan(pe)
    assert np.all((pe[ok] >= -1e-12) & (pe[ok] <= 1 + 1e-9))
    assert np.all(np.isnan(pe) == (np.minimum(mask.sum(1), d) < 2))
    okc = ~np.isnan(cu)
    assert np.all((cu[okc] >= 0) & (cu[okc] <= np.pi + 1e-12))
