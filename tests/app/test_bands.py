"""Rank bands and the Pareto front (app.leaderboard.bands) on planted data whose bands are known by
construction. Pure numpy: no database."""

from __future__ import annotations

import numpy as np
import pytest

from app.leaderboard import bands
from app.leaderboard.bands import band_ranks, pareto_front, seed_matrix, unpack

N = 5000  # images in the half: a 10,000-image test set's public half


def planted(correct: int, *, order: int = 0, n: int = N) -> np.ndarray:
    """A correctness vector with exactly `correct` hits: the first `correct` images of a fixed shuffle.
    Vectors of the same `order` are nested (the one with more hits is right wherever the other is)."""
    v = np.zeros(n, dtype=bool)
    v[np.random.default_rng(order).permutation(n)[:correct]] = True
    return v


def entry(*rows: np.ndarray) -> tuple[float, np.ndarray]:
    m = np.stack(rows)
    return float(m.mean()), m


def ranks_of(*entries: tuple[float, np.ndarray | None], **kw) -> bands.Bands:
    return band_ranks([m for m, _ in entries], [c for _, c in entries], **kw)


# ----------------------------------------------------------------------------------------------------
# Bands
# ----------------------------------------------------------------------------------------------------


def test_clearly_different_entries_get_different_ranks():
    # 95% vs 90% vs 80%, each from its own shuffle (not nested): thousands of images apart.
    b = ranks_of(entry(planted(4750, order=1)), entry(planted(4500, order=2)), entry(planted(4000, order=3)))
    assert b.rank == [1, 2, 3]
    assert b.tie == [False, False, False]
    assert b.banded == [True, True, True]


def test_identical_predictions_share_a_rank():
    same = planted(4500)
    b = ranks_of(entry(planted(4000, order=1)), entry(same), entry(same.copy()))
    assert b.rank == [3, 1, 1]
    assert b.tie == [False, True, True]


def test_two_images_apart_is_a_tie():
    # B is right on two more images than A and nowhere worse: a resample misses both with p = e^-2 ~ 0.14.
    a, b = planted(4500), planted(4502)
    result = ranks_of(entry(b), entry(a))
    assert result.rank == [1, 1]
    assert result.tie == [True, True]


def test_bands_overlap_without_being_transitive():
    # Nested, 2 images apart each: neighbours are inseparable, but the ends are 4 apart (p ~ e^-4 ~ 0.02).
    b = ranks_of(entry(planted(4504)), entry(planted(4502)), entry(planted(4500)))
    assert b.rank == [1, 1, 2]
    assert b.tie == [True, True, False]


def test_equal_means_are_never_tested():
    # Same accuracy, different images: neither mean is higher, so neither can be significantly better.
    b = ranks_of(entry(planted(4500, order=1)), entry(planted(4500, order=2)))
    assert b.rank == [1, 1]


def test_seeds_that_disagree_are_not_significantly_better():
    steady = entry(planted(4550, order=1), planted(4550, order=2), planted(4550, order=3))  # 91%, 91%, 91%
    wild = entry(planted(4950, order=4), planted(4950, order=5), planted(4000, order=6))  # 99%, 99%, 80%
    consistent = entry(planted(4633, order=4), planted(4633, order=5), planted(4634, order=6))  # the same mean
    assert wild[0] == pytest.approx(consistent[0]) and wild[0] > steady[0]
    # On images alone wild's 1.7 points are many standard errors; but a resample that draws its bad seed
    # twice or more (7/27 of them) puts it below steady.
    assert ranks_of(wild, steady).rank == [1, 1]
    assert ranks_of(consistent, steady).rank == [1, 2]


def test_entries_with_different_seed_counts_are_compared():
    b = ranks_of(entry(planted(4750, order=1)),
                 entry(planted(4500, order=2), planted(4480, order=3)),
                 entry(planted(4000, order=4), planted(4010, order=5), planted(3990, order=6)))
    assert b.rank == [1, 2, 3]


def test_entries_without_data_rank_by_mean_and_count_for_no_one():
    x = (0.97, None)  # no per-image data, highest mean
    a = entry(planted(4750, order=1))  # 95%
    y = (0.85, None)
    c = entry(planted(4000, order=2))  # 80%
    b = ranks_of(x, a, y, c)
    # x: nothing above it. a: x is not counted (untested). y: 1 + two higher means. c: 1 + a.
    assert b.rank == [1, 1, 3, 2]
    assert b.tie == [True, True, False, False]
    assert b.banded == [False, True, False, True]


def test_without_any_data_the_ranks_are_the_means_order():
    b = band_ranks([0.9, 0.8, 0.9, 0.7], [None] * 4)
    assert b.rank == [1, 3, 1, 4]
    assert b.tie == [True, False, True, False]
    assert band_ranks([], []).rank == []


