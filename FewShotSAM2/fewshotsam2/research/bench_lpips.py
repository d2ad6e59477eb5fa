"""Benchmark: batched LPIPS matching (features once per image + matmuls) vs one lpips.LPIPS call per pair.

    python -m fewshotsam2.research.bench_lpips [--support 50] [--query 100] [--size 224] [--net alex] [--weights PATH]

prints a Markdown table. The naive run calls `lpips.LPIPS(a, b)` (the same module, same weights, same inputs)
for every (query, support) pair; when that would take longer than `max_naive_seconds`, it times the pairs done
by then and extrapolates linearly to all pairs (each pair costs the same: two backbone passes on fixed-size
images), and says so in the result.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np
import torch

from fewshotsam2.matching.lpips_distance import LPIPSDistance


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1] (timing does not depend on content; smooth keeps distances realistic)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, max(2, size // 16), max(2, size // 16), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return (x + 0.05 * torch.rand(n, size, size, generator=g)).clamp(0, 1)


def run_matching_benchmark(
    n_support: int = 50,
    n_query: int = 100,
    size: int = 224,
    net: str = "alex",
    weights: Optional[str] = None,
    device: str = "cpu",
    max_naive_seconds: float = 120.0,
    pair_batch: int = 16,
) -> dict:
    """Time batched matching against per-pair lpips calls on n_query x n_support pairs.

    Returns seconds for each (batched_s split into features_s and distances_s), naive_s (measured or
    extrapolated), naive_pairs_timed, naive_extrapolated, speedup = naive_s / batched_s, max_abs_diff
    between the two methods' distances on the pairs the naive run computed, and argmin_agrees on the query
    rows it completed. Also naive_batched_s / speedup_vs_batched_pairs: lpips.LPIPS called on batches of
    `pair_batch` pairs (features still recomputed for every pair), a stricter baseline than one call per pair.
    """
    dist = LPIPSDistance(net, backbone_weights=weights, device=device, size=size)
    support, query = _images(n_support, size, seed=1), _images(n_query, size, seed=2)

    def sync() -> None:  # CUDA runs asynchronously: wait before reading the clock
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)

    # warm-up so neither method pays one-off allocation / thread-pool / cuBLAS start-up
    warm = dist.features(support[:2])
    dist.match(warm, warm)
    sync()
    t0 = time.perf_counter()
    s_feats = dist.features(support)
    q_feats = dist.features(query)
    sync()
    t1 = time.perf_counter()
    d = dist.distance_matrix(q_feats, s_feats)
    idx, _ = dist.match(q_feats, s_feats)  # returns numpy: synchronises
    t2 = time.perf_counter()
    batched = d.cpu().numpy()

    xs, xq = dist.network_input(support), dist.network_input(query)
    total_pairs = n_support * n_query
    naive = np.full((n_query, n_support), np.nan)
    with torch.no_grad():
        dist.model(xq[:1], xs[:1])  # warm-up
        start = time.perf_counter()
        done = 0
        for i in range(n_query):
            for j in range(n_support):
                naive[i, j] = dist.model(xq[i : i + 1], xs[j : j + 1]).item()
                done += 1
                if time.perf_counter() - start > max_naive_seconds:
                    break
            else:
                continue
            break
        measured = time.perf_counter() - start
    naive_s = measured * total_pairs / done
    batched_s = t2 - t0

    # a stricter baseline: lpips.LPIPS still recomputes features per pair, but on batches of pairs
    pairs_i, pairs_j = np.divmod(np.arange(total_pairs), n_support)
    with torch.no_grad():
        start = time.perf_counter()
        done_b = 0
        for k in range(0, total_pairs, pair_batch):
            i, j = pairs_i[k : k + pair_batch], pairs_j[k : k + pair_batch]
            dist.model(xq[i], xs[j]).cpu()  # .cpu(): synchronises, like .item() above
            done_b += len(i)
            if time.perf_counter() - start > max_naive_seconds:
                break
        measured_b = time.perf_counter() - start
    naive_batched_s = measured_b * total_pairs / done_b
    computed = ~np.isnan(naive)
    return {
        "net": net,
        "size": size,
        "n_support": n_support,
        "n_query": n_query,
        "pairs": total_pairs,
        "device": str(dist.device),
        "threads": torch.get_num_threads(),
        "features_s": t1 - t0,
        "distances_s": t2 - t1,
        "batched_s": batched_s,
        "naive_s": naive_s,
        "naive_pairs_timed": done,
        "naive_extrapolated": done < total_pairs,
        "speedup": naive_s / batched_s,
        "pair_batch": pair_batch,
        "naive_batched_s": naive_batched_s,
        "naive_batched_pairs_timed": done_b,
        "speedup_vs_batched_pairs": naive_batched_s / batched_s,
        "max_abs_diff": float(np.abs(naive[computed] - batched[computed]).max()),
        "argmin_agrees": bool(
            np.array_equal(idx[: done // n_support], naive[: done // n_support].argmin(axis=1))
        ),
    }


def format_table(r: dict) -> str:
    naive_note = (
        f"extrapolated from {r['naive_pairs_timed']} of {r['pairs']} pairs"
        if r["naive_extrapolated"]
        else f"all {r['pairs']} pairs"
    )
    rows = [
        ("batched: features", f"{r['features_s']:.2f}", f"{r['n_support'] + r['n_query']} images, one pass each"),
        ("batched: distances + argmin", f"{r['distances_s']:.3f}", f"{r['pairs']} pairs, matmuls"),
        ("batched total", f"{r['batched_s']:.2f}", ""),
        ("naive lpips.LPIPS per pair", f"{r['naive_s']:.1f}", naive_note),
        ("speed-up vs per-pair calls", f"{r['speedup']:.0f}x", f"max abs difference {r['max_abs_diff']:.1e}"),
        (
            f"naive lpips.LPIPS, {r['pair_batch']} pairs per call",
            f"{r['naive_batched_s']:.1f}",
            f"extrapolated from {r['naive_batched_pairs_timed']} of {r['pairs']} pairs"
            if r["naive_batched_pairs_timed"] < r["pairs"]
            else f"all {r['pairs']} pairs",
        ),
        ("speed-up vs batched pairs", f"{r['speedup_vs_batched_pairs']:.0f}x", ""),
    ]
    head = (
        f"LPIPS matching, net={r['net']}, {r['size']}x{r['size']}, {r['n_query']} query x {r['n_support']} "
        f"support, device={r['device']}, torch threads={r['threads']}\n\n"
    )
    lines = ["| step | seconds | note |", "| --- | ---: | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return head + "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--support", type=int, default=50)
    p.add_argument("--query", type=int, default=100)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--net", default="alex")
    p.add_argument("--weights", default=None, help="backbone state dict (else FEWSHOTSAM2_LPIPS_WEIGHTS)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-naive-seconds", type=float, default=120.0, help="per baseline; then extrapolate")
    p.add_argument("--pair-batch", type=int, default=16)
    a = p.parse_args(argv)
    r = run_matching_benchmark(
        a.support, a.query, a.size, a.net, a.weights, a.device, a.max_naive_seconds, a.pair_batch
    )
    print(format_table(r))


if __name__ == "__main__":
    main()
