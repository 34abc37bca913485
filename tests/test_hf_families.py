"""Every model family through the public functions, on tiny random models built
from their configs, against a slow twin: one sample at a time, unpadded, pooled by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import LOESError, extract_embeddings, select_layers_from_hf  # noqa: E402
from loes.datasets import load_bbc_news, minilm_path  # noqa: E402

ATOL = 2e-4
H = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def titles():
    ds = load_bbc_news(max_per_class=3, random_state=1)
    return datasets.Dataset.from_dict({"text": list(ds["title"]), "label": list(ds["label"])})


def _build(config):
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def _accepted(model, enc):
    """The tokenizer's outputs that the model's forward takes."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in enc.items() if k in params}


def _forward_one(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


# ------------------------------------------------------------------ text
TEXT_ENCODERS = {
    "bert": lambda: transformers.BertConfig(num_hidden_layers=3, vocab_size=30522, **H),
    "roberta": lambda: transformers.RobertaConfig(
        num_hidden_layers=3, vocab_size=30522, pad_token_id=0, max_position_embeddings=128, **H
    ),
    "deberta-v2": lambda: transformers.DebertaV2Config(
        num_hidden_layers=3, vocab_size=30522, pad_token_id=0, **H
    ),
    "modernbert": lambda: transformers.ModernBertConfig(
        num_hidden_layers=3,
        vocab_size=30522,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
        cls_token_id=101,
        sep_token_id=102,
        **H,
    ),
    "mpnet": lambda: transformers.MPNetConfig(
        num_hidden_layers=3, vocab_size=30522, pad_token_id=0, **H
    ),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(
        num_hidden_layers=3, vocab_size=30522, pad_token_id=0, max_position_embeddings=128, **H
    ),
}


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_text_encoders_cls_matches_unpadded_forward(name, tokenizer, titles):
    model = _build(TEXT_ENCODERS[name]())
    emb = extract_embeddings(model, titles, tokenizer=tokenizer, batch_size=4, show_progress=False)
    assert emb.pooling == "cls"
    assert emb.layer_names == ["hidden_states[1]", "hidden_states[2]", "hidden_states[3]"]
    for row, idx in enumerate(emb.indices):
        enc = tokenizer(titles[int(idx)]["text"], return_tensors="pt")
        hs = _forward_one(model, _accepted(model, enc))
        hand = torch.stack([h[0, 0] for h in hs[1:]])
        torch.testing.assert_close(emb.embeddings[row], hand, atol=ATOL, rtol=1e-4)
    np.testing.assert_array_equal(emb.targets, np.asarray(titles["label"])[emb.indices])


def test_masked_mean_ignores_padding_on_text_pairs(tokenizer):
    model = _build(TEXT_ENCODERS["bert"]())
    ds = datasets.Dataset.from_dict(
        {
            "sentence1": [
                "a short one",
                "this premise is a good deal longer than the other",
                "mid size text",
            ],
            "sentence2": ["and its pair", "short", "another sentence of moderate length here"],
            "label": [0, 1, 2],
        }
    )
    emb = extract_embeddings(
        model, ds, tokenizer=tokenizer, pooling="masked_mean", batch_size=3, show_progress=False
    )
    for row, idx in enumerate(emb.indices):
        r = ds[int(idx)]
        enc = tokenizer(r["sentence1"], r["sentence2"], return_tensors="pt")
        assert (enc["token_type_ids"] == 1).any()  # really encoded as a pair
        hs = _forward_one(model, dict(enc))
        hand = torch.stack([h[0].mean(0) for h in hs[1:]])
        torch.testing.assert_close(emb.embeddings[row], hand, atol=ATOL, rtol=1e-4)


# --------------------------------------------------------------- decoders
DECODERS = {
    "llama": lambda: transformers.LlamaConfig(
        num_hidden_layers=2,
        num_key_value_heads=1,
        vocab_size=30522,
        pad_token_id=None,
        bos_token_id=101,
        eos_token_id=102,
        **H,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=30522, bos_token_id=101, eos_token_id=102
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        num_hidden_layers=2,
        num_key_value_heads=1,
        vocab_size=30522,
        bos_token_id=101,
        eos_token_id=102,
        **H,
    ),
    "gemma": lambda: transformers.GemmaConfig(
        num_hidden_layers=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=30522,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
        **H,
    ),
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoders_last_token_with_pad_fallback(name, side, titles):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    tok.pad_token = None  # decoder tokenizers often have none: loes falls back to eos/unk
    tok.padding_side = side
    model = _build(DECODERS[name]())
    emb = extract_embeddings(model, titles, tokenizer=tok, batch_size=5, show_progress=False)
    assert emb.pooling == "last_token" and emb.info["family"] == "decoder"
    for row, idx in enumerate(emb.indices):
        enc = tok(titles[int(idx)]["text"], return_tensors="pt")
        hs = _forward_one(model, _accepted(model, enc))
        hand = torch.stack([h[0, -1] for h in hs[1:]])
        torch.testing.assert_close(emb.embeddings[row], hand, atol=ATOL, rtol=1e-4)


def test_causal_lm_head_runs_the_base_model(tokenizer, titles):
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(DECODERS["llama"]()).eval()
    emb = extract_embeddings(lm, titles, tokenizer=tokenizer, batch_size=4, show_progress=False)
    assert emb.info["module"] == "LlamaModel"
    enc = tokenizer(titles[int(emb.indices[0])]["text"], return_tensors="pt")
    hs = _forward_one(lm, dict(input_ids=enc["input_ids"]))
    torch.testing.assert_close(emb.embeddings[0, -1], hs[-1][0, -1], atol=ATOL, rtol=1e-4)


# --------------------------------------------------------- encoder-decoder
def test_t5_uses_the_encoder(tokenizer, titles):
    cfg = transformers.T5Config(
        num_layers=2,
        num_decoder_layers=1,
        d_model=32,
        num_heads=2,
        d_ff=37,
        d_kv=16,
        vocab_size=30522,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    model = _build(cfg)
    emb = extract_embeddings(model, titles, tokenizer=tokenizer, batch_size=4, show_progress=False)
    assert emb.pooling == "masked_mean"
    assert emb.layer_names == ["encoder.hidden_states[1]", "encoder.hidden_states[2]"]
    for row, idx in enumerate(emb.indices):
        enc = tokenizer(titles[int(idx)]["text"], return_tensors="pt")
        with torch.no_grad():
            hs = model.get_encoder()(
                input_ids=enc["input_ids"], output_hidden_states=True
            ).hidden_states
        hand = torch.stack([h[0].mean(0) for h in hs[1:]])
        torch.testing.assert_close(emb.embeddings[row], hand, atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def digits():
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = np.concatenate([np.flatnonzero(d.target == c)[:2] for c in range(4)])
    images = [
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), mode="L").resize((32, 32))
        for i in rows
    ]
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": d.target[rows].tolist()}, features=feats
    )


VITS = {
    "vit": lambda: transformers.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **H),
    "deit": lambda: transformers.DeiTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **H),
    "dinov2": lambda: transformers.Dinov2Config(
        num_hidden_layers=2, image_size=32, patch_size=8, **H
    ),
    "beit": lambda: transformers.BeitConfig(
        num_hidden_layers=2, image_size=32, patch_size=8, vocab_size=64, **H
    ),
    "clip_vision_model": lambda: transformers.CLIPVisionConfig(
        num_hidden_layers=2, image_size=32, patch_size=8, **H
    ),
}


