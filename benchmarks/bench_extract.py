"""Extraction throughput of loes vs a plain forward pass over the same batches.

For each model config (random weights, built from its config class), the same
pre-tokenized batches are run (a) through ``model(**batch)`` in inference mode
and (b) through :func:`loes.extract_embeddings` (all hidden states, pooling,
copy to CPU). The table reports the median wall time of each over
``--repeats`` alternating runs and the overhead of (b) over (a).

A second table times ``layers=`` (one middle layer and the first+middle pair):
hooks on the blocks with an early stop, against the all-layer run. A third
(``--sorting``) runs MiniLM on the 979 packaged drug reviews with ``sort_by_length`` on and
off and reports the tokens processed (padded batch widths summed) and wall time.
A fourth (``--ray``) exports the same reviews to a feature store in one process
(:func:`loes.hf.export_features`) and on a local Ray with 1 and 2 CPU workers
(:func:`loes.distributed.extract`, one torch thread each): wall time, samples/s
and real tokens/s, end to end (model loads and actor start-up included; the
local Ray itself is started once, before the clock). A fifth (``--memory``)
runs the bert-base config once per capture mode (all layers, the middle
layer, the first layer), each in a fresh process, and reports samples/s,
tokens/s and the peak resident memory above the loaded model.

Usage::

    python benchmarks/bench_extract.py --device cpu              # BERT-base size
    python benchmarks/bench_extract.py --device cpu --sorting    # + length sorting on MiniLM
    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py --ray-only   # only the Ray table
    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py --memory-only   # only the memory table
    python benchmarks/bench_extract.py --device cuda             # + a 1.1B Llama decoder
    python benchmarks/bench_extract.py --device cpu --with-1b    # the 1B config on CPU (slow)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def configs(with_1b: bool):
    import transformers

    out = [("bert-base (12x768)", "auto", lambda: transformers.BertConfig())]
    if with_1b:
        out.append(
            (
                "llama-1.1B (22x2048)",
                "last_token",
                lambda: transformers.LlamaConfig(
                    hidden_size=2048,
                    intermediate_size=5632,
                    num_hidden_layers=22,
                    num_attention_heads=32,
                    num_key_value_heads=4,
                    vocab_size=32000,
                ),
            )
        )
    return out


def make_batches(
    n: int, seq: int, batch_size: int, vocab: int, seed: int = 0
) -> list[tuple[dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(1000, vocab - 1, (b, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (b,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        batches.append(
            ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 4, (b,), generator=g))
        )
    return batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(model, batches, device) -> float:
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for inputs, _ in batches:
            out = model(
                **{k: v.to(device, non_blocking=True) for k, v in inputs.items()}, use_cache=False
            )
            del out
    sync(device)
    return time.perf_counter() - t


def with_loes(model, batches, device, pooling, layers=None) -> float:
    from loes import extract_embeddings

    sync(device)
    t = time.perf_counter()
    emb = extract_embeddings(
        model,
        dataloader=batches,
        task="label_free",
        max_samples=None,
        pooling=pooling,
        layers=layers,
        show_progress=False,
    )
    sync(device)
    elapsed = time.perf_counter() - t
    assert emb.embeddings.device.type == "cpu"
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=None, help="samples (default: 64 on CPU, 1024 on CUDA)")
    p.add_argument(
        "--seq", type=int, default=None, help="tokens per sample (default: 64 CPU, 256 CUDA)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 CPU, 32 CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--with-1b", action="store_true", help="also run the 1.1B decoder (default on CUDA)"
    )
    p.add_argument("--sorting", action="store_true", help="also measure sort_by_length on MiniLM")
    p.add_argument("--ray", action="store_true", help="also export with 1 and 2 Ray CPU workers")
    p.add_argument("--ray-only", action="store_true", help="only the Ray export table")
    p.add_argument("--ray-rows", type=int, default=979, help="drug reviews for --ray (max 979)")
    p.add_argument("--memory", action="store_true", help="also peak memory per capture mode")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory table")
    args = p.parse_args()
    if args.memory_only:
        memory(args.device)
        return
    if args.ray_only:
        ray_export(args.ray_rows)
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (1024 if cuda else 64)
    seq = args.seq or (256 if cuda else 64)
    bs = args.batch_size or (32 if cuda else 16)
    dtype = (
        (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if cuda
        else torch.float32
    )
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    subset_rows = []
    for name, pooling, make in configs(args.with_1b or cuda):
        config = make()
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModel.from_config(config, dtype=dtype).eval()
        batches = make_batches(n, seq, bs, config.vocab_size)
        plain(model, batches[:1], device)  # warm-up (kernels, allocator)
        with_loes(model, batches[:1], device, pooling)
        n_blocks = config.num_hidden_layers
        subsets = {"middle": [n_blocks // 2], "first+middle": [0, n_blocks // 2]}
        times: dict[str, list[float]] = {"plain": [], "loes": [], **{k: [] for k in subsets}}
        for _ in range(args.repeats):  # alternate to share any drift in machine load
            times["plain"].append(plain(model, batches, device))
            times["loes"].append(with_loes(model, batches, device, pooling))
            for key, layers in subsets.items():
                times[key].append(with_loes(model, batches, device, pooling, layers))
        tp, tl = statistics.median(times["plain"]), statistics.median(times["loes"])
        rows.append(
            (
                name,
                str(device),
                str(dtype).replace("torch.", ""),
                n,
                seq,
                bs,
                tp,
                tl,
                100 * (tl / tp - 1),
                n / tl,
            )
        )
        subset_rows.extend(
            (name, key, layers, n_blocks, statistics.median(times[key]), tl)
            for key, layers in subsets.items()
        )
        del model
        if cuda:
            torch.cuda.empty_cache()
    head = (
        "model",
        "device",
        "dtype",
        "N",
        "seq",
        "batch",
        "plain s",
        "loes s",
        "overhead",
        "loes samples/s",
    )
    print(
        f"{head[0]:<22} {head[1]:<7} {head[2]:<9} {head[3]:>5} {head[4]:>4} {head[5]:>5} "
        f"{head[6]:>8} {head[7]:>8} {head[8]:>9} {head[9]:>15}"
    )
    for r in rows:
        print(
            f"{r[0]:<22} {r[1]:<7} {r[2]:<9} {r[3]:>5} {r[4]:>4} {r[5]:>5} {r[6]:>8.2f} {r[7]:>8.2f} "
            f"{r[8]:>8.1f}% {r[9]:>15.1f}"
        )
    print(
        f"(median of {args.repeats} alternating runs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads)"
    )
    print(
        f"\n{'model':<22} {'layers=':<14} {'blocks run':>10} {'subset s':>9} {'all s':>7} {'speed-up':>9}"
    )
    for name, _key, layers, n_blocks, ts, ta in subset_rows:
        print(
            f"{name:<22} {str(layers):<14} {max(layers) + 1:>4} of {n_blocks:<3} {ts:>9.2f} {ta:>7.2f} "
            f"{ta / ts:>8.2f}x"
        )
    if args.sorting:
        sorting(args.repeats)
    if args.ray:
        ray_export(args.ray_rows)
    if args.memory:
        memory(args.device)


_MEMORY_CHILD = """
import json, resource, sys, time, torch, transformers
from loes import extract_embeddings
transformers.logging.set_verbosity_error()
layers, device, n, seq, bs = json.loads(sys.argv[1])
torch.manual_seed(0)
with torch.device(device):
    model = transformers.AutoModel.from_config(transformers.BertConfig()).eval()
