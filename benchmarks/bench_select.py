"""Wall time and peak memory of layer selection.

Prints a table for (N, L, D, k) = (256, 12, 768, 3), (1000, 12, 768, 4),
(2000, 24, 1024, 4), (4000, 32, 2048, 8) on the CPU and (8192, 32, 4096, 8) on
a GPU (bf16 input already on the device). Each configuration runs in a fresh
process so peak memory is its own. ``--published`` also times a transcription
of the published algorithm (float32, as it computes) on the smaller cases, so
the speed-up is measured in the same run.

    python benchmarks/bench_select.py                 # CPU table
    python benchmarks/bench_select.py --device cuda   # GPU row(s)
    python benchmarks/bench_select.py --published     # + published-algorithm timings
    python benchmarks/bench_select.py --repeats 5     # median of 5 fresh processes per row

Peak memory is the process's peak resident memory (CPU) or
``torch.cuda.max_memory_allocated`` (GPU) above what the input itself takes,
shown as a multiple of the input's float32 size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CPU_CASES = [(256, 12, 768, 3), (1000, 12, 768, 4), (2000, 24, 1024, 4), (4000, 32, 2048, 8)]
GPU_CASES = [(1000, 12, 768, 4), (8192, 32, 4096, 8)]
HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(n: int, l: int, d: int, k: int, device: str, preset: str) -> dict:
    import resource

    import torch

    from loes import select_layers_from_custom_embeddings

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    warm = torch.randn(64, 3, 16, generator=g)
    if device == "cuda":
        x = torch.randn(n, l, d, generator=g, dtype=torch.float32).to(
            device=device, dtype=torch.bfloat16
        )
        select_layers_from_custom_embeddings(warm.cuda(), y[:64], k=2, show_progress=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        x = torch.randn(n, l, d, generator=g)
        select_layers_from_custom_embeddings(warm, y[:64], k=2, show_progress=False)
        base = _rss_bytes()
    kw = {"preset": preset} if preset in ("robust", "reference") else {}
    t0 = time.perf_counter()
    if preset == "published":
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from published_loes import published_loes

        published_loes(x, y, k, dtype=torch.float32)
        timings = {}
    else:
        res = select_layers_from_custom_embeddings(x, y, k=k, show_progress=False, **kw)
        timings = res.timings
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"wall": wall, "peak": max(peak, 0), "input_fp32": 4 * n * l * d, "timings": timings}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--published", action="store_true", help="also time the published algorithm (slow)"
    )
    ap.add_argument("--cases", default=None, help="e.g. 1000x12x768x4,256x12x768x3")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh processes per row; the row with the median wall time is shown",
    )
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="robust", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process
        n, l, d, k = map(int, args.case.split("x"))
        print(json.dumps(run_case(n, l, d, k, args.device, args.preset)))
        return
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES
    if args.cases:
        cases = [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]
    import torch

    print(
        f"# loes bench_select  device={args.device}  torch={torch.__version__}  threads={torch.get_num_threads()}"
    )
    if args.device == "cuda":
        print(f"# gpu: {torch.cuda.get_device_name(0)}")
    header = f"| {'N':>5} | {'L':>3} | {'D':>5} | {'k':>2} | {'method':<22} | {'wall s':>8} | {'prep s':>7} | {'select s':>8} | {'peak MB':>8} | {'peak/input':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for n, l, d, k in cases:
        methods = ["robust", "reference"]
        if args.published and n * l * d <= 1000 * 12 * 768:
            methods.append("published")
        if args.device == "cuda" or n * l * d > 2000 * 24 * 1024:
            methods = ["robust"]
        for method in methods:
            cmd = [
                sys.executable,
                __file__,
                "--case",
                f"{n}x{l}x{d}x{k}",
                "--device",
                args.device,
                "--preset",
                method,
            ]
            runs = []
            for _ in range(max(1, args.repeats) if method == "robust" else 1):
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    break
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if out.returncode != 0:
                print(
                    f"| {n:>5} | {l:>3} | {d:>5} | {k:>2} | {method:<22} | failed: {out.stderr.strip().splitlines()[-1][:60]}"
                )
                continue
            r = sorted(runs, key=lambda run: run["wall"])[len(runs) // 2]
            t = r["timings"]
            name = {
                "robust": "loes robust",
                "reference": "loes reference",
                "published": "published algorithm",
            }[method]
            print(
                f"| {n:>5} | {l:>3} | {d:>5} | {k:>2} | {name:<22} | {r['wall']:>8.3f} | {t.get('prepare', float('nan')):>7.3f} | "
                f"{t.get('select', float('nan')):>8.3f} | {r['peak'] / 2**20:>8.1f} | {r['peak'] / r['input_fp32']:>10.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
