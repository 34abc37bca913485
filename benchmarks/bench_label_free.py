"""How often does each label-free layer selector beat the last layer?

On the offline assets (MiniLM-L6 on drug-review ratings and BBC News topics)
this script extracts, once per data set, the masked-mean pooled states of
every layer, each text's per-layer prompt entropy and curvature (streamed
token states) and two augmented views (the study's text perturbations). Then,
for each of ``--trials`` seeded splits into a calibration set (what the
selectors see), a probe-training set and a test set:

- every label-free selector picks one layer from the calibration inputs
  (each metric in its documented direction *and* in the opposite one, LOES
  label-free), and supervised LOES picks one from the calibration labels;
- a ridge probe (GCV-chosen strength) per layer is trained on the training
  set and scored on the test set;
- a selector "wins" when its layer's test accuracy beats the last layer's
  (ties: it picked a layer as good as the last, usually the last itself).

    python benchmarks/bench_label_free.py                       # full run (~15 min on 2 CPU cores)
    python benchmarks/bench_label_free.py --n-texts 200 --trials 3   # quick look
    python benchmarks/bench_label_free.py --model smollm2 --datasets drugreview   # the decoder

Extracted arrays are cached under ``--cache`` (default
``~/.cache/loes/bench_label_free``) so re-runs only redo the selection.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch

from loes import LOESWarning, select_layers_from_custom_embeddings
from loes.augment import TextAugmenter, make_views
from loes.metrics import METRICS, curvature, profile, prompt_entropy, select_layers_label_free
from loes.sweep import ridge_gcv_fit


def extract(
    name: str, n_texts: int, max_length: int, seed: int, cache: str, model_name: str = "minilm"
) -> dict[str, np.ndarray]:
    """Pooled states, per-text token metrics and two augmented views of n_texts texts."""
    prefix = "" if model_name == "minilm" else f"{model_name}_"
    path = os.path.join(cache, f"{prefix}{name}_{n_texts}_{max_length}_{seed}.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    import datasets
    import transformers

    from loes.datasets import load_bbc_news, load_drugreview, minilm_path, smollm2_gguf
    from loes.hf import extract_embeddings, iter_hidden_states

    ds = load_drugreview("all") if name == "drugreview" else load_bbc_news()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ds), size=min(n_texts, len(ds)), replace=False))
    texts = [ds[int(i)]["text"] for i in rows]
    labels = np.asarray([ds[int(i)]["label"] for i in rows])
    if model_name == "minilm":
        tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
        model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
        common = dict(
            text_key="text",
            max_samples=None,
            batch_size=32,
            max_length=max_length,
            tokenizer=tok,
            show_progress="on",
        )
    else:  # the decoder: loes.hf loads it (GGUF, dequantised) and pads on its side
        model, gguf = smollm2_gguf()
        common = dict(
            text_key="text",
            max_samples=None,
            batch_size=16,
            max_length=max_length,
            gguf_file=gguf,
            show_progress="on",
        )
    base = datasets.Dataset.from_dict({"text": texts})
    pooled, pe, cu, order = [], [], [], []
    for item in iter_hidden_states(model, base, **common):
        states, mask = item.hidden_states, item.mask
        pooled.append(
            torch.stack(
                [(s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for s in states], 1
            )
        )
        pe.append(torch.stack([prompt_entropy(s, mask, reduction="none") for s in states], 1))
        cu.append(torch.stack([curvature(s, mask, reduction="none") for s in states], 1))
        order.append(np.asarray(item.positions))
    order = np.argsort(np.concatenate(order))
    out = {
        "labels": labels,
        "pooled": torch.cat(pooled).numpy()[order],
        "prompt_entropy": torch.cat(pe).numpy()[order],
        "curvature": torch.cat(cu).numpy()[order],
    }
    for v, view_texts in enumerate(make_views(texts, TextAugmenter(random_state=seed), 2)):
        emb = extract_embeddings(
            model,
            datasets.Dataset.from_dict({"text": view_texts}),
            task="label_free",
            pooling="masked_mean",
            **common,
        )
        out[f"view{v}"] = np.asarray(emb.embeddings)[np.argsort(emb.indices)]
    os.makedirs(cache, exist_ok=True)
    np.savez(path, **out)
    return out


def split(labels: np.ndarray, n_cal: int, seed: int):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    cal, rest = perm[:n_cal], perm[n_cal:]
    half = len(rest) // 2
    return cal, rest[:half], rest[half:]


def layer_accuracies(x: np.ndarray, y: np.ndarray, train, test) -> np.ndarray:
    onehot = np.eye(y.max() + 1)[y]
    acc = []
    for layer in range(x.shape[1]):
        w, b, _ = ridge_gcv_fit(x[train, layer], onehot[train])
        acc.append(((x[test, layer] @ w + b).argmax(1) == y[test]).mean())
    return np.asarray(acc)


def run(args) -> list[dict]:
    rows = []
    flip = {"higher": "lower", "lower": "higher"}
    for name in args.datasets:
        t0 = time.perf_counter()
        data = extract(name, args.n_texts, args.max_length, args.seed, args.cache, args.model)
        print(
            f"[{name}] extraction/cache: {time.perf_counter() - t0:.0f}s, {len(data['labels'])} texts"
        )
        x, y = data["pooled"], data["labels"]
        last = x.shape[1] - 1
        for trial in range(args.trials):
            cal, train, test = split(y, args.n_cal, args.seed + 1000 + trial)
            acc = layer_accuracies(x, y, train, test)
            prof = profile(
                x[cal],
                views=[data["view0"][cal], data["view1"][cal]],
                random_state=trial,
                with_cka=False,
                show_progress=False,
            )
            for m in ("prompt_entropy", "curvature"):  # means of the per-text values
                vals = data[m][cal]
                prof.values[m] = [float(np.nanmean(vals[:, i])) for i in range(x.shape[1])]
                prof.directions[m] = METRICS[m].direction
            picks = {}
            for m in METRICS:
                for d in (METRICS[m].direction, flip[METRICS[m].direction]):
                    tag = f"{m} ({d})" + ("" if d == METRICS[m].direction else " flipped")
                    picks[tag] = select_layers_label_free(
                        metric_profile=prof, method=m, direction=d, show_progress=False
                    ).selected_layers[0]
            picks["LOES label-free"] = select_layers_label_free(
                x[cal], 1, "loes", show_progress=False, random_state=trial
            ).selected_layers[0]
            picks["LOES supervised"] = select_layers_from_custom_embeddings(
                x[cal], y[cal], 1, show_progress=False, random_state=trial
            ).selected_layers[0]
            picks["oracle (best test layer)"] = int(np.argmax(acc))
            for sel, layer in picks.items():
                rows.append(
                    {
                        "dataset": name,
                        "trial": trial,
                        "selector": sel,
                        "layer": int(layer),
                        "acc": float(acc[layer]),
                        "last_acc": float(acc[last]),
                        "delta": float(acc[layer] - acc[last]),
                    }
                )
    return rows


def summarise(rows: list[dict]) -> str:
    sels = list(dict.fromkeys(r["selector"] for r in rows))
    data = sorted({r["dataset"] for r in rows})
    head = (
        f"{'selector':<34}"
        + "".join(f"{d + ' W/T/L':>18}{'Δacc':>8}" for d in data)
        + f"{'all W/T/L':>12}"
    )
    lines = [head, "-" * len(head)]
    for s in sels:
        line, tw, tt, tl = f"{s:<34}", 0, 0, 0
        for d in data:
            rs = [r for r in rows if r["selector"] == s and r["dataset"] == d]
            w = sum(r["delta"] > 1e-12 for r in rs)
            lo = sum(r["delta"] < -1e-12 for r in rs)
            t = len(rs) - w - lo
            tw, tt, tl = tw + w, tt + t, tl + lo
            line += f"{f'{w}/{t}/{lo}':>18}{100 * np.mean([r['delta'] for r in rs]):>+8.2f}"
        lines.append(line + f"{f'{tw}/{tt}/{tl}':>12}")
    lines.append(
        "W/T/L: trials where the chosen layer's test accuracy beats / ties / trails the last "
        "layer's; Δacc: mean difference in accuracy points."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--datasets", nargs="+", default=["drugreview", "bbc"], choices=["drugreview", "bbc"]
    )
    p.add_argument(
        "--model",
        default="minilm",
        choices=["minilm", "smollm2"],
        help="all-MiniLM-L6-v2 (6 layers) or SmolLM2-135M-Instruct (30 layers, GGUF)",
    )
    p.add_argument("--n-texts", type=int, default=900)
    p.add_argument("--n-cal", type=int, default=256)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/loes/bench_label_free"))
    p.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    warnings.simplefilter("ignore", LOESWarning)  # N <= D is expected here
    rows = run(args)
    print(summarise(rows))
    mean_layer = {}
    for r in rows:
        mean_layer.setdefault((r["dataset"], r["selector"]), []).append(r["layer"])
    print("\nmost frequent pick per selector:")
    for (d, s), ls in sorted(mean_layer.items()):
        vals, counts = np.unique(ls, return_counts=True)
        print(f"  {d:<11} {s:<34} layer {int(vals[np.argmax(counts)])} ({counts.max()}/{len(ls)})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
