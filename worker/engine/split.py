"""The public/private halving of a test set, without torch: the API computes the same halves as the engine
(worker.engine.evaluate.split_public_private wraps this) to band and export scores per half."""

from __future__ import annotations

import hashlib
from functools import lru_cache

SPLIT_SEED = 20240601


@lru_cache(maxsize=8)
def public_private_indices(n: int, seed: int = SPLIT_SEED) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A fixed pseudo-random halving of range(n): (public, private), each sorted ascending.

    The order is defined by BLAKE2b hashes of (seed, index) rather than by a library RNG, so the split
    never changes with a torch/numpy upgrade or across platforms: a competition's halves stay fixed for
    its lifetime. The public half gets n // 2 indices, the private half the rest.
    """
    if n < 0:
        raise ValueError("n must be >= 0")

    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()

    order = sorted(range(n), key=key)
    half = n // 2
    return tuple(sorted(order[:half])), tuple(sorted(order[half:]))
