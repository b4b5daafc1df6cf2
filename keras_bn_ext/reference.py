"""The numpy reference of batch normalization: the oracle of the layer's tests.

`batch_norm` keeps the seed notebook's signature and behaviour (2-D dense inputs
normalized over the batch, 4-D NCHW conv inputs normalized per channel over
N, H and W) and generalizes it with a keyword-only `axis`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batch_norm"]


def _channel_axis(ndim: int, axis: int | None) -> int:
    if axis is None:
        if ndim not in (2, 4):
            raise ValueError(
                "Without `axis`, batch_norm takes 2-D (N, C) or 4-D NCHW inputs "
                f"as the seed did. Pass axis= for other ranks. Received: ndim={ndim}"
            )
        return 1
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"Argument `axis` is out of range for an input of rank {ndim}. "
            f"Received: axis={axis}"
        )
    return axis % ndim


def batch_norm(
    is_training,
    X,
    gamma,
    beta,
    running_mean,
    running_var,
    eps,
    momentum,
    *,
    axis: int | None = None,
):
    """Batch normalization in numpy, as in the seed notebook.

    Args:
        is_training: If true, normalize with the batch statistics (biased
            variance) and update the running statistics; else normalize with
            the running statistics.
        X: Input array. Without `axis`: 2-D (N, C) or 4-D (N, C, H, W).
        gamma: Scale, one value per channel (any shape holding C values, such
            as the seed's (1, C, 1, 1)), or None for no scale.
        beta: Offset, like `gamma`, or None for no offset.
        running_mean: Running mean, like `gamma`.
        running_var: Running variance, like `gamma`.
        eps: Added to the variance before the square root.
        momentum: Weight of the old running statistics:
            `new = momentum * old + (1 - momentum) * batch`.
        axis: Keyword-only. The channel axis; statistics are taken over every
            other axis. Default None: the seed's rule (axis 1 for 2-D and
            4-D inputs).

    Returns:
        `(Y, running_mean, running_var)`: the output, in X's dtype, and the
        new running statistics in the shapes they were given.
    """
    X = np.asarray(X)
    ch = _channel_axis(X.ndim, axis)
    channels = X.shape[ch]
    bshape = [1] * X.ndim
    bshape[ch] = channels
    reduce_axes = tuple(i for i in range(X.ndim) if i != ch)

    def per_channel(value, default):
        if value is None:
            return np.full(bshape, default, dtype=np.float64)
        return np.asarray(value, dtype=np.float64).reshape(bshape)

    x = X.astype(np.float64)
    moving_mean = per_channel(running_mean, 0.0)
    moving_var = per_channel(running_var, 1.0)
    if not is_training:
        mean, var = moving_mean, moving_var
        new_mean, new_var = moving_mean, moving_var
    else:
        mean = x.mean(axis=reduce_axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=reduce_axes, keepdims=True)
        new_mean = momentum * moving_mean + (1.0 - momentum) * mean
        new_var = momentum * moving_var + (1.0 - momentum) * var
    x_hat = (x - mean) / np.sqrt(var + eps)
    y = per_channel(gamma, 1.0) * x_hat + per_channel(beta, 0.0)

    def like(new, old):
        return new.reshape(np.shape(old)) if old is not None else new.reshape(-1)

    out_dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    return (
        y.astype(out_dtype),
        like(new_mean, running_mean),
        like(new_var, running_var),
    )
