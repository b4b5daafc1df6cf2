"""Latency measurement: compiled Keras forward passes and interleaved timing.

Timings belong in benchmarks, never in pass/fail tests. Candidates are measured
interleaved (each round in a shuffled order) after a warm-up, so a noisy neighbour slows
them alike.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import keras
import numpy as np

__all__ = ["Timing", "keras_forward", "interleaved_timings"]


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms, "repeats": self.repeats}


def keras_forward(model: keras.Model) -> Callable[[Sequence[np.ndarray]], object]:
    """A compiled inference call of `model` (tf.function or jax.jit) that returns numpy
    arrays, so the time includes the work, not just its dispatch."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda *a: model(list(a) if len(a) > 1 else a[0], training=False))
    elif backend == "jax":
        import jax

        fn = jax.jit(lambda *a: model(list(a) if len(a) > 1 else a[0], training=False))
    else:
        def fn(*a):
            return model(list(a) if len(a) > 1 else a[0], training=False)

    def run(arrays: Sequence[np.ndarray]):
        return keras.tree.map_structure(np.asarray, fn(*arrays))

    return run


def interleaved_timings(
    candidates: Mapping[str, Callable[[], object]], *, repeats: int = 30, warmup: int = 3, seed: int = 0
) -> dict[str, Timing]:
    """Time each zero-argument callable `repeats` times, interleaved in a shuffled order
    each round, after `warmup` rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    rng = random.Random(seed)
    for _ in range(repeats):
        # A new order each round (seeded): a fixed order would always run a candidate
        # right after the same neighbour (caches, frequency, allocator state).
        rng.shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: Timing(statistics.median(t), min(t), max(t), len(t)) for name, t in samples.items()
    }
