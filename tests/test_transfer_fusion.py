"""Fusion head, its training loop, GeoReg and fine-tuning."""

import itertools
import warnings

import numpy as np
import pytest
import torch

from loes import LOESError
from loes.transfer import (
    FUSIONS,
    FusionHead,
    FusionProbe,
    GeoReg,
    eigenvalue_variance,
    triangle_log_area,
)


def _planted(n=500, n_layers=4, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, n_layers, dim)).astype(np.float32)
    x[:, 1, :3] += 2.0 * np.eye(3)[y]
    return x, y


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_head_combines_branches(fusion):
    head = FusionHead([8, 8, 12], n_outputs=3, hidden=5, fusion=fusion)
    xs = [
        torch.randn(7, d, generator=torch.Generator().manual_seed(i))
        for i, d in enumerate([8, 8, 12])
    ]
    feats = head.features(xs)
    assert feats.shape == (7, 15 if fusion == "concat" else 5)
    parts = [b(x) for b, x in zip(head.branches, xs)]
    if fusion == "sum":
        expected = parts[0] + parts[1] + parts[2]
    elif fusion == "mean":
        expected = (parts[0] + parts[1] + parts[2]) / 3
    elif fusion == "weighted":
        w = head.layer_weights()
        assert float(w.detach().sum()) == pytest.approx(1.0)
        expected = w[0] * parts[0] + w[1] * parts[1] + w[2] * parts[2]
    else:
        expected = torch.cat(parts, 1)
    torch.testing.assert_close(feats, head.norm(expected))


def test_fusion_head_rejects_bad_settings():
    with pytest.raises(LOESError, match="fusion must be one of"):
        FusionHead([4], 2, fusion="max")
    with pytest.raises(LOESError, match="equal width"):
        FusionHead([4, 5], 2, hidden=None, fusion="weighted")


@pytest.mark.parametrize("georeg", [None, 0.1])
def test_fusion_probe_loss_falls_and_learns(georeg):
    x, y = _planted()
    probe = FusionProbe(layers=[1, 2], epochs=15, georeg=georeg, random_state=0)
    probe.fit(x[:300], y[:300], x[300:400], y[300:400])
    losses = [h["train_loss"] for h in probe.history_]
    assert losses[-1] < 0.5 * losses[0]
    # the planted rule's Bayes accuracy is about 0.83 (a logistic probe gets 0.83)
    assert probe.score(x[400:], y[400:]) > 0.75
    if georeg:
        assert all(h["reg_loss"] != 0.0 for h in probe.history_)


def test_learnable_layer_weights_favour_informative_layer():
    x, y = _planted()
    probe = FusionProbe(layers=None, hidden=None, fusion="weighted", epochs=40, lr=1e-2)
    probe.fit(x[:300], y[:300], x[300:400], y[300:400])
    w = probe.head_.layer_weights().detach()
    assert int(w.argmax()) == 1
    assert probe.score(x[400:], y[400:]) > 0.75


def test_fusion_probe_regression():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 3, 8)).astype(np.float32)
    y = 3.0 * x[:, 2, 0] - x[:, 2, 1] + 10.0
    probe = FusionProbe(layers=[2], task="regression", epochs=40).fit(
        x[:250], y[:250], x[250:320], y[250:320]
    )
    # per-sample LayerNorm of the input bends a linear rule; still far below the target's spread
    pred = probe.predict(x[320:])
    assert np.sqrt(np.mean((pred - y[320:]) ** 2)) < 0.4 * y.std()
    # score() is R² (higher is better; it was the RMSE), as scikit-learn computes it
    r2 = 1 - np.sum((y[320:] - pred) ** 2) / np.sum((y[320:] - y[320:].mean()) ** 2)
    assert probe.score(x[320:], y[320:]) == pytest.approx(r2, rel=1e-5)
    assert probe.score(x[320:], y[320:]) > 0.8
    assert probe.best_val_score_ == max(h["val_score"] for h in probe.history_)


def test_fusion_probe_deterministic_and_leaves_global_rng():
    x, y = _planted(n=200)
    state = torch.get_rng_state()
    a = FusionProbe(layers=[1], epochs=3, random_state=5).fit(x, y)
    b = FusionProbe(layers=[1], epochs=3, random_state=5).fit(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a.decision_function(x), b.decision_function(x), rtol=0, atol=0)