def _image_processor():
    return transformers.ViTImageProcessor(size={"height": 32, "width": 32})


@pytest.mark.parametrize("name", sorted(VITS))
def test_vision_transformers_cls(name, digits):
    model = _build(VITS[name]())
    proc = _image_processor()
    emb = extract_embeddings(model, digits, processor=proc, batch_size=3, show_progress=False)
    assert emb.pooling == "cls" and len(emb.layer_names) == 2
    for row, idx in enumerate(emb.indices):
        px = proc(images=digits[int(idx)]["image"].convert("RGB"), return_tensors="pt")[
            "pixel_values"
        ]
        hs = _forward_one(model, {"pixel_values": px})
        torch.testing.assert_close(
            emb.embeddings[row], torch.stack([h[0, 0] for h in hs[1:]]), atol=ATOL, rtol=1e-4
        )


def test_clip_dual_encoder_uses_the_vision_tower(digits):
    cfg = transformers.CLIPConfig(
        text_config=dict(num_hidden_layers=2, vocab_size=30522, **H),
        vision_config=dict(num_hidden_layers=3, image_size=32, patch_size=8, **H),
        projection_dim=16,
    )
    model = _build(cfg)
    emb = extract_embeddings(
        model, digits, processor=_image_processor(), batch_size=4, show_progress=False
    )
    assert emb.layer_names == [f"vision_model.hidden_states[{i}]" for i in (1, 2, 3)]
    px = _image_processor()(
        images=digits[int(emb.indices[1])]["image"].convert("RGB"), return_tensors="pt"
    )
    hs = _forward_one(model.vision_model, dict(px))
    torch.testing.assert_close(emb.embeddings[1, 2], hs[3][0, 0], atol=ATOL, rtol=1e-4)


