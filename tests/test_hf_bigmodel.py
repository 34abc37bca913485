"""Big models on one machine: device_map / max_memory / disk offload (accelerate), dtype, length
sorting and the out-of-memory fallback, on CPU with tiny models against the plain run."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from loes import LOESError, extract_embeddings  # noqa: E402
from loes.datasets import load_drugreview, minilm_path  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-block Llama and its tokenizer saved to a folder (loaded by path, as from the Hub)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=6,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=1024,
        vocab_size=30522,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    model = transformers.LlamaModel(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    ds = load_drugreview("test").select(range(30))
    ds = datasets.Dataset.from_dict(
        {"text": [t[:300] for t in ds["text"]], "label": list(ds["label"])}
    )
    return folder, model, ds


def test_disk_offload_split_by_max_memory_equals_the_plain_model(tiny, tmp_path):
    folder, _, ds = tiny
    plain = extract_embeddings(str(folder), ds, device="cpu", batch_size=8, show_progress=False)
    offload = tmp_path / "offload"
    for layers in (None, [1, 3]):
        split = extract_embeddings(
            str(folder),
            ds,
            device_map="auto",
            max_memory={"cpu": "10MiB"},
            offload_folder=offload,
            batch_size=8,
            layers=layers,
            show_progress=False,
        )
        idx = list(range(plain.n_layers)) if layers is None else layers
        assert split.layer_names == [plain.layer_names[i] for i in idx]
        torch.testing.assert_close(split.embeddings, plain.embeddings[:, idx], atol=ATOL, rtol=1e-5)
        assert split.info["capture"] == ("full forward" if layers is None else "hooks")
        assert split.info["device_map"] == [
            "cpu",
            "disk",
        ]  # really split: part of the weights on disk


def test_bf16_on_cpu_close_to_fp32(tiny):
    folder, _, ds = tiny
    a = extract_embeddings(str(folder), ds, device="cpu", max_samples=8, show_progress=False)
    b = extract_embeddings(
        str(folder), ds, device="cpu", dtype="bfloat16", max_samples=8, show_progress=False
    )
    assert b.info["dtype"] == "torch.bfloat16" and b.embeddings.dtype == torch.float32
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=0.1, rtol=0.1)


def test_length_sorting_changes_nothing_but_padding(tiny):
    _, model, ds = tiny
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    a = extract_embeddings(model, ds, tokenizer=tok, batch_size=4, show_progress=False)
    b = extract_embeddings(
        model, ds, tokenizer=tok, batch_size=4, sort_by_length=False, show_progress=False
    )
    np.testing.assert_array_equal(a.indices, b.indices)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=ATOL, rtol=1e-5)


def test_out_of_memory_halves_the_batch_and_goes_on(tiny, monkeypatch):
    _, model, ds = tiny
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    normal = extract_embeddings(model, ds, tokenizer=tok, batch_size=8, show_progress=False)
    forward = model.forward
    sizes = []

    @functools.wraps(forward)
    def tight(*args, **kwargs):
        n = kwargs["input_ids"].shape[0]
        sizes.append(n)
        if n > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", tight)
    squeezed = extract_embeddings(model, ds, tokenizer=tok, batch_size=8, show_progress=False)
    assert squeezed.info["oom_batch_size"] == 2
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2  # later batches start at the smaller size
    np.testing.assert_array_equal(squeezed.indices, normal.indices)
    torch.testing.assert_close(squeezed.embeddings, normal.embeddings, atol=ATOL, rtol=1e-5)

    @functools.wraps(forward)
    def never(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "forward", never)
    with pytest.raises(LOESError, match="out of memory on a batch of one row"):
        extract_embeddings(model, ds, tokenizer=tok, batch_size=2, show_progress=False)


def test_placement_errors_before_loading(tiny):
    folder, model, ds = tiny
    with pytest.raises(LOESError, match="apply when loes loads the model"):
        extract_embeddings(model, ds, device_map="auto")
    with pytest.raises(LOESError, match="either device=... or device_map"):
        extract_embeddings(str(folder), ds, device="cpu", device_map="auto")
    with pytest.raises(LOESError, match="needs device_map"):
        extract_embeddings(str(folder), ds, max_memory={"cpu": "1GiB"})
    with pytest.raises(LOESError, match="max_memory must be a dict"):
        extract_embeddings(str(folder), ds, device_map="auto", max_memory="1GiB")