# ------------------------------------------------------------------ GeoReg
@pytest.mark.parametrize("shape", [(20, 5), (6, 9)])
def test_eigenvalue_variance_matches_eigendecomposition(shape):
    f = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = np.cov(f.numpy(), rowvar=False) + 1e-4 * np.eye(shape[1])
    expected = np.var(np.linalg.eigvalsh(cov))
    assert float(eigenvalue_variance(f, 1e-4)) == pytest.approx(expected, rel=1e-9)


def test_triangle_area_matches_heron():
    f = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(30) % 3
    c = [f[labels == i].mean(0).numpy() for i in range(3)]
    a, b, d = (
        np.linalg.norm(c[0] - c[1]),
        np.linalg.norm(c[0] - c[2]),
        np.linalg.norm(c[1] - c[2]),
    )
    s = (a + b + d) / 2
    heron = np.sqrt(s * (s - a) * (s - b) * (s - d))
    got = float(triangle_log_area(f, labels, torch.tensor([0, 1, 2]), eps=0.0))
    assert got == pytest.approx(np.log(heron), rel=1e-9)


def test_georeg_gradients_are_correct():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(12, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.arange(12) % 4
    reg = GeoReg(weight=0.3, triplets="all")
    assert torch.autograd.gradcheck(lambda z: reg(z, labels), (f,), eps=1e-6, atol=1e-6)
    f2 = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)  # batch < dim
    assert torch.autograd.gradcheck(lambda z: eigenvalue_variance(z), (f2,), eps=1e-6, atol=1e-6)


def test_georeg_skips_triangle_with_fewer_than_three_classes():
    f = torch.randn(
        16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True
    )
    reg = GeoReg(weight=0.5)
    two = torch.arange(16) % 2
    loss2 = reg(f, two)
    assert reg.last_terms["triangles"] == 0
    torch.testing.assert_close(loss2, 0.5 * eigenvalue_variance(f))
    torch.testing.assert_close(reg(f, None), loss2)
    three = torch.arange(16) % 3
    loss3 = reg(f, three)
    assert reg.last_terms["triangles"] == 1
    assert not torch.allclose(loss3, loss2)
    # a batch with 3 labels of which one is ignore-index (-100) still skips
    ignored = two.clone()
    ignored[0] = -100
    reg(f, ignored)
    assert reg.last_terms["triangles"] == 0


def test_georeg_all_triplets_is_mean_over_triples():
    f = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(40) % 4
    reg = GeoReg(weight=1.0, spread_weight=0.0, triplets="all")
    expected = -np.mean(
        [
            float(triangle_log_area(f, labels, torch.tensor(t)))
            for t in itertools.combinations(range(4), 3)
        ]
    )
    assert float(reg(f, labels)) == pytest.approx(expected, rel=1e-12)


def test_georeg_loss_falls_when_minimised():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 10, generator=g)
    labels = torch.arange(64) % 4
    lin = torch.nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(0.1 * torch.randn(6, 10, generator=g))
    reg = GeoReg(weight=0.1, random_state=0)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = reg(lin(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05


# -------------------------------------------------------------- fine-tuning
FILLERS = ["the", "a", "drug", "day", "night", "pain", "it", "was", "after", "week"]


def _tiny_bert():
    """A 2-block random BERT and a word-level tokenizer over FILLERS + two keywords."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *FILLERS, "excellent", "terrible"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]"
    )
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertModel(cfg)
    return model, tok


def _keyword_texts(n=96, seed=0):
    """Texts whose label is which keyword they contain."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        lab = i % 2
        words = list(rng.choice(FILLERS, 5)) + (["excellent"] if lab else ["terrible"])
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(lab)
    return texts, labels


def test_finetune_tiny_bert_learns_keyword_rule():
    from loes import LOESWarning
    from loes.transfer import finetune

    model, tok = _tiny_bert()
    texts, labels = _keyword_texts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LOESWarning)  # a head that learns does not warn
        ft = finetune(
            model,
            texts[:64],
            labels[:64],
            [0, 1],
            val_texts=texts[64:80],
            val_targets=labels[64:80],
            tokenizer=tok,
            epochs=6,
            lr=1e-3,
            head_lr=3e-3,
            hidden=16,
            batch_size=16,
            georeg=0.1,
            show_progress=False,
        )
    losses = [h["train_loss"] for h in ft.history_]
    assert losses[-1] < losses[0]
    assert ft.score(texts[80:], labels[80:]) >= 0.9
    assert ft.best_val_score_ > ft.baseline_val_score_ == 0.5


def test_finetune_warns_when_it_does_not_beat_the_majority_class():
    from loes import LOESWarning
    from loes.transfer import finetune

    model, tok = _tiny_bert()
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(FILLERS, 6)) for _ in range(64)]  # no keyword: nothing to learn
    labels = (rng.random(64) < 0.25).astype(int).tolist()
    with pytest.warns(LOESWarning, match=r"finetune\(layers=\[1\].*does not beat a constant"):
        ft = finetune(
            model,
            texts[:40],
            labels[:40],
            [1],
            val_texts=texts[40:],
            val_targets=labels[40:],
            tokenizer=tok,
            epochs=2,
            hidden=8,
            batch_size=16,
            show_progress=False,
        )
    assert ft.baseline_val_score_ == pytest.approx(np.mean(np.array(labels[40:]) == 0))


