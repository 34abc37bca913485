"""``loes profile`` and profiling a real packaged model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from loes.cli import main
from loes.metrics import curvature, isotropy, profile, prompt_entropy


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 4, 10))
    x[:, 1, 5:] = 0
    paths = {"npy": tmp_path / "emb.npy", "pt": tmp_path / "emb.pt"}
    np.save(paths["npy"], x)
    torch.save({"embeddings": torch.from_numpy(x)}, paths["pt"])
    views = []
    for i in range(2):
        p = tmp_path / f"view{i}.npy"
        np.save(p, x + 0.2 * rng.normal(size=x.shape))
        views.append(str(p))
    return x, paths, views


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_profile_json_matches_library(saved, capsys, fmt):
    x, paths, views = saved
    assert main(["profile", str(paths[fmt]), "--view-files", *views, "--json", "--alpha", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = profile(x, views=[np.load(v) for v in views], alpha=2.0, show_progress=False)
    for name, values in ref.values.items():
        np.testing.assert_allclose(out["values"][name], values, rtol=1e-10)
        assert out["best_layers"][name] == ref.best_layer(name)
        assert out["directions"][name] == ref.directions[name]
    assert out["best_layers"]["effective_rank"] != 1  # the half-dead layer


def test_profile_table_and_png(saved, capsys, tmp_path):
    _, paths, _ = saved
    png = tmp_path / "profile.png"
    assert (
        main(
            [
                "profile",
                str(paths["npy"]),
                "--metrics",
                "isotropy,twonn",
                "--plot",
                str(png),
                "--progress",
                "off",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "isotropy" in text and "twonn" in text and "dataset_entropy" not in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_profile_cli_errors(saved, capsys):
    _, paths, _ = saved
    for argv, message in (
        (["profile"], "either an embeddings file"),
        (["profile", __file__], "unsupported file type '.py'"),
        (["profile", str(paths["npy"]), "--metrics", "vibes"], "unknown metric 'vibes'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("loes profile: error: ")
            and message in err
            and len(err.splitlines()) == 1
        )


def test_metrics_import_stays_light():
    code = (
        "import sys, loes, loes.metrics, loes.layers, loes.sweep, loes.augment; "
        "print([m for m in ('transformers', 'datasets', 'matplotlib', 'sklearn') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_profile_model_matches_direct_forward_on_minilm():
    transformers = pytest.importorskip("transformers")
    from loes.datasets import load_drugreview, minilm_path
    from loes.hf.profile import profile_model

    texts = list(load_drugreview("test")["text"][:12])
    ds = __import__("datasets").Dataset.from_dict({"text": texts})
    prof = profile_model(
        minilm_path(),
        ds,
        max_samples=None,
        batch_size=5,
        max_length=64,
        show_progress=False,
        metrics=["prompt_entropy", "curvature", "isotropy"],
    )
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    pooled, pe, cu = [], [], []
    with torch.inference_mode():
        for t in texts:  # one text at a time: no padding at all
            enc = tok(t, return_tensors="pt", truncation=True, max_length=64)
            states = model(**enc, output_hidden_states=True).hidden_states[1:]
            pooled.append(torch.stack([s[0].mean(0) for s in states]))
            pe.append([prompt_entropy(s) for s in states])
            cu.append([curvature(s) for s in states])
    pooled = torch.stack(pooled)
    np.testing.assert_allclose(prof.values["prompt_entropy"], np.mean(pe, 0), rtol=1e-4)
    np.testing.assert_allclose(prof.values["curvature"], np.mean(cu, 0), rtol=1e-4)
    np.testing.assert_allclose(
        prof.values["isotropy"], [isotropy(pooled[:, i]) for i in range(6)], rtol=1e-3
    )
    assert prof.layer_names[0] == "hidden_states[1]"
