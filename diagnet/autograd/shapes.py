"""Shape and axis rules shared by the engine and the ops: which gradient shapes reduce to an
input's shape (broadcasting undone), how they are summed back, and the ``axis=``/``dim=``
argument pair.
"""

from __future__ import annotations


def reduces_to(grad_shape, shape) -> bool:
    """Whether a gradient of ``grad_shape`` is a broadcast of ``shape``: it may have extra
    leading axes, and axes where ``shape`` has size 1 may be longer; every other axis agrees."""
    lead = len(grad_shape) - len(shape)
    return lead >= 0 and all(s == 1 or g == s for g, s in zip(grad_shape[lead:], shape))


def sum_to(grad, shape):
    """Sum ``grad`` over broadcast dimensions so that it has ``shape``.

    ``grad.shape`` must broadcast-reduce to ``shape`` (see `reduces_to`); anything else is a
    `ValueError`, never a reshape that would scramble the gradient. Written with the
    array's own methods, so it works for NumPy and CuPy arrays alike.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    if not reduces_to(grad.shape, shape):
        raise ValueError(f"sum_to: a gradient of shape {grad.shape} cannot be summed to shape "
                         f"{shape} (only extra leading axes and size-1 axes are summed)")
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and grad.shape[i + lead] != 1
    )
    out = grad.sum(axis=axes, keepdims=True)
    return out.reshape(shape)  # drops the summed leading axes (all of size 1 now)


def axis_or_dim(name, axis, dim, default=None):
    """The axis argument of op ``name``, given as ``axis=`` or as PyTorch's ``dim=``.

    ``default`` when neither is given; `TypeError` when both are.
    """
    if dim is None:
        return default if axis is None else axis
    if axis is not None:
        raise TypeError(f"{name}: got axis={axis!r} and dim={dim!r}; dim is another name for "
                        "axis, pass one of them")
    return dim