# ------------------------------------------------- heads tell the truth
def _random_labels(n=300, seed=0):
    """Features unrelated to imbalanced labels (75 % majority): nothing to learn."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2, 16)).astype(np.float32)
    y = (rng.random(n) < 0.25).astype(int)
    return x, y


def test_untrainable_head_warns_that_it_does_not_beat_the_majority_class():
    from loes import LOESWarning

    x, y = _random_labels()
    probe = FusionProbe(layers=[0, 1], epochs=20, random_state=0)
    with pytest.warns(
        LOESWarning, match=r"FusionProbe\(layers=\[0, 1\].*does not beat a constant predictor"
    ) as rec:
        probe.fit(x[:200], y[:200], x[200:], y[200:])
    majority = max(float(np.mean(y[200:] == c)) for c in (0, 1))
    assert probe.baseline_val_score_ == pytest.approx(majority)
    lead = probe.best_val_score_ - majority
    assert (
        f"vs {majority:.4f} for always predicting the majority class, a lead of {lead:+.4f}, "
        "within two standard errors" in str(rec[0].message)
    )
    assert rec[0].filename == __file__  # points at the caller's line


def test_untrainable_regression_head_warns_against_the_training_mean():
    from loes import LOESWarning

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 1, 8)).astype(np.float32)
    y = rng.normal(size=200) + 5.0
    with pytest.warns(LOESWarning, match=r"always predicting the mean \(R² 0\)"):
        FusionProbe(task="regression", epochs=10, random_state=0).fit(
            x[:150], y[:150], x[150:], y[150:]
        )


@pytest.mark.parametrize("georeg", [None, 0.1])
def test_learnable_head_does_not_warn(georeg):
    import warnings

    from loes import LOESWarning

    x, y = _planted()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LOESWarning)
        probe = FusionProbe(layers=[1, 2], epochs=15, georeg=georeg, random_state=0)
        probe.fit(x[:300], y[:300], x[300:400], y[300:400])
    assert probe.best_val_score_ > probe.baseline_val_score_ + 0.2


def test_early_stopping_stops_when_validation_stalls_and_restores_the_best_epoch():
    import warnings

    x, y = _random_labels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = FusionProbe(layers=[0, 1], epochs=60, patience=3, random_state=0)
        probe.fit(x[:200], y[:200], x[200:], y[200:])
        full = FusionProbe(layers=[0, 1], epochs=8, patience=None, random_state=0)
        full.fit(x[:200], y[:200], x[200:], y[200:])
    scores = [h["val_score"] for h in probe.history_]
    assert probe.stopped_early_ and len(scores) < 60
    assert probe.best_epoch_ == int(np.argmax(scores))  # the first best epoch
    assert len(scores) == probe.best_epoch_ + 3 + 1  # three epochs without improvement, then stop
    assert probe.score(x[200:], y[200:]) == pytest.approx(
        probe.best_val_score_
    )  # best weights restored
    assert len(full.history_) == 8 and not full.stopped_early_


@pytest.mark.parametrize("patience", [0, -1, 2.5, True])
def test_bad_patience_is_refused_before_training(patience):
    x, y = _random_labels(n=40)
    with pytest.raises(LOESError, match="patience must be a positive integer"):
        FusionProbe(patience=patience).fit(x, y)
