"""The HF front end's contract under bad, odd and stale input (issue 9, HF part).

A table of bad inputs, each with the error class and a stable part of its
message; every error must come before the model runs (a forward hook counts
calls). Then the reproducers: stale cache hits, cache hygiene, the caller's
model given back as it came, group-norm audio batching, random_state on both
paths, DataFrames, and fast failure for unreachable hub ids.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import LOESError, LOESWarning
from loes.datasets import minilm_path
from loes.hf import (
    ExtractionConfig,
    extract_embeddings,
    iter_hidden_states,
    select_layers_from_hf,
    select_layers_from_hf_id,
)
from loes.hf import cache as C

N_POS = 64
TINY = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=37,
    vocab_size=30522,
    max_position_embeddings=N_POS,
)
TEXTS = [
    f"{w} report number {i} about {w}" for i in range(8) for w in ("markets", "football", "films")
]


def _tiny_bert(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def ds():
    return datasets.Dataset.from_dict({"text": TEXTS, "label": [i % 3 for i in range(len(TEXTS))]})


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny_bert")
    _tiny_bert().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model():
    return _tiny_bert()


@pytest.fixture
def calls(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda *a: seen.append(1))
    yield seen
    handle.remove()


def _targets_change_shape():
    enc = [{"input_ids": torch.tensor([[101, 2000, 102]] * 2)}]
    return [(enc[0], torch.tensor([0, 1])), (enc[0], torch.tensor([[0, 1], [1, 0]]))]


def _ex(**kw):
    return lambda f: extract_embeddings(
        f["model"], f["ds"], tokenizer=f["tok"], show_progress=False, **kw
    )


def _sel(**kw):
    kw.setdefault("k", 1)
    return lambda f: select_layers_from_hf(
        f["model"], f["ds"], tokenizer=f["tok"], show_progress=False, **kw
    )


E = LOESError
#: (case id, call, expected error class, stable message fragment)
CASES = [
    ("batch_size=0", _ex(batch_size=0), E, "batch_size must be an integer >= 1"),
    ("batch_size<0", _ex(batch_size=-3), E, "batch_size must be an integer >= 1"),
    ("batch_size float", _ex(batch_size=2.5), E, "batch_size must be an integer"),
    ("batch_size bool", _ex(batch_size=True), E, "batch_size must be an integer"),
    ("max_length=0", _ex(max_length=0), E, "max_length must be an integer >= 2"),
    ("max_length=1", _ex(max_length=1), E, "max_length must be an integer >= 2"),
    ("max_length str", _ex(max_length="64"), E, "max_length must be an integer"),
    (
        "max_length > positions",
        _ex(max_length=N_POS + 1),
        E,
        f"exceeds the model's {N_POS} positions",
    ),
    ("pooling unknown", _ex(pooling="maxpool"), E, "pooling must be 'auto' or one of"),
    ("pooling None", _ex(pooling=None), E, "pooling must be 'auto' or one of"),
    ("max_samples=0", _ex(max_samples=0), E, "max_samples) must be an integer >= 1"),
    ("max_samples bool", _ex(max_samples=True), E, "max_samples) must be an integer"),
    ("num_workers<0", _ex(num_workers=-1), E, "num_workers must be an integer >= 0"),
    ("dtype unknown", _ex(dtype="int8"), E, "dtype must be 'auto', 'float32'"),
    ("device unknown", _ex(device="banana"), E, "device must be 'auto', 'cpu'"),
    (
        "include_embeddings str",
        _ex(include_embeddings="yes"),
        E,
        "include_embeddings must be True or False",
    ),
    ("cache_dir int", _ex(cache_dir=3), E, "cache_dir must be None, True/False or a folder path"),
    (
        "cache_max_bytes<0",
        _ex(cache_max_bytes=-1),
        E,
        "cache_max_bytes must be a non-negative integer",
    ),
    ("cache_key int", _ex(cache_key=5), E, "cache_key must be a string"),
    (
        "typo max_sample",
        _ex(max_sample=10),
        E,
        "unknown keyword 'max_sample'; did you mean 'max_samples'?",
    ),
    ("typo poling", _ex(poling="cls"), E, "unknown keyword 'poling'; did you mean 'pooling'?"),
    ("task unknown", _ex(task="classify-ish"), E, "task must be 'classification', 'regression'"),
    ("random_state float", _ex(random_state=1.5), E, "random_state must be None, an int seed"),
    ("random_state str", _ex(random_state="42"), E, "random_state must be None, an int seed"),
    ("random_state<0", _ex(random_state=-1), E, "random_state must be a non-negative integer"),
    (
        "config and keyword",
        _ex(config=ExtractionConfig(), batch_size=8),
        E,
        "not both: got config and ['batch_size']",
    ),
    ("config wrong type", _ex(config="fast"), E, "config must be a loes.ExtractionConfig"),
    (
        "model int",
        lambda f: extract_embeddings(42, f["ds"]),
        E,
        "model must be a Hugging Face model",
    ),
    (
        "no data",
        lambda f: extract_embeddings(f["model"], tokenizer=f["tok"]),
        E,
        "pass dataset=...",
    ),
    (
        "dataset and dataloader",
        _ex(dataloader=[({"input_ids": torch.ones(1, 3, dtype=torch.long)}, [0])]),
        E,
        "pass either dataset=... or dataloader=..., not both",
    ),
    (
        "processor and tokenizer",
        _ex(processor=transformers.BertTokenizerFast.from_pretrained(minilm_path())),
        E,
        "pass either processor=... or tokenizer=..., not both",
    ),
    ("target_key missing", _ex(target_key="nope"), E, "target_key='nope' not found"),
    ("text_key missing", _ex(text_key="body"), E, "text_key='body' not found"),
    (
        "None labels",
        lambda f: extract_embeddings(
            f["model"],
            f["ds"].map(lambda r, i: {"label": None if i == 4 else r["label"]}, with_indices=True),
            tokenizer=f["tok"],
            show_progress=False,
        ),
        E,
        "has 1 missing value(s) (None), first at rows [4]",
    ),
    (
        "targets change shape",
        lambda f: extract_embeddings(
            f["model"], dataloader=_targets_change_shape(), tokenizer=f["tok"], show_progress=False
        ),
        E,
        "dataloader batch 1: targets of shape (2, 2)",
    ),
    (
        "missing model folder",
        lambda f: extract_embeddings(os.path.join(f["tmp"], "no", "such", "model"), f["ds"]),
        E,
        "does not exist",
    ),
    (
        "missing csv",
        lambda f: extract_embeddings(
            f["model"], os.path.join(f["tmp"], "none.csv"), tokenizer=f["tok"]
        ),
        E,
        "dataset file not found",
    ),
    (
        "iter batch_size=0",
        lambda f: iter_hidden_states(f["model"], f["ds"], batch_size=0),
        E,
        "batch_size must be an integer >= 1",
    ),
    (
        "iter typo",
        lambda f: iter_hidden_states(f["model"], f["ds"], max_lenght=32),
        E,
        "did you mean 'max_length'?",
    ),
    ("k=0", _sel(k=0), E, "k must be an integer >= 1 or 'auto'; got 0"),
    ("k None", _sel(k=None), E, "k (the number of layers to select) must be given"),
    ("k float", _sel(k=2.0), E, "k must be an integer >= 1"),
    ("k > layers", _sel(k=5), E, "k=5 but the model has 2 layers"),
    (
        "k > layers with embeddings",
        _sel(k=4, include_embeddings=True),
        E,
        "k=4 but the model has 3 layers",
    ),
    ("preset unknown", _sel(preset="fast"), E, "preset must be one of"),
    ("option unknown", _sel(foo=1), E, "select_layers_from_hf: unknown keyword 'foo'"),
    ("estimate not bool", _sel(estimate="yes"), E, "estimate must be True or False"),
    ("option typo", _sel(orth_rnk=3), E, "unknown keyword 'orth_rnk'; did you mean 'orth_rank'?"),
    ("select max_sample", _sel(max_sample=10), E, "did you mean 'max_calibration_samples'?"),
    ("select max_samples", _sel(max_samples=10), E, "did you mean 'max_calibration_samples'?"),
    ("robust option on reference", _sel(preset="reference", cv="loo"), E, "unknown keyword 'cv'"),
    ("reserved layer_names", _sel(layer_names=["a", "b"]), E, "are set from the extracted model"),
    ("select batch_size=0", _sel(batch_size=0), E, "batch_size must be an integer >= 1"),
    (
        "select random_state float",
        _sel(random_state=0.5),
        E,
        "random_state must be None, an int seed",
    ),
    ("select task None", _sel(task=None), E, "task must be"),
    (
        "select_id missing folder",
        lambda f: select_layers_from_hf_id(os.path.join(f["tmp"], "gone"), f["ds"], k=1),
        E,
        "model path",
    ),
    (
        "select_id relative missing",
        lambda f: select_layers_from_hf_id("./no-such-model-dir", f["ds"], k=1),
        E,
        "does not exist",
    ),
    (
        "select_id model object",
        lambda f: select_layers_from_hf_id(f["model"], f["ds"], k=1),
        E,
        "model_id_or_path must be a hub id or a local folder",
    ),
    (
        "select_id k=0 before load",
        lambda f: select_layers_from_hf_id(f["folder"], f["ds"], k=0),
        E,
        "k must be an integer >= 1",
    ),
    (
        "select_id k > layers before load",
        lambda f: select_layers_from_hf_id(f["folder"], f["ds"], k=3),
        E,
        "k=3 but the model has 2 layers",
    ),
    (
        "select_id max_length > positions",
        lambda f: select_layers_from_hf_id(f["folder"], f["ds"], k=1, max_length=200),
        E,
        f"exceeds the model's {N_POS} positions",
    ),
]
#: Cases only a streamed batch can reveal: the error names the batch, after earlier batches ran.
STREAMED = {"targets change shape"}
if not torch.cuda.is_available():
    CASES.append(("cuda without a GPU", _ex(device="cuda"), E, "CUDA is not available"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_before_the_model_runs(
    case, model, tok, ds, folder, tmp_path, calls, monkeypatch
):
    _, call, error, fragment = case
    loads = []
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: loads.append(a))
    f = {"model": model, "tok": tok, "ds": ds, "folder": folder, "tmp": str(tmp_path)}
    with pytest.raises(error) as info:
        call(f)
    assert fragment in str(info.value)
    assert not calls or case[0] in STREAMED, "the model ran before the error"
    assert not loads, "the model was loaded before the error"


def test_at_least_45_cases():
    assert len(CASES) >= 45


# ------------------------------------------------------------------ 9.9 hub and data sources
@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_unreachable_hub_id_fails_fast_with_a_loes_message(kind, model, tok, ds, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(
        "HF_ENDPOINT", "https://127.0.0.1:9"
    )  # nothing listens: the Hub is unreachable
    t0 = time.perf_counter()
    with pytest.raises(
        LOESError, match=f"could not reach the Hugging Face Hub for the {kind} id"
    ) as info:
        if kind == "model":
            select_layers_from_hf_id("no-such-org/no-such-model", ds, k=1)
        else:
            extract_embeddings(model, "no-such-org/no-such-data", tokenizer=tok)
    assert time.perf_counter() - t0 < 10
    assert "local folder" in str(info.value)


def test_a_dataframe_is_a_dataset(model, tok, ds):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"text": TEXTS, "label": [i % 3 for i in range(len(TEXTS))]})
    a = extract_embeddings(model, frame, tokenizer=tok, max_samples=9, show_progress=False)
    b = extract_embeddings(model, ds, tokenizer=tok, max_samples=9, show_progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=0, rtol=0)


def test_default_max_length_is_capped_at_the_models_positions(tok):
    model = _tiny_bert(max_position_embeddings=16)
    long = datasets.Dataset.from_dict({"text": [" ".join(["word"] * 40)] * 3, "label": [0, 1, 0]})
    emb = extract_embeddings(model, long, tokenizer=tok, show_progress=False)
    assert emb.info["max_length"] == 16


# ---------------------------------------------------------------- 10.3 config object
def test_extraction_config_equals_the_keywords(model, tok, ds):
    cfg = ExtractionConfig(pooling="masked_mean", batch_size=5, max_length=20, max_samples=9)
    a = extract_embeddings(model, ds, tokenizer=tok, config=cfg, show_progress=False)
    b = extract_embeddings(
        model,
        ds,
        tokenizer=tok,
        pooling="masked_mean",
        batch_size=5,
        max_length=20,
        max_samples=9,
        show_progress=False,
    )
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=0, rtol=0)
    assert a.pooling == "masked_mean" and a.info["max_length"] == 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3


# ---------------------------------------------------------------- 9.6 the caller's model
def test_the_callers_model_comes_back_as_it_came(tok, ds):
    model = _tiny_bert()
    model.train()
    model.encoder.layer[0].eval()  # mixed flags are restored module by module
    flags = {n: m.training for n, m in model.named_modules()}
    before = copy.deepcopy(model.state_dict())
    buffer = model.embeddings.position_ids
    extract_embeddings(
        model, ds, tokenizer=tok, dtype="bfloat16", device="cpu", max_samples=6, show_progress=False
    )
    for _ in iter_hidden_states(
        model, ds, tokenizer=tok, dtype="float16", max_samples=6, show_progress=False
    ):
        pass
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and after[name].device == t.device, name
        assert torch.equal(after[name], t), name
    assert model.embeddings.position_ids is buffer
    assert all(p.requires_grad for p in model.parameters())


def test_eval_mode_is_used_while_extracting(tok, ds):
    model = _tiny_bert(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    a = extract_embeddings(model, ds, tokenizer=tok, max_samples=6, show_progress=False)
    b = extract_embeddings(model, ds, tokenizer=tok, max_samples=6, show_progress=False)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=0, rtol=0)
    assert model.training


# --------------------------------------------------------------- 9.1 stale cache hits
def _extract_cached(model, ds, tok, cache):
    return extract_embeddings(
        model, ds, tokenizer=tok, max_samples=9, cache_dir=cache, show_progress=False
    )


def test_cache_hits_only_for_the_same_computation(tok, ds, tmp_path):
    model = _tiny_bert()
    first = _extract_cached(model, ds, tok, tmp_path)
    again = _extract_cached(model, ds, tok, tmp_path)
    assert not first.from_cache and again.from_cache
    torch.testing.assert_close(first.embeddings, again.embeddings, atol=0, rtol=0)

    cased = transformers.AutoTokenizer.from_pretrained(minilm_path(), do_lower_case=False)
    assert not _extract_cached(model, ds, cased, tmp_path).from_cache

    eps = _tiny_bert(layer_norm_eps=1e-3)  # a different config, same weights
    assert not _extract_cached(eps, ds, tok, tmp_path).from_cache
    in_memory = _tiny_bert()
    in_memory.encoder.layer[1].output.LayerNorm.eps = 1e-2  # a module setting, not a tensor
    assert not _extract_cached(in_memory, ds, tok, tmp_path).from_cache

    scaled = _tiny_bert()
    with torch.no_grad():  # every value but the old 16-value stride sample
        w = scaled.encoder.layer[0].attention.self.query.weight.view(-1)
        step = max(1, w.numel() // 16)
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[::step] = True
        w[~keep] *= 1.5
    assert not _extract_cached(scaled, ds, tok, tmp_path).from_cache
    buffers = _tiny_bert()
    buffers.embeddings.token_type_ids.fill_(1)  # a buffer, not a parameter
    assert not _extract_cached(buffers, ds, tok, tmp_path).from_cache
    assert _extract_cached(_tiny_bert(), ds, tok, tmp_path).from_cache


# ---------------------------------------------------------------- 9.10 cache hygiene
def _entry(folder):
    (st,) = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    return st, st.with_suffix(".json")


def test_old_orphan_tmp_files_are_removed_and_fresh_ones_kept(model, tok, ds, tmp_path):
    old, fresh = tmp_path / ".x.safetensors.abc.tmp", tmp_path / ".y.json.def.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 2 * C.ORPHAN_AGE_S,) * 2)
    _extract_cached(model, ds, tok, tmp_path)
    assert not old.exists() and fresh.exists()


def test_wrong_shapes_under_the_right_key_are_a_logged_miss(model, tok, ds, tmp_path, caplog):
    st_mod = pytest.importorskip("safetensors.torch")
    first = _extract_cached(model, ds, tok, tmp_path)
    st, side = _entry(tmp_path)
    key = st.stem
    tensors = st_mod.load_file(str(st))
    tensors["embeddings"] = tensors["embeddings"][:5]  # right key, wrong rows
    st_mod.save_file(tensors, str(st), metadata={"key": key})
    with caplog.at_level(logging.WARNING, logger="loes.hf.cache"):
        again = _extract_cached(model, ds, tok, tmp_path)
    assert not again.from_cache and "does not match its record" in caplog.text
    torch.testing.assert_close(again.embeddings, first.embeddings, atol=0, rtol=0)

    meta = json.loads(side.read_text())  # recorded shapes edited to match: the
    tensors = st_mod.load_file(str(st))  # expected sample count still catches it
    tensors["embeddings"] = tensors["embeddings"][:5]
    meta["shapes"]["embeddings"]["shape"] = [5, 2, 32]
    st_mod.save_file(tensors, str(st), metadata={"key": key})
    side.write_text(json.dumps(meta))
    assert not _extract_cached(model, ds, tok, tmp_path).from_cache


@pytest.mark.parametrize("field", ["layer_names", "pooling", "shapes"])
def test_a_sidecar_missing_a_field_is_a_miss(field, model, tok, ds, tmp_path):
    _extract_cached(model, ds, tok, tmp_path)
    _, side = _entry(tmp_path)
    meta = json.loads(side.read_text())
    del meta[field]
    side.write_text(json.dumps(meta))
    assert not _extract_cached(model, ds, tok, tmp_path).from_cache
    assert _extract_cached(model, ds, tok, tmp_path).from_cache


def test_size_cap_evicts_the_least_recently_used(model, tok, ds, tmp_path):
    keys = []
    for n in (6, 7, 8):
        extract_embeddings(
            model, ds, tokenizer=tok, max_samples=n, cache_dir=tmp_path, show_progress=False
        )
        keys.append({p.stem for p in tmp_path.glob("*.safetensors")})
        time.sleep(0.02)
    first = min(keys[0])
    extract_embeddings(
        model, ds, tokenizer=tok, max_samples=6, cache_dir=tmp_path, show_progress=False
    )  # used
    size = sum(p.stat().st_size for p in tmp_path.iterdir() if p.stem in keys[2] - keys[1])
    extract_embeddings(
        model,
        ds,
        tokenizer=tok,
        max_samples=9,
        cache_dir=tmp_path,
        show_progress=False,
        cache_max_bytes=3 * size,
    )
    left = {p.stem for p in tmp_path.glob("*.safetensors")}
    assert first in left and len(left) <= 3
    assert min(keys[1] - keys[0]) not in left  # n=7: least recently used


# ------------------------------------------------------------------------ 9.8 random_state
def test_numpy_int_and_generator_seeds_on_the_hf_path(model, tok, ds):
    a = select_layers_from_hf(
        model,
        ds,
        tokenizer=tok,
        k=1,
        max_calibration_samples=12,
        random_state=7,
        show_progress=False,
    )
    b = select_layers_from_hf(
        model,
        ds,
        tokenizer=tok,
        k=1,
        max_calibration_samples=12,
        random_state=np.int64(7),
        show_progress=False,
    )
    assert a.config["random_state"] == b.config["random_state"] == 7
    assert a.config["extraction"]["indices"] == b.config["extraction"]["indices"]
    g = select_layers_from_hf(
        model,
        ds,
        tokenizer=tok,
        k=1,
        max_calibration_samples=12,
        random_state=np.random.default_rng(3),
        show_progress=False,
    )
    assert (
        isinstance(g.config["random_state"], int) and len(g.config["extraction"]["indices"]) == 12
    )


# ------------------------------------------------------------------ 9.11 group-norm audio
@pytest.fixture(scope="module")
def speech():
    g = np.random.default_rng(0)
    lengths = [1600, 2400, 1600, 3200, 2400, 1900]
    clips = [
        (np.sin(np.arange(n) / (3 + i)) + 0.1 * g.normal(size=n)).astype(np.float32)
        for i, n in enumerate(lengths)
    ]
    return datasets.Dataset.from_dict(
        {
            "audio": [{"array": c, "sampling_rate": 16000} for c in clips],
            "label": [0, 1, 0, 1, 0, 1],
        }
    )


def _group_norm_wav2vec2():
    cfg = transformers.Wav2Vec2Config(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=10,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
    )
    torch.manual_seed(0)
    return transformers.Wav2Vec2Model(cfg).eval()


def test_group_norm_audio_features_do_not_depend_on_the_batch(speech):
    model = _group_norm_wav2vec2()
    fe = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=False)
    batched = extract_embeddings(model, speech, processor=fe, batch_size=4, show_progress=False)
    alone = extract_embeddings(model, speech, processor=fe, batch_size=1, show_progress=False)
    torch.testing.assert_close(batched.embeddings, alone.embeddings, atol=1e-5, rtol=1e-5)
    for row, idx in enumerate(batched.indices):  # slow twin: each clip on its own
        x = fe(speech[int(idx)]["audio"]["array"], sampling_rate=16000, return_tensors="pt")[
            "input_values"
        ]
        with torch.no_grad():
            hs = model(x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(
            batched.embeddings[row],
            torch.stack([h[0].mean(0) for h in hs[1:]]),
            atol=1e-4,
            rtol=1e-4,
        )


def test_group_norm_audio_padded_by_a_dataloader_warns(speech):
    model = _group_norm_wav2vec2()
    fe = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    clips = [speech[i]["audio"]["array"] for i in range(4)]
    enc = fe(clips, sampling_rate=16000, padding=True, return_tensors="pt")
    loader = [
        (
            {"input_values": enc["input_values"], "attention_mask": enc["attention_mask"]},
            torch.tensor([0, 1, 0, 1]),
        )
    ]
    with pytest.warns(LOESWarning, match="normalises over time"):
        extract_embeddings(model, dataloader=loader, processor=fe, show_progress=False)


def test_a_model_folder_without_tokenizer_files_is_a_clear_error(tmp_path, ds):
    """transformers would build an empty tokenizer mapping every text to [UNK]."""
    _tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(LOESError, match="has no tokenizer files"):
        extract_embeddings(str(tmp_path), ds, max_samples=8)


def test_estimate_keyword_reaches_the_selection(model, tok, ds):
    kw = dict(tokenizer=tok, k=1, show_progress=False)
    assert select_layers_from_hf(model, ds, estimate=False, **kw).estimate is None
    assert select_layers_from_hf(model, ds, **kw).estimate is not None