def test_convnext_stages_pooled_spatially_with_their_own_widths(digits):
    cfg = transformers.ConvNextConfig(
        num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], image_size=32
    )
    model = _build(cfg)
    proc = _image_processor()
    emb = extract_embeddings(model, digits, processor=proc, batch_size=3, show_progress=False)
    assert isinstance(emb.embeddings, list) and [e.shape[1] for e in emb.embeddings] == [8, 16, 24]
    for row, idx in enumerate(emb.indices):
        px = proc(images=digits[int(idx)]["image"].convert("RGB"), return_tensors="pt")[
            "pixel_values"
        ]
        hs = _forward_one(model, {"pixel_values": px})
        for layer, h in enumerate(hs[1:]):
            hand = h[0].reshape(h.shape[1], -1).mean(1)
            torch.testing.assert_close(emb.embeddings[layer][row], hand, atol=ATOL, rtol=1e-4)
    with pytest.raises(LOESError, match="4-D"):
        extract_embeddings(model, digits, processor=proc, pooling="cls", show_progress=False)


# ------------------------------------------------------------------- audio
@pytest.fixture(scope="module")
def speech():
    g = np.random.default_rng(0)
    lengths = [1600, 4000, 2400, 3200, 1900, 3600]
    t = [np.arange(n) / 16000 for n in lengths]
    arrays = [
        (np.sin(2 * np.pi * (200 + 100 * i) * x) + 0.1 * g.normal(size=len(x))).astype(np.float32)
        for i, x in enumerate(t)
    ]
    return datasets.Dataset.from_dict(
        {
            "audio": [{"array": a, "sampling_rate": 16000} for a in arrays],
            "label": [0, 1, 0, 1, 0, 1],
        }
    )


AUDIO = {
    "wav2vec2": lambda: transformers.Wav2Vec2Config,
    "hubert": lambda: transformers.HubertConfig,
    "wavlm": lambda: transformers.WavLMConfig,
}