def test_deterministic_and_reports_its_method():
    entries = [entry(planted(4500 + i, order=i)) for i in range(6)]
    first = ranks_of(*entries, resamples=300, alpha=0.1, seed=7)
    assert ranks_of(*entries, resamples=300, alpha=0.1, seed=7) == first
    assert first.method == bands.BandMethod(test="paired-bootstrap-one-sided", alpha=0.1, resamples=300, seed=7)
    assert band_ranks([0.5], [None]).method == bands.BandMethod(
        test=bands.TEST, alpha=bands.ALPHA, resamples=bands.RESAMPLES, seed=bands.SEED)


def test_matches_the_definition(monkeypatch):
    """Against the docstring's definition, spelled out one resample and one pair at a time, with every
    chunk loop of the fast path taking several turns (entries of mixed seed counts, chunks of a few rows)."""
    monkeypatch.setattr(bands, "_CHUNK_BYTES", 4096)
    n, resamples, seed, alpha = 400, 200, 3, 0.05
    rng = np.random.default_rng(11)
    correct = [rng.random((k, n)) < p for k, p in
               [(1, 0.95), (3, 0.9), (2, 0.93), (1, 0.8), (3, 0.85), (1, 0.86), (2, 0.7), (3, 0.9), (1, 0.95)]]
    correct.insert(4, None)
    means = [0.85 if c is None else float(c.mean()) for c in correct]

    draw = np.random.default_rng(seed)
    images = draw.integers(0, n, size=(resamples, n))  # resample b's images
    u = draw.random((3, resamples))
    hits = {}  # entry -> per resample, hits summed over the drawn seed positions (exact integers)
    for e, c in enumerate(correct):
        if c is not None:
            k = c.shape[0]
            hits[e] = [sum(int(c[int(u[j, b] * k)][images[b]].sum()) for j in range(k)) for b in range(resamples)]

    def not_worse(a: int, b: int) -> int:  # #{r : acc[a, r] - acc[b, r] <= 0}, compared exactly
        ka, kb = correct[a].shape[0], correct[b].shape[0]
        return sum(ha * kb <= hb * ka for ha, hb in zip(hits[a], hits[b], strict=True))

    expected = []
    for e in range(len(correct)):
        if e not in hits:
            expected.append(1 + sum(m > means[e] for m in means))
            continue
        expected.append(1 + sum(means[a] > means[e] and (1 + not_worse(a, e)) / (resamples + 1) < alpha
                                for a in hits))
    got = band_ranks(means, correct, resamples=resamples, alpha=alpha, seed=seed)
    assert got.rank == expected
    assert len(set(expected)) >= 4, expected  # the planted board is not all one band


def test_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="number of images"):
        band_ranks([0.9, 0.8], [planted(90, n=100)[None], planted(80, n=101)[None]])
    with pytest.raises(ValueError, match="one value per entry"):
        band_ranks([0.9], [None, None])
    with pytest.raises(ValueError, match="finite"):
        band_ranks([float("nan")], [None])


# ----------------------------------------------------------------------------------------------------
# Per-image data
# ----------------------------------------------------------------------------------------------------


def test_unpack_cuts_one_half_out_of_the_packed_test_set():
    truth = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1], dtype=bool)  # 13 images: 2 bytes, 3 bits spare
    packed = np.packbits(truth).tobytes()
    idx = np.array([0, 1, 8, 12])
    assert unpack(packed, 13, idx).tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="do not hold"):
        unpack(packed, 17, idx)
    m = seed_matrix([packed, np.packbits(~truth).tobytes()], 13, idx)
    assert m.shape == (2, 4) and m.dtype == bool
    assert m[1].tolist() == [False, True, False, False]
    assert seed_matrix([packed, None], 13, idx) is None
    assert seed_matrix([], 13, idx) is None


# ----------------------------------------------------------------------------------------------------
# Pareto front and seed statistics
# ----------------------------------------------------------------------------------------------------


def test_pareto_front_keeps_the_undominated():
    acc = [0.90, 0.95, 0.85, 0.93, 0.80]
    hours = [1.0, 3.0, 2.0, 2.0, 0.5]
    # 0.85 @ 2 h is beaten by 0.90 @ 1 h; the others each trade accuracy for time.
    assert pareto_front(acc, hours) == [True, True, False, True, True]


def test_pareto_front_ties():
    # Equal in both: both on the front. Same hours, less accuracy: off. Same accuracy, more hours: off.
    assert pareto_front([0.9, 0.9], [1.0, 1.0]) == [True, True]
    assert pareto_front([0.9, 0.8], [1.0, 1.0]) == [True, False]
    assert pareto_front([0.9, 0.9], [1.0, 2.0]) == [True, False]
    assert pareto_front([], []) == []


def test_pareto_front_ignores_entries_it_cannot_place():
    # No hours (or no accuracy): off the front, and it does not push the entries it would beat off it.
    assert pareto_front([0.99, 0.9, None], [None, 1.0, 0.1]) == [False, True, False]
    assert pareto_front([0.9, float("nan")], [1.0, 0.5]) == [True, False]
