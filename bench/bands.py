"""Rank bands at board size: app.leaderboard.bands.band_ranks for 1,000 entries on the public half (5,000
images) of a 10,000-image test set, 1,000 resamples, with k = 1 and k = 3 seeds per entry.

Data: a synthetic board with the structure that matters for the test. Every image has a difficulty and
every entry a skill (accuracies from ~60% to ~95%, most of them crowded near the top, as on a real board),
and each seed adds its own noise, so entries miss the same hard images and the paired test has something
to pair. Each run's correctness is stored as the app stores it (np.packbits over the whole test set) and
cut to the public half of worker.engine.evaluate.split_public_private with bands.seed_matrix, as the board
refresh does. That unpacking is timed separately.

band_ranks: the median wall time of --rounds calls, and the peak of the memory it allocates itself
(tracemalloc, in one more untimed call: numpy's arrays, not OpenBLAS's internal buffers; the inputs are
already allocated and not counted).

Baseline, measured in the same run and alternating with it: the straightforward numpy version of the same
test, that is each entry's resampled accuracies by fancy-indexing its rows with the resampled image indices
(no matrix product), then a Python loop over the pairs with mean A > mean B, each a vectorised count over
the resamples. It runs on the first --sub entries of the board (by id, so a cross-section of it); its two
parts are timed apart and scaled to the full board (the per-entry part by E / sub, the pair loop by the
ratio of pair counts). It draws the same resamples (the same seed, in the documented order), so its ranks
on that sub-board must equal band_ranks' on the same entries: the bench checks it.

Also printed: a plain float32 matmul of the same size as band_ranks' product (all seed rows x images @
images x resamples), the floor under any matrix-product approach.

    .venv/bin/python bench/bands.py [--quick] [--entries 1000] [--images 10000] [--seeds 1,3]

Targets (this bench's own): band_ranks >= 5x faster than the baseline, and well under 10 s at 1,000
entries. Nothing is asserted on time; the script exits 0 unless the sub-board's ranks disagree.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import _common as c
import numpy as np

from app.leaderboard.bands import band_ranks, seed_matrix
from worker.engine.evaluate import split_public_private

TARGET = 5.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 entries, 2,000 images: checks that the bench works")
    p.add_argument("--entries", type=int, default=1000)
    p.add_argument("--images", type=int, default=10_000, help="test-set size (the public half is half of it)")
    p.add_argument("--seeds", default="1,3", help="seeds per entry, one board per value")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--sub", type=int, default=100, help="entries the baseline runs on")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.entries, args.images, args.sub, args.rounds = 200, 2000, 40, 1
    public = split_public_private(args.images)[0].numpy()
    print(f"[setup] {args.entries} entries, {args.images:,}-image test set (public half {public.size:,}), "
          f"{args.resamples} resamples; {c.load_note()}")
    rows, ratios = [], []
    for k in (int(s) for s in args.seeds.split(",")):
        row = _bench(k, public, args)
        rows.append(row)
        ratios.append(row["baseline_s"] / row["bands_s"])
    print()
    print(c.table(["k", "unpack s", "band_ranks s", "peak MiB", "matmul s", "bands/matmul", "baseline s",
                   "baseline/bands", "distinct ranks"],
                  [[r["k"], r["unpack_s"], r["bands_s"], r["peak_mib"], r["matmul_s"], r["bands_s"] / r["matmul_s"],
                    r["baseline_s"], r["baseline_s"] / r["bands_s"], r["distinct"]] for r in rows]))
    worst = min(ratios)
    slowest = max(r["bands_s"] for r in rows)
    print(f"RATIO baseline/band_ranks = {worst:.1f}x at {args.entries} entries (slowest k: band_ranks {slowest:.2f} s; "
          f"target >= {TARGET:.0f}x): {c.verdict(worst >= TARGET)}")


def _bench(k: int, public: np.ndarray, args: argparse.Namespace) -> dict:
    packed, means = _board(args.entries, k, args.images, public)
    t = time.perf_counter()
    correct = [seed_matrix(runs, args.images, public) for runs in packed]
    unpack_s = time.perf_counter() - t

    sub = list(range(min(args.sub, args.entries)))
    bands_s, base_parts = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        full = band_ranks(means, correct, resamples=args.resamples)
        bands_s.append(time.perf_counter() - t)
        ranks, per_entry_s, pairs_s, pairs = _baseline([means[e] for e in sub], [correct[e] for e in sub],
                                                       args.resamples)
        base_parts.append((per_entry_s, pairs_s))
        print(f"[k={k} round {r + 1}] band_ranks {bands_s[-1]:.2f} s; baseline on {len(sub)} entries: "
              f"per-entry {per_entry_s:.2f} s + {pairs:,} pairs {pairs_s:.2f} s; {c.load_note()}", flush=True)
    expected = band_ranks([means[e] for e in sub], [correct[e] for e in sub], resamples=args.resamples).rank
    if ranks != expected:
        raise SystemExit(f"k={k}: the baseline's ranks on the sub-board differ from band_ranks': "
                         f"{ranks[:20]} vs {expected[:20]}")

    tracemalloc.start()
    band_ranks(means, correct, resamples=args.resamples)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    product = np.ones((args.entries * k, public.size), dtype=np.float32)
    weights = np.ones((public.size, args.resamples), dtype=np.float32)
    t = time.perf_counter()
    product @ weights
    matmul_s = time.perf_counter() - t

    full_pairs = _pairs(means)
    scale_entry = args.entries / len(sub)
    baseline_s = c.median(e * scale_entry + p * full_pairs / max(1, pairs) for e, p in base_parts)
    return {"k": k, "unpack_s": unpack_s, "bands_s": c.median(bands_s), "peak_mib": peak / 2**20,
            "matmul_s": matmul_s, "baseline_s": baseline_s, "distinct": len(set(full.rank))}


def _board(entries: int, k: int, images: int, public: np.ndarray) -> tuple[list[list[bytes]], list[float]]:
    """Packed correctness of every run (as run_logits.correct stores it) and each entry's public mean."""
    rng = np.random.default_rng(1234 + k)
    difficulty = rng.normal(size=images)
    # Most skills near the top of the board, a long tail below (~60% to ~95% accuracy).
    skill = 2.3 - 2.0 * rng.beta(1.0, 4.0, size=entries)
    packed, means = [], []
    for e in range(entries):
        seed_skill = skill[e] + rng.normal(0, 0.05, size=(k, 1))
        hits = seed_skill - difficulty[None, :] + rng.normal(0, 0.6, size=(k, images)) > 0
        packed.append([np.packbits(row).tobytes() for row in hits])
        means.append(float(hits[:, public].mean()))
    return packed, means


