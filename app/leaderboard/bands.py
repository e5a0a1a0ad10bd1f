"""Rank bands and the Pareto front: the leaderboard's statistics, in numpy alone (no database, no torch).

A rank band says which differences on the board the test set can tell apart. Two entries share a rank
unless a paired bootstrap over the half's test images (and over seed positions, for entries trained with
more than one seed) finds one significantly better than the other:

    rank[e] = 1 + the number of entries significantly better than e

so a board reads 1, 1, 1, 4, 5, 5, ...: the first three are not separable from each other, the fourth is
worse than all three. Within a rank the board's order is a tie-break, not a finding.

The per-image data is each run's `run_logits.correct`: np.packbits(argmax(logits) == labels) over the
whole test set, in test-set order. `unpack` cuts one half's images out of it and `seed_matrix` stacks an
entry's runs into the (k, n) matrix `band_ranks` takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TEST = "paired-bootstrap-one-sided"
RESAMPLES = 1000
ALPHA = 0.05
SEED = 0

# Bytes per chunk of work: the (rows, n) float32 correctness block of the matrix product and the
# (entries, candidates, resamples) bool comparison block of the pairwise test.
_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BandMethod:
    """How the bands were computed, for the API to show next to them."""

    test: str
    alpha: float
    resamples: int
    seed: int


@dataclass(frozen=True)
class Bands:
    """Per entry, in the order `band_ranks` was given them.

    rank:   1 + the number of entries significantly better (entries without data: 1 + the number with a
            strictly higher mean).
    tie:    another entry has the same rank.
    banded: the entry had per-image data, so its rank comes from the test rather than from its mean alone.
    """

    rank: list[int]
    tie: list[bool]
    banded: list[bool]
    method: BandMethod


def unpack(correct: bytes, rows: int, idx: np.ndarray) -> np.ndarray:
    """One run's per-image correctness restricted to one half: a bool vector, one value per index of `idx`
    (the half's indices into the test set, e.g. from split_public_private(rows); anything np.asarray takes)."""
    packed = np.frombuffer(correct, dtype=np.uint8)
    if packed.size != (rows + 7) // 8:
        raise ValueError(f"{packed.size} bytes of packed correctness do not hold {rows} test images")
    return np.unpackbits(packed, count=rows).astype(bool)[np.asarray(idx)]


def seed_matrix(corrects: Sequence[bytes | None], rows: int, idx: np.ndarray) -> np.ndarray | None:
    """An entry's runs (one per seed position, in seed order) as the (k, n) matrix band_ranks takes; None
    when any run has no per-image data: a matrix of some seeds would not be the entry its mean describes."""
    if not corrects or any(c is None for c in corrects):
        return None
    return np.stack([unpack(c, rows, idx) for c in corrects])


def band_ranks(means: Sequence[float] | np.ndarray, correct: Sequence[np.ndarray | None], *,
               resamples: int = RESAMPLES, alpha: float = ALPHA, seed: int = SEED) -> Bands:
    """Rank bands of E entries from a paired bootstrap over the test images of one half.

    means[e]:   entry e's accuracy on the half (the mean over its seeds), the board's score.
    correct[e]: a (k_e, n) bool matrix, row s = whether seed position s classified each of the half's n
                images correctly (same images, same column order, for every entry), or None when the entry
                has no per-image data. A 1-D vector is one seed.

    The bootstrap is paired: every entry is scored on the same resamples. Resample b draws n images with
    replacement (multinomial counts w_b, shared by all entries) and, for an entry with k_e > 1 rows, k_e
    seed positions with replacement; position j of resample b is floor(u[j, b] * k_e) for one shared table
    of uniforms u, so entries with the same k draw the same positions and every k is drawn uniformly. Then

        acc[e, b] = mean over the drawn positions s of (correct[e, s] . w_b) / n

    A is significantly better than B when means[A] > means[B] and the one-sided bootstrap p-value
    p = (1 + #{b : acc[A, b] - acc[B, b] <= 0}) / (resamples + 1) is below alpha. Only entries with data
    are tested and counted. An entry without data gets rank 1 + the number of entries (all of them) with a
    strictly higher mean, and counts toward no one's rank: nothing shows it significantly better.

    Deterministic for the same input, seed and numpy version. Every partial sum of the product is a whole
    number of at most k * n hits, which float32 holds exactly, so BLAS's summation order cannot change a
    comparison. Cost: one (sum of k_e, n) x (n, resamples) float32 product and about E^2 / 2 x resamples
    comparisons; ~1-3 s for 1,000 entries on 5,000 images with 1,000 resamples (bench/bands.py).
    """
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 1 or len(correct) != means.size:
        raise ValueError("means and correct need one value per entry")
    if not np.isfinite(means).all():
        raise ValueError("every entry needs a finite mean")
    if resamples < 1 or not 0 < alpha < 1:
        raise ValueError("resamples must be >= 1 and alpha in (0, 1)")
    banded = np.array([c is not None for c in correct], dtype=bool)
    mats = {e: _as_matrix(c) for e, c in enumerate(correct) if c is not None}
    widths = {m.shape[1] for m in mats.values()}
    if len(widths) > 1:
        raise ValueError(f"entries disagree on the number of images: {sorted(widths)}")

    # The fallback, 1 + the number of strictly higher means; overwritten for the banded entries.
    rank = 1 + means.size - np.searchsorted(np.sort(means), means, side="right")
    if mats:
        n = widths.pop()
        k_max = max(m.shape[0] for m in mats.values())
        rng = np.random.default_rng(seed)
        weights = _image_weights(rng, n, resamples)  # drawn first: the same whatever the entries' k
        uniforms = rng.random((k_max, resamples))
        order = np.array(sorted(mats, key=lambda e: -means[e]), dtype=np.intp)
        acc = _resampled_accuracy([mats[e] for e in order], weights, uniforms)
        rank[order] = 1 + _significantly_better(means[order], acc, resamples, alpha)
    rank_list = [int(r) for r in rank]
    counts: dict[int, int] = {}
    for r in rank_list:
        counts[r] = counts.get(r, 0) + 1
    return Bands(rank=rank_list, tie=[counts[r] > 1 for r in rank_list], banded=banded.tolist(),
                 method=BandMethod(test=TEST, alpha=alpha, resamples=resamples, seed=seed))


def pareto_front(accuracy: Sequence[float | None], hours: Sequence[float | None]) -> list[bool]:
    """Which entries are on the accuracy (max) / GPU-hours (min) front: an entry is, unless another has
    >= accuracy and <= hours with at least one of the two strict. Equal entries are both on it. An entry
    with no accuracy or no hours is not on the front and dominates nothing."""
    if len(accuracy) != len(hours):
        raise ValueError("accuracy and hours need one value per entry")
    on = [False] * len(accuracy)
    known = sorted((i for i, (a, h) in enumerate(zip(accuracy, hours, strict=True))
                    if a is not None and h is not None and not (math.isnan(a) or math.isnan(h))),
                   key=lambda i: hours[i])
    # Sweep by hours: an entry is dominated by a cheaper one with >= accuracy, or by one as cheap with more.
    best_cheaper = -math.inf
    start = 0
    while start < len(known):
        end = start
        while end < len(known) and hours[known[end]] == hours[known[start]]:
            end += 1
        group = known[start:end]
        best_here = max(accuracy[i] for i in group)
        for i in group:
            on[i] = accuracy[i] > best_cheaper and accuracy[i] == best_here
        best_cheaper = max(best_cheaper, best_here)
        start = end
    return on


# ----------------------------------------------------------------------------------------------------
# The bootstrap
# ----------------------------------------------------------------------------------------------------


def _as_matrix(c: np.ndarray) -> np.ndarray:
    m = np.asarray(c, dtype=bool)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"per-image correctness must be a non-empty (seeds, images) matrix, got {m.shape}")
    return m


