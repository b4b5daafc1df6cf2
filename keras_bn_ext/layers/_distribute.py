"""Cross-replica sums for `synchronized=True`: the only backend-specific code.

Under `tf.distribute` each replica sees its own slice of the batch, so the
statistics must be summed across replicas. Under JAX (`keras.distribution`)
a batch is one global array sharded by XLA, and statistics taken on it are
global already; there is nothing to do.
"""

from __future__ import annotations

import keras


def cross_replica_sum(tensors: list) -> list:
    """Sum each tensor over the replicas of the current `tf.distribute` replica context.

    Returns the tensors unchanged outside a distributed replica context, with one
    replica, or on a backend other than TensorFlow.
    """
    if keras.backend.backend() != "tensorflow":
        return tensors
    import tensorflow as tf  # only imported on the TensorFlow backend

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    return [ctx.all_reduce(tf.distribute.ReduceOp.SUM, t) for t in tensors]