def _baseline(means: list[float], correct: list[np.ndarray], resamples: int,
              seed: int = 0) -> tuple[list[int], float, float, int]:
    """The straightforward version, drawing what band_ranks draws: ranks, per-entry seconds, pair seconds,
    pairs tested."""
    n = correct[0].shape[1]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, n, size=(resamples, n))
    uniforms = rng.random((max(m.shape[0] for m in correct), resamples))
    t = time.perf_counter()
    acc = []
    for m in correct:
        k = m.shape[0]
        per_seed = np.stack([row[images].sum(axis=1) for row in m])  # (k, resamples): each seed row's hits
        pos = np.floor(uniforms[:k] * k).astype(int)
        acc.append(per_seed[pos, np.arange(resamples)].sum(axis=0) / (k * n))
    per_entry_s = time.perf_counter() - t
    t = time.perf_counter()
    better = [0] * len(means)
    pairs = 0
    for b in range(len(means)):
        for a in range(len(means)):
            if means[a] > means[b]:
                pairs += 1
                p = (1 + np.count_nonzero(acc[a] - acc[b] <= 0)) / (resamples + 1)
                better[b] += p < 0.05
    pairs_s = time.perf_counter() - t
    return [1 + x for x in better], per_entry_s, pairs_s, pairs


def _pairs(means: list[float]) -> int:
    """Pairs with mean A > mean B: the ones the test runs on."""
    m = np.sort(np.asarray(means))
    return int(np.searchsorted(m, m, side="left").sum())


if __name__ == "__main__":
    main()