def _image_weights(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(n, resamples) float32: how often each image is drawn in each resample. Multinomial(n, 1/n) counts,
    made by counting n uniform draws per resample (the same distribution, far faster than rng.multinomial),
    a block of resamples at a time; the blocks draw the same stream as one (resamples, n) call."""
    weights = np.empty((n, resamples), dtype=np.float32)
    step = max(1, _CHUNK_BYTES // (16 * n))  # the int64 draws and their counts
    for s in range(0, resamples, step):
        m = min(step, resamples - s)
        draws = rng.integers(0, n, size=(m, n))
        draws += np.arange(m)[:, None] * n
        weights[:, s:s + m] = np.bincount(draws.ravel(), minlength=m * n).reshape(m, n).T
    return weights


def _resampled_accuracy(mats: list[np.ndarray], weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """(E, resamples) float32: acc[e, b] of each matrix, in order. Entries with the same k go through the
    matrix product together, a chunk of rows at a time so memory stays bounded at any E."""
    n, resamples = weights.shape
    acc = np.empty((len(mats), resamples), dtype=np.float32)
    by_k: dict[int, list[int]] = {}
    for e, m in enumerate(mats):
        by_k.setdefault(m.shape[0], []).append(e)
    for k, entries in by_k.items():
        pos = np.floor(uniforms[:k] * k).astype(np.intp)  # (k, resamples): the seed positions drawn
        step = max(1, _CHUNK_BYTES // (4 * n * k))
        for s in range(0, len(entries), step):
            chunk = entries[s:s + step]
            rows = np.concatenate([mats[e] for e in chunk]).astype(np.float32)
            hits = (rows @ weights).reshape(len(chunk), k, resamples)  # correct images drawn, per seed row
            drawn = np.take_along_axis(hits, np.broadcast_to(pos, hits.shape), axis=1)
            acc[chunk] = drawn.sum(axis=1) / np.float32(k * n)
    return acc


def _significantly_better(means: np.ndarray, acc: np.ndarray, resamples: int, alpha: float) -> np.ndarray:
    """For entries sorted by mean (descending), how many entries are significantly better than each.

    Only entries with a strictly higher mean are candidates, and in this order they are a prefix: each
    chunk of entries compares against the prefix above its lowest member, about E^2 / 2 pairs in all."""
    n_entries = means.size
    above = np.searchsorted(-means, -means, side="left")  # entries with a strictly higher mean
    better = np.zeros(n_entries, dtype=np.int64)
    step = max(1, _CHUNK_BYTES // (max(1, int(above[-1])) * resamples))
    for s in range(0, n_entries, step):
        rows = slice(s, min(n_entries, s + step))
        top = int(above[rows.stop - 1])
        if top == 0:
            continue
        # not_worse[i, j] = #{b : acc[j, b] - acc[i, b] <= 0}, i.e. acc[j, b] <= acc[i, b]
        not_worse = np.count_nonzero(acc[None, :top] <= acc[rows, None], axis=-1)
        p = (1 + not_worse) / (resamples + 1)
        candidate = np.arange(top)[None, :] < above[rows, None]
        better[rows] = np.count_nonzero((p < alpha) & candidate, axis=1)
    return better