g = torch.Generator().manual_seed(0)
batches = []
for s in range(0, n, bs):
    ids = torch.randint(1000, 30000, (min(bs, n - s), seq), generator=g)
    batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None))
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
extract_embeddings(model, dataloader=batches, task="label_free", max_samples=None, layers=layers,
                   show_progress=False)
if device == "cuda":
    torch.cuda.synchronize()
elapsed = time.perf_counter() - t
peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
print(json.dumps({"s": elapsed, "mb": peak}))
"""


def memory(device: str, n: int = 64, seq: int = 256, batch_size: int = 32) -> None:
    """bert-base config, one fresh process per capture mode: throughput and peak memory."""
    import json
    import subprocess
    import sys

    print(
        f"\nbert-base config (12 x 768), {device}, N={n}, seq {seq}, batch {batch_size}; one fresh "
        "process per row"
    )
    what = "peak GPU MiB" if device == "cuda" else "peak RSS MiB over the loaded model"
    print(
        f"{'layers=':<10} {'blocks run':>10} {'s':>8} {'samples/s':>10} {'tokens/s':>9} {what:>34}"
    )
    for layers in (None, [6], [0]):
        arg = json.dumps([layers, device, n, seq, batch_size])
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, arg], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        blocks = 12 if layers is None else max(layers) + 1
        print(
            f"{str(layers or 'all'):<10} {blocks:>7} of 12 {r['s']:>8.2f} {n / r['s']:>10.2f} "
            f"{n * seq / r['s']:>9.0f} {r['mb']:>34.0f}"
        )


def sorting(repeats: int, n: int = 1000, batch_size: int = 32) -> None:
    """MiniLM on ``n`` drug reviews, sort_by_length on/off: padded tokens processed and wall time."""
    import numpy as np
    import transformers

    from loes import extract_embeddings
    from loes.datasets import load_drugreview, minilm_path

    ds = load_drugreview("all")  # 979 reviews: train + test
    ds = ds.select(range(min(n, len(ds))))
    n = len(ds)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    lengths = np.array(
        [len(ids) for ids in tok(list(ds["text"]), truncation=True, max_length=256)["input_ids"]]
    )
    out = {}
    for on in (True, False):
        order = np.argsort(-lengths, kind="stable") if on else np.arange(n)
        padded = sum(
            len(b) * lengths[b].max()
            for b in np.array_split(order, range(batch_size, n, batch_size))
        )
        out[on] = [int(padded), [], [], None]
    for _ in range(repeats):  # alternate on/off to share any drift in machine load
        for on in (True, False):
            t, c = time.perf_counter(), time.process_time()
            out[on][3] = extract_embeddings(
                model,
                ds,
                tokenizer=tok,
                max_samples=None,
                batch_size=batch_size,
                max_length=256,
                sort_by_length=on,
                show_progress=False,
            )
            out[on][1].append(time.perf_counter() - t)
            out[on][2].append(time.process_time() - c)
    out = {on: (v[0], min(v[1]), min(v[2]), v[3]) for on, v in out.items()}
    torch.testing.assert_close(
        out[True][3].embeddings, out[False][3].embeddings, atol=1e-5, rtol=1e-5
    )
    real = int(lengths.sum())
    print(f"\nMiniLM-L6, {n} drug reviews, batch {batch_size}, max_length 256 ({real} real tokens)")
    print(
        f"{'sort_by_length':<15} {'tokens processed':>17} {'padding':>8} {'wall s':>8} {'CPU s':>8}"
    )
    for on in (True, False):
        padded, wall, cpu, _ = out[on]
        print(
            f"{str(on):<15} {padded:>17} {100 * (padded / real - 1):>7.1f}% {wall:>8.2f} {cpu:>8.2f}"
        )
    print(
        f"sorting: {out[False][0] / out[True][0]:.2f}x fewer tokens, {out[False][1] / out[True][1]:.2f}x less "
        f"wall time, {out[False][2] / out[True][2]:.2f}x less CPU time (best of {repeats}); same features"
    )


def ray_export(
    n: int, workers: tuple[int, ...] = (1, 2), shard_rows: int = 64, max_length: int = 256
) -> None:
    """MiniLM on ``n`` drug reviews to a feature store: one process vs Ray CPU workers."""
    import os
    import tempfile

    import numpy as np
    import ray
    import transformers

    from loes.datasets import load_drugreview, minilm_path
    from loes.distributed import extract
    from loes.hf import export_features

    ds = load_drugreview("all")
    ds = ds.select(range(min(n, len(ds))))
    n = len(ds)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    tokens = sum(
        len(ids)
        for ids in tok(list(ds["text"]), truncation=True, max_length=max_length)["input_ids"]
    )
    kw = dict(max_length=max_length, batch_size=32, shard_rows=shard_rows, show_progress=False)
    rows = []

    def steady(folder: str, w: int) -> float:
        """Rows per second between the first and the last shard written: the rows of all
        but each worker's first shard, over that span (no model loads or start-up)."""
        times = sorted(
            os.path.getmtime(os.path.join(folder, f))
            for f in os.listdir(folder)
            if f.startswith("shard-")
        )
        return (n - w * shard_rows) / (times[-1] - times[0])

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ref = export_features(minilm_path(), ds, os.path.join(tmp, "one"), **kw)
        rows.append(("export_features (1 process)", time.perf_counter() - t, steady(ref.path, 1)))
        t = time.perf_counter()
        ray.init(
            num_cpus=max(workers) + 1,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
        )
        started = time.perf_counter() - t
        for w in workers:
            t = time.perf_counter()
            store = extract(minilm_path(), ds, os.path.join(tmp, f"ray{w}"), num_workers=w, **kw)
            name = f"distributed.extract, {w} worker{'s' if w > 1 else ''}"
            rows.append((name, time.perf_counter() - t, steady(store.path, w)))
            x, xr = store.load()[0], ref.load()[0]
            assert store.info["computed"] == list(range(len(store.manifest["shards"])))
            torch.testing.assert_close(x, xr, atol=1e-5, rtol=1e-5)
        ray.shutdown()
    print(
        f"\nMiniLM-L6 features of {n} drug reviews to a feature store ({tokens} real tokens, "
        f"max_length {max_length}, batch 32, {-(-n // shard_rows)} shards of {shard_rows}), "
        f"{os.cpu_count()} CPU cores, 1 torch thread per process"
    )
    print(
        f"{'path':<34} {'wall s':>7} {'samples/s':>10} {'tokens/s':>9} {'speed-up':>9} "
        f"{'steady samples/s':>17} {'speed-up':>9}"
    )
    for name, wall, rate in rows:
        print(
            f"{name:<34} {wall:>7.1f} {n / wall:>10.1f} {tokens / wall:>9.0f} "
            f"{rows[0][1] / wall:>8.2f}x {rate:>17.1f} {rate / rows[0][2]:>8.2f}x"
        )
    print(
        f"(one run each; wall: end to end with model loads, actor start-up and the driver's "
        f"fingerprint; steady: between the first and the last shard written; local Ray start "
        f"{started:.1f} s not included; all stores equal within 1e-5; load average "
        f"{os.getloadavg()[0]:.1f}; "
        f"numpy {np.__version__}, torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
