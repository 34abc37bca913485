"""``layers=``: only the requested hidden states, captured by hooks on the blocks with an early
stop, against the full-forward twin (every layer, then sliced) on every family the front end runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import LOESError, extract_embeddings  # noqa: E402
from loes.datasets import load_bbc_news, minilm_path  # noqa: E402
from loes.layers import resolve_layers  # noqa: E402

ATOL = 1e-5
H = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37)
AUDIO_KW = dict(
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    vocab_size=10,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    **H,
)
DEC = dict(vocab_size=30522, bos_token_id=101, eos_token_id=102)

FAMILIES = {
    # name: (config factory, modality)
    "bert": (lambda: transformers.BertConfig(num_hidden_layers=4, vocab_size=30522, **H), "text"),
    "roberta": (
        lambda: transformers.RobertaConfig(
            num_hidden_layers=4, vocab_size=30522, pad_token_id=0, max_position_embeddings=128, **H
        ),
        "text",
    ),
    "deberta-v2": (
        lambda: transformers.DebertaV2Config(
            num_hidden_layers=4, vocab_size=30522, pad_token_id=0, **H
        ),
        "text",
    ),
    "modernbert": (
        lambda: transformers.ModernBertConfig(
            num_hidden_layers=4,
            vocab_size=30522,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
            cls_token_id=101,
            sep_token_id=102,
            **H,
        ),
        "text",
    ),
    "mpnet": (
        lambda: transformers.MPNetConfig(
            num_hidden_layers=4, vocab_size=30522, pad_token_id=0, **H
        ),
        "text",
    ),
    "xlm-roberta": (
        lambda: transformers.XLMRobertaConfig(
            num_hidden_layers=4, vocab_size=30522, pad_token_id=0, max_position_embeddings=128, **H
        ),
        "text",
    ),
    "llama": (
        lambda: transformers.LlamaConfig(
            num_hidden_layers=4, num_key_value_heads=1, pad_token_id=None, **DEC, **H
        ),
        "text",
    ),
    "gpt2": (lambda: transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, **DEC), "text"),
    "qwen2": (
        lambda: transformers.Qwen2Config(num_hidden_layers=4, num_key_value_heads=1, **DEC, **H),
        "text",
    ),
    "gemma": (
        lambda: transformers.GemmaConfig(
            num_hidden_layers=4, num_key_value_heads=1, head_dim=16, pad_token_id=0, **DEC, **H
        ),
        "text",
    ),
    "t5": (
        lambda: transformers.T5Config(
            num_layers=4,
            num_decoder_layers=1,
            d_model=32,
            num_heads=2,
            d_ff=37,
            d_kv=16,
            vocab_size=30522,
            pad_token_id=0,
            decoder_start_token_id=0,
        ),
        "text",
    ),
    "vit": (
        lambda: transformers.ViTConfig(num_hidden_layers=4, image_size=32, patch_size=8, **H),
        "image",
    ),
    "deit": (
        lambda: transformers.DeiTConfig(num_hidden_layers=4, image_size=32, patch_size=8, **H),
        "image",
    ),
    "dinov2": (
        lambda: transformers.Dinov2Config(num_hidden_layers=4, image_size=32, patch_size=8, **H),
        "image",
    ),
    "beit": (
        lambda: transformers.BeitConfig(
            num_hidden_layers=4, image_size=32, patch_size=8, vocab_size=64, **H
        ),
        "image",
    ),
    "clip": (
        lambda: transformers.CLIPConfig(
            text_config=dict(num_hidden_layers=2, vocab_size=30522, **H),
            vision_config=dict(num_hidden_layers=4, image_size=32, patch_size=8, **H),
            projection_dim=16,
        ),
        "image",
    ),
    "convnext": (
        lambda: transformers.ConvNextConfig(
            num_stages=4, hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1], image_size=32
        ),
        "image",
    ),
    "wav2vec2": (lambda: transformers.Wav2Vec2Config(num_hidden_layers=4, **AUDIO_KW), "audio"),
    "hubert": (lambda: transformers.HubertConfig(num_hidden_layers=4, **AUDIO_KW), "audio"),
    "wavlm": (lambda: transformers.WavLMConfig(num_hidden_layers=4, **AUDIO_KW), "audio"),
    "ast": (
        lambda: transformers.ASTConfig(num_hidden_layers=4, max_length=64, num_mel_bins=32, **H),
        "audio",
    ),
    "whisper": (
        lambda: transformers.WhisperConfig(
            encoder_layers=4,
            decoder_layers=1,
            d_model=32,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            vocab_size=64,
            num_mel_bins=80,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        "audio",
    ),
}


def _build(config):
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


@pytest.fixture(scope="module")
def data():
    from PIL import Image

    ds = load_bbc_news(max_per_class=2, random_state=1)
    text = datasets.Dataset.from_dict({"text": list(ds["title"]), "label": list(ds["label"])})
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(7)]
    image = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 0, 1, 0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    clips = [
        (np.sin(np.arange(n) / (3 + i)) + 0.1 * g.normal(size=n)).astype(np.float32)
        for i, n in enumerate([1600, 4000, 2400, 3200, 1900, 3600, 2000])
    ]
    audio = datasets.Dataset.from_dict(
        {
            "audio": [{"array": a, "sampling_rate": 16000} for a in clips],
            "label": [0, 1, 0, 1, 0, 1, 0],
        }
    )
    return {"text": text, "image": image, "audio": audio}


def _processor(name):
    if name == "whisper":
        return transformers.WhisperFeatureExtractor(feature_size=80)
    if name == "ast":
        return transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=64)
    if FAMILIES[name][1] == "audio":
        return transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    if FAMILIES[name][1] == "image":
        return transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    if name in ("llama", "gpt2", "qwen2", "gemma"):
        tok.pad_token, tok.padding_side = None, "left"  # the harder case: eos padding on the left
    return tok


def _layer(emb, i):
    return emb.embeddings[:, i] if torch.is_tensor(emb.embeddings) else emb.embeddings[i]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_layer_subset_equals_the_full_forward_sliced(name, data):
    model = _build(FAMILIES[name][0]())
    ds, proc = data[FAMILIES[name][1]], _processor(name)
    for include in (False, True):
        full = extract_embeddings(
            model, ds, processor=proc, batch_size=3, include_embeddings=include, show_progress=False
        )
        assert full.info["capture"] == "full forward"
        for spec in ("middle", [0, -1], -2):
            sub = extract_embeddings(
                model,
                ds,
                processor=proc,
                batch_size=3,
                include_embeddings=include,
                layers=spec,
                show_progress=False,
            )
            idx = sorted(set(resolve_layers(spec, full.n_layers)))
            assert sub.info["capture"] == "hooks", (name, spec)
            assert sub.layer_names == [full.layer_names[i] for i in idx]
            assert sub.pooling == full.pooling
            np.testing.assert_array_equal(sub.indices, full.indices)
            for j, i in enumerate(idx):
                torch.testing.assert_close(_layer(sub, j), _layer(full, i), atol=ATOL, rtol=1e-5)


def test_early_stop_runs_exactly_the_blocks_up_to_the_deepest(data):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=32, num_key_value_heads=1, pad_token_id=None, **DEC, **H
    )
    model = _build(cfg)
    calls = [0] * 32
    for b, block in enumerate(model.layers):
        block.register_forward_hook(lambda m, a, o, b=b: calls.__setitem__(b, calls[b] + 1))
    ds = data["text"]
    emb = extract_embeddings(
        model,
        ds,
        processor=_processor("llama"),
        batch_size=4,
        layers=[3, 7, 12],
        show_progress=False,
    )
    assert emb.layer_names == ["hidden_states[4]", "hidden_states[8]", "hidden_states[13]"]
    n_batches = -(-len(ds) // 4)
    # one row of the first batch is run through every block to check the hooks; then 13 blocks per batch
    assert calls == [n_batches + 1] * 13 + [1] * 19
    assert emb.info["capture"] == "hooks"


def test_layers_spec_errors_before_loading(data, tmp_path):
    model = _build(FAMILIES["bert"][0]())
    with pytest.raises(LOESError, match="needs the features of every layer"):
        extract_embeddings(model, data["text"], processor=_processor("bert"), layers="loes")
    with pytest.raises(LOESError, match="out of range"):
        extract_embeddings(model, data["text"], processor=_processor("bert"), layers=[1, 9])
    with pytest.raises(LOESError, match="unknown layer spec"):
        extract_embeddings(model, data["text"], processor=_processor("bert"), layers="deepest")


def test_cache_key_holds_the_layer_set(data, tmp_path):
    model = _build(FAMILIES["bert"][0]())
    kw = dict(processor=_processor("bert"), cache_dir=tmp_path, show_progress=False)
    a = extract_embeddings(model, data["text"], layers=[1], **kw)
    b = extract_embeddings(model, data["text"], layers=[2], **kw)
    c = extract_embeddings(model, data["text"], layers=[1], **kw)
    assert (a.from_cache, b.from_cache, c.from_cache) == (False, False, True)
    assert b.layer_names == ["hidden_states[3]"] and c.layer_names == ["hidden_states[2]"]
    assert not torch.allclose(a.embeddings, b.embeddings)
    torch.testing.assert_close(a.embeddings, c.embeddings)


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "convnext"])
def test_pool_batch_equals_extract_embeddings(name, data):
    from loes.hf.extract import pool_batch

    model = _build(FAMILIES[name][0]())
    ds, proc = data[FAMILIES[name][1]], _processor(name)
    if FAMILIES[name][1] == "text" and proc.pad_token is None:
        proc.pad_token = proc.sep_token  # left padding with a pad token of its own
    emb = extract_embeddings(
        model, ds, processor=proc, layers=[0, -1], max_samples=None, show_progress=False
    )
    if FAMILIES[name][1] == "text":
        inputs = proc(list(ds["text"]), padding=True, truncation=True, return_tensors="pt")
    else:
        inputs = proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")
    got = pool_batch(model, dict(inputs), layers=[0, -1])
    want = emb.embeddings
    if torch.is_tensor(got):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    else:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5)
    model.train()
    with pytest.raises(LOESError, match="training mode"):
        pool_batch(model, dict(inputs))


def test_iter_hidden_states_keeps_only_the_requested_token_states(data):
    from loes.hf import iter_hidden_states

    model = _build(FAMILIES["gpt2"][0]())
    kw = dict(processor=_processor("gpt2"), batch_size=4, show_progress=False)
    full = list(
        (b.hidden_states, b.mask, b.layer_names)
        for b in iter_hidden_states(model, data["text"], **kw)
    )
    sub = list(
        (b.hidden_states, b.mask, b.layer_names)
        for b in iter_hidden_states(model, data["text"], layers=[1, -1], **kw)
    )
    for (hf, mf, nf), (hs, ms, ns) in zip(full, sub):
        assert ns == [nf[1], nf[-1]] and len(hs) == 2
        torch.testing.assert_close(ms, mf)
        torch.testing.assert_close(hs[0], hf[1], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(hs[1], hf[-1], atol=ATOL, rtol=1e-5)
