"""The numpy reference of batch normalization: the oracle of the layer's tests.

`batch_norm` keeps the seed notebook's signature and behaviour (2-D dense inputs
normalized over the batch, 4-D NCHW conv inputs normalized per channel over
N, H and W) and generalizes it with a keyword-only `axis`. `batch_renorm` is one
training step of batch renormalization (Ioffe 2017) as Keras 3 implements it;
`ghost_batch_norm` one training step of ghost batch normalization (Hoffer et al.
2017) as tf-keras 2.x implements `virtual_batch_size`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batch_norm", "batch_renorm", "ghost_batch_norm"]


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


def batch_renorm(
    X,
    gamma,
    beta,
    state: dict,
    *,
    axis: int = -1,
    eps: float,
    momentum: float,
    renorm_momentum: float,
    rmax: float | None = None,
    rmin: float | None = None,
    dmax: float | None = None,
):
    """One training step of batch renormalization, in float64.

    The batch is normalized with its own statistics, then corrected by
    r = clip(stddev / renorm_stddev) and d = clip((mean - renorm_mean) / renorm_stddev)
    (renorm_stddev at least sqrt(eps)): y = (x_hat * r + d) * gamma + beta.

    Args:
        X: Input array.
        gamma, beta: Scale and offset per channel, or None.
        state: {"moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
            "renorm_stddev"}, one value per channel each.
        axis: The channel axis.
        eps, momentum, renorm_momentum: As the layer's epsilon, momentum and
            renorm_momentum.
        rmax, rmin, dmax: The clipping of r and d (None: no clipping).

    Returns:
        `(Y, new_state)`. In inference a renorm BN is plain BN with moving_mean and
        moving_variance: use `batch_norm(False, ...)`.
    """
    X = np.asarray(X)
    ch = _channel_axis(X.ndim, axis)
    reduce_axes = tuple(i for i in range(X.ndim) if i != ch)
    bshape = [1] * X.ndim
    bshape[ch] = X.shape[ch]
    x = X.astype(np.float64)
    mean = x.mean(axis=reduce_axes)
    var = ((x - mean.reshape(bshape)) ** 2).mean(axis=reduce_axes)
    stddev = np.sqrt(var + eps)
    st = {k: np.asarray(v, np.float64).reshape(-1) for k, v in state.items()}
    renorm_stddev = np.maximum(st["renorm_stddev"], np.sqrt(eps))
    r = stddev / renorm_stddev
    d = (mean - st["renorm_mean"]) / renorm_stddev
    if rmin is not None:
        r = np.maximum(r, rmin)
    if rmax is not None:
        r = np.minimum(r, rmax)
    if dmax is not None:
        d = np.clip(d, -dmax, dmax)
    g = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64).reshape(-1)
    b = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64).reshape(-1)
    x_hat = (x - mean.reshape(bshape)) / stddev.reshape(bshape)
    y = (x_hat * r.reshape(bshape) + d.reshape(bshape)) * g.reshape(bshape) + b.reshape(bshape)
    moving_stddev = st["moving_stddev"] * momentum + stddev * (1.0 - momentum)
    new_state = {
        "renorm_mean": st["renorm_mean"] * renorm_momentum + mean * (1.0 - renorm_momentum),
        "renorm_stddev": st["renorm_stddev"] * renorm_momentum + stddev * (1.0 - renorm_momentum),
        "moving_mean": st["moving_mean"] * momentum + mean * (1.0 - momentum),
        "moving_stddev": moving_stddev,
        "moving_variance": np.maximum(moving_stddev**2 - eps, 0.0),
    }
    out_dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    return y.astype(out_dtype), new_state


def ghost_batch_norm(
    X,
    gamma,
    beta,
    running_mean,
    running_var,
    *,
    virtual_batch_size: int,
    axis: int = -1,
    eps: float,
    momentum: float,
):
    """One training step of ghost batch normalization, in float64, by a loop over the
    sub-batches (the layer reshapes instead).

    A batch of N is split into G = N / virtual_batch_size sub-batches the way tf-keras
    2.x splits it: sub-batch j holds samples j, j + G, j + 2G, ... Each is normalized
    with its own mean and biased variance; gamma and beta are shared. The running
    statistics are updated once, with the mean over the sub-batches of their means and
    of their variances.

    Returns:
        `(Y, running_mean, running_var)`, the statistics as 1-D arrays.
    """
    X = np.asarray(X)
    n = X.shape[0]
    if virtual_batch_size <= 0 or n % virtual_batch_size:
        raise ValueError(
            "virtual_batch_size must be positive and divide the batch size. "
            f"Received: virtual_batch_size={virtual_batch_size}, batch size={n}"
        )
    groups = n // virtual_batch_size
    ch = _channel_axis(X.ndim, axis)
    y = np.empty(X.shape, np.float64)
    means, variances = [], []
    for j in range(groups):
        index = np.arange(j, n, groups)
        out, mean, var = batch_norm(True, X[index].astype(np.float64), gamma, beta,
                                    np.zeros(X.shape[ch]), np.zeros(X.shape[ch]), eps, 0.0, axis=ch)
        y[index] = out
        means.append(mean)
        variances.append(var)
    mean, var = np.mean(means, axis=0), np.mean(variances, axis=0)
    old_mean = np.asarray(running_mean, np.float64).reshape(-1)
    old_var = np.asarray(running_var, np.float64).reshape(-1)
    out_dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    return (y.astype(out_dtype), momentum * old_mean + (1.0 - momentum) * mean,
            momentum * old_var + (1.0 - momentum) * var)