@pytest.mark.parametrize("name", sorted(AUDIO))
def test_audio_frames_masked_by_the_models_output_lengths(name, speech):
    cfg = AUDIO[name]()(
        num_hidden_layers=2,
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
    model = _build(cfg)
    fe = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    emb = extract_embeddings(model, speech, processor=fe, batch_size=3, show_progress=False)
    assert emb.pooling == "masked_mean"
    for row, idx in enumerate(emb.indices):
        x = fe(speech[int(idx)]["audio"]["array"], sampling_rate=16000, return_tensors="pt")[
            "input_values"
        ]
        hs = _forward_one(model, {"input_values": x})
        hand = torch.stack([h[0].mean(0) for h in hs[1:]])
        torch.testing.assert_close(emb.embeddings[row], hand, atol=1e-3, rtol=1e-3)


def test_ast_spectrogram_transformer(speech):
    cfg = transformers.ASTConfig(num_hidden_layers=2, max_length=64, num_mel_bins=32, **H)
    model = _build(cfg)
    fe = transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=64)
    emb = extract_embeddings(model, speech, processor=fe, batch_size=4, show_progress=False)
    x = fe(speech[int(emb.indices[2])]["audio"]["array"], sampling_rate=16000, return_tensors="pt")
    hs = _forward_one(model, {"input_values": x["input_values"]})
    torch.testing.assert_close(
        emb.embeddings[2], torch.stack([h[0].mean(0) for h in hs[1:]]), atol=ATOL, rtol=1e-4
    )


def test_whisper_encoder_frames_masked(speech):
    cfg = transformers.WhisperConfig(
        encoder_layers=2,
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
    )
    model = _build(cfg)
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    emb = extract_embeddings(model, speech, processor=fe, batch_size=3, show_progress=False)
    assert emb.layer_names[0] == "encoder.hidden_states[1]" and emb.pooling == "masked_mean"
    for row, idx in enumerate(emb.indices):
        audio = speech[int(idx)]["audio"]["array"]
        feats = fe(audio, sampling_rate=16000, return_tensors="pt")["input_features"]
        with torch.no_grad():
            hs = model.get_encoder()(feats, output_hidden_states=True).hidden_states
        n_mel = -(-len(audio) // fe.hop_length)  # mel frames that hold audio
        n_out = (n_mel - 1) // 2 + 1  # after the stride-2 convolution
        hand = torch.stack([h[0, :n_out].mean(0) for h in hs[1:]])
        torch.testing.assert_close(emb.embeddings[row], hand, atol=ATOL, rtol=1e-4)
        assert not torch.allclose(
            emb.embeddings[row], torch.stack([h[0].mean(0) for h in hs[1:]]), atol=1e-3
        )


# ------------------------------------------------------------ selection
def test_select_layers_from_hf_on_a_tiny_model_accepts_core_keywords(tokenizer, titles):
    model = _build(TEXT_ENCODERS["bert"]())
    res = select_layers_from_hf(
        model,
        titles,
        tokenizer=tokenizer,
        k=2,
        preset="reference",
        alpha=0.5,
        beta=0.2,
        show_progress=False,
    )
    assert res.config["alpha"] == 0.5 and res.config["gamma"] == 0.2
    assert res.layer_names == ["hidden_states[1]", "hidden_states[2]", "hidden_states[3]"]
    assert res.pooling == "cls" and res.num_calibration_samples == len(titles)
    assert len(set(res.selected_layers)) == 2


def test_collate_fn_on_a_dataset_and_regression_targets(tokenizer, titles):
    model = _build(TEXT_ENCODERS["bert"]())

    def collate(rows):
        enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        return {**enc, "labels": torch.tensor([r["label"] for r in rows])}

    a = extract_embeddings(
        model, titles, tokenizer=tokenizer, collate_fn=collate, max_samples=10, show_progress=False
    )
    b = extract_embeddings(model, titles, tokenizer=tokenizer, max_samples=10, show_progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.targets, b.targets)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=ATOL, rtol=1e-4)

    scored = titles.map(lambda r: {"score": float(len(r["text"]))}).remove_columns("label")
    reg = extract_embeddings(
        model,
        scored,
        tokenizer=tokenizer,
        task="regression",
        target_key="score",
        max_samples=9,
        show_progress=False,
    )
    assert reg.targets.dtype.kind == "f"
    np.testing.assert_array_equal(reg.targets, [len(scored[int(i)]["text"]) for i in reg.indices])
