"""The diagonal linear layer as a differentiable op: ``y = x @ W.T + bias``.

``W`` is an ``(out_features, in_features) = (m, n)`` matrix stored as ``K`` wrap-around
diagonals (``offsets`` ``(K,)``, ``values`` ``(K, L)``, ``L = min(m, n)``; the convention
is described in `diagnet.sparse`). The three products of a linear layer map onto the
kernels of `diagnet.diag.dispatch`:

* forward:         ``y  = x @ W.T``                -> ``dispatch.forward``
* input gradient:  ``dx = dy @ W``                 -> ``dispatch.input_grad``
* value gradient:  ``dvalues[k, t] = (dy.T @ x)`` at position ``t`` of diagonal
  ``offsets[k]``                                   -> ``dispatch.value_grad``

(both gradients together -> ``dispatch.input_and_value_grad``, one pass over the batch; with
the bias gradient too -> ``dispatch.input_value_and_bias_grad``, the same pass)

and `diagonal_scores` gives the gradient norm of *every* diagonal (stored or not), which
mask-update steps of dynamic sparse training use to pick diagonals to grow; `diagonal_norms`
gives the same norms of a dense gradient formed elsewhere (summed across processes).
"""

from __future__ import annotations

from .. import backend, checks
from ..autograd import FLOAT_DTYPES, Function, Tensor, sum_rows
from ..diag import dispatch, validate
from .activation import bias_relu_kernels

__all__ = ["diag_linear", "diagonal_scores", "diagonal_norms", "DiagLinearFunction"]


class DiagLinearFunction(Function):
    """``y = x @ W.T (+ bias)`` for a diagonal ``W``; inputs ``(x, values[, bias])``.

    ``x`` is ``(..., n)`` and is flattened to ``(B, n)`` for the kernels; ``y`` is
    ``(..., m)``. ``offsets`` and ``shape = (m, n)`` are not inputs of the graph (they are
    not differentiable): they are given to the constructor, **already validated** (see
    `diagnet.diag.validate`). This is the hot path that layers call directly, validating
    their structure once when it changes; `diag_linear` validates every argument on each
    call.

    With ``relu=True`` the node is ``relu(x @ W.T + bias)``, the ReLU applied in the
    kernels' store pass (`diagnet.diag.dispatch.forward`): an MLP's linear layer and the
    ReLU after it in one node and one pass over the output. Its backward masks ``dy`` with
    ``y > 0`` (and sums the bias gradient) in one pass, as `diagnet.ops.activation.BiasReLU`
    does, before the products.
    """

    def __init__(self, offsets, shape, relu=False):
        # converted once here (int32 on the GPU) rather than by each of the three kernels
        self.offsets = dispatch.prepare_offsets(offsets)
        self.shape = shape
        self.relu = relu

    def forward(self, x, values, bias=None):
        xp = backend.get_array_module(x)
        m, n = self.shape
        self.x_shape = x.shape
        x2 = xp.ascontiguousarray(x.reshape(-1, n))
        values = xp.ascontiguousarray(values)
        # keep references (no copies) for backward; which grads are wanted is only known
        # once forward has returned
        self.save(x2, values)
        if self.offsets.shape[0] == 0:
            y = xp.zeros((x2.shape[0], m), dtype=x.dtype)
            if bias is not None:
                y += bias
            if self.relu:
                y *= y > 0
        else:
            # the bias and the ReLU are applied by the kernel (in its store pass on the CPU)
            y = dispatch.forward(x2, self.offsets, values, m, bias, self.relu)
        if self.relu:
            self.y = y  # the backward's mask is y > 0
        return y.reshape(tuple(x.shape[:-1]) + (m,))

    def backward(self, gy):
        x2, values = self.saved
        xp = backend.get_array_module(gy)
        m, n = self.shape
        gy2 = xp.ascontiguousarray(gy.reshape(-1, m))
        needs = self.needs_input_grad
        want_bias = len(needs) > 2 and needs[2]
        empty = self.offsets.shape[0] == 0
        gx = gv = gb = None
        if self.relu:
            gy2, gb = _relu_grad(self.y, gy2, want_bias)
        if needs[0] and needs[1] and not empty and want_bias and gb is None:
            # all three from one pass over the batch (on the CPU; three calls on the GPU)
            gx, gv, gb = dispatch.input_value_and_bias_grad(gy2, x2, self.offsets, values)
        elif needs[0] and needs[1] and not empty:
            # both from one pass over the batch (on the CPU; two kernel calls on the GPU)
            gx, gv = dispatch.input_and_value_grad(gy2, x2, self.offsets, values)
        else:
            if needs[0]:
                gx = (xp.zeros((gy2.shape[0], n), dtype=gy.dtype) if empty
                      else dispatch.input_grad(gy2, self.offsets, values, n))
            if needs[1]:
                gv = (xp.zeros(values.shape, dtype=gy.dtype) if empty
                      else dispatch.value_grad(gy2, x2, self.offsets))
        if gx is not None:
            gx = gx.reshape(self.x_shape)
        if want_bias and gb is None:
            gb = sum_rows(gy2)
        return (gx, gv) if len(needs) == 2 else (gx, gv, gb)


def _relu_grad(y, gy, want_bias):
    """``(gy * (y > 0), its sum over rows or None)`` for ``y``, ``gy`` ``(B, m)``: one pass
    of the bias + ReLU kernels where they apply (`bias_relu_kernels`), else composed."""
    kernels = bias_relu_kernels(y)
    if kernels is not None:
        return kernels.bias_relu_grad(y, gy, want_bias)
    gz = gy * (y > 0)
    return gz, (sum_rows(gz) if want_bias else None)


def _as_tensor(a, ref_dtype=None, xp=None, name="argument"):
    """A Tensor for ``a``: Tensors as they are, arrays wrapped as constants.

    A non-Tensor float array keeps its dtype (so a mismatch is reported, not hidden); other
    array-likes (lists, ints) take ``ref_dtype``, the framework's rule for constants.
    """
    if isinstance(a, Tensor):
        return a
    arr = validate.as_array(a, name, xp)
    if arr.dtype.kind != "f" and ref_dtype is not None:
        arr = arr.astype(ref_dtype)
    return Tensor.from_array(arr)


def diag_linear(x, offsets, values, shape, bias=None):
    """``y = x @ W.T + bias`` for the diagonal weight ``W = (offsets, values)`` of ``shape``.

    Args:
        x: Tensor ``(..., in_features)``; the leading dims are flattened into one batch
            for the kernels and restored in the output. Float32 or float64.
        offsets: ``(K,)`` integer backend array, sequence or Tensor: the stored diagonals,
            sorted, unique, in ``[0, P)`` with ``P = max(out_features, in_features)``.
            Not differentiable.
        values: Tensor ``(K, L)``, ``L = min(out_features, in_features)``, usually a
            parameter with ``requires_grad=True``; same dtype as ``x``.
        shape: ``(out_features, in_features)``, the full shape of ``W``. Both are needed:
            ``values`` fixes only ``min(m, n)``, so ``x``'s width is checked against
            ``in_features`` rather than trusted.
        bias: Tensor ``(out_features,)`` of the same dtype, or ``None``.

    Returns:
        Tensor ``(..., out_features)`` with the dtype of ``x``. Gradients flow to ``x``,
        ``values`` and ``bias`` (only those that require grad are computed).

    Every argument is validated on each call; for offsets on the GPU that is one device
    reduction and a host synchronisation. A layer that calls this in a loop should validate
    its offsets once and apply `DiagLinearFunction` directly.

    Raises:
        ValueError: a shape does not fit (``x``'s last dim is not ``in_features``, ``values``
            not ``(K, L)``, bad ``offsets``, ``bias`` not ``(out_features,)``) or the
            arguments are on different devices.
        TypeError: ``shape`` not a pair of ints; non-float or mismatched dtypes; non-integer
            ``offsets``.
    """
    if checks.is_integer(shape):
        raise TypeError(f"diag_linear: shape must be the weight's full shape "
                        f"(out_features, in_features); got the int {shape!r}")
    m, n = validate.validate_shape(shape, "shape (out_features, in_features)")
    vref = backend.unwrap(values)
    xp = backend.get_array_module(vref, x)
    values = _as_tensor(values, xp=xp, name="values")
    x = _as_tensor(x, ref_dtype=values.dtype, xp=xp, name="x")
    if bias is not None:
        bias = _as_tensor(bias, ref_dtype=values.dtype, xp=xp, name="bias")
    # a sequence of offsets (no device of its own) is placed on the device of values below
    offsets_arr = backend.unwrap(offsets)
    validate.check_same_device(x=x.data, values=values.data,
                               bias=None if bias is None else bias.data,
                               offsets=offsets_arr if backend.is_array(offsets_arr) else None)
    if x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"diag_linear: x must have shape (..., in_features) = (..., {n}) for "
                         f"a weight of shape {(m, n)}; got x of shape {x.shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"diag_linear: x must be float32 or float64; got dtype {x.dtype}")
    offsets = validate.validate_offsets(offsets_arr, (m, n), "offsets", xp=xp)
    validate.validate_values(values.data, (m, n), offsets.shape[0], "values")
    if x.dtype != values.dtype:
        raise TypeError(f"diag_linear: x has dtype {x.dtype} but values has dtype "
                        f"{values.dtype}; cast one with .astype() so that they match")
    inputs = [x, values]
    if bias is not None:
        if bias.dtype != values.dtype:
            raise TypeError(f"diag_linear: bias has dtype {bias.dtype} but values has dtype "
                            f"{values.dtype}; cast one with .astype() so that they match")
        if bias.shape != (m,):
            raise ValueError(f"diag_linear: bias must have shape (out_features,) = ({m},); "
                             f"got {bias.shape}")
        inputs.append(bias)
    return DiagLinearFunction(offsets, (m, n))(*inputs)


def diagonal_scores(x, dy, out_features=None):
    """The L2 norm of the weight gradient ``dy.T @ x`` on each of the ``P`` diagonals.

    ``G[p] = sqrt(sum_t (dy.T @ x)[r_p(t), c_p(t)] ** 2)`` for every ``p`` in ``[0, P)``,
    stored or not: the signal dynamic sparse training uses to choose diagonals to grow.
    Note the argument order ``(x, dy)`` (like the layer), the reverse of
    ``dispatch.diagonal_scores(dy, x)``.

    Args:
        x: ``(..., in_features)`` layer input, a backend array or Tensor (not tracked).
        dy: ``(..., out_features)`` gradient of the loss with respect to the layer output,
            with the same leading dims; same dtype and device as ``x``.
        out_features: optional check of ``dy.shape[-1]``.

    Returns:
        Backend array ``(P,)``, ``P = max(out_features, in_features)``, dtype of ``x``.
        It forms the dense ``(m, n)`` gradient, so it is meant for occasional mask updates.
    """
    xa = _as_tensor(x, name="x").data
    da = _as_tensor(dy, name="dy").data
    validate.check_same_device(x=xa, dy=da)
    if xa.ndim == 0 or da.ndim == 0 or tuple(xa.shape[:-1]) != tuple(da.shape[:-1]):
        raise ValueError(f"diagonal_scores: x (..., in_features) and dy (..., out_features) "
                         f"must share their leading dims; got x {tuple(xa.shape)} and dy "
                         f"{tuple(da.shape)}")
    if out_features is not None:
        out_features = validate.check_positive_int(out_features, "out_features")
        if da.shape[-1] != out_features:
            raise ValueError(f"diagonal_scores: dy must have shape (..., out_features) = "
                             f"(..., {out_features}); got {tuple(da.shape)}")
    validate.validate_shape((int(da.shape[-1]), int(xa.shape[-1])), "(out_features, in_features)")
    for name, a in (("x", xa), ("dy", da)):
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"diagonal_scores: {name} must be float32 or float64; got dtype "
                            f"{a.dtype}")
    if xa.dtype != da.dtype:
        raise TypeError(f"diagonal_scores: x has dtype {xa.dtype} but dy has dtype "
                        f"{da.dtype}; cast one with .astype() so that they match")
    xp = backend.get_array_module(xa)
    x2 = xp.ascontiguousarray(xa.reshape(-1, xa.shape[-1]))
    d2 = xp.ascontiguousarray(da.reshape(-1, da.shape[-1]))
    return dispatch.diagonal_scores(d2, x2)


def diagonal_norms(w):
    """The L2 norm of a dense ``(m, n)`` matrix on each of its ``P`` wrap-around diagonals.

    ``out[p] = sqrt(sum_t w[r_p(t), c_p(t)] ** 2)`` for every ``p`` in ``[0, P)``, in the
    convention of `diag_linear`: `diagonal_scores` is ``diagonal_norms(dy.T @ x)``. Use it
    where the dense gradient ``dy.T @ x`` is formed, or changed, before the scores, e.g.
    summed across the processes of data-parallel training.

    Args:
        w: ``(out_features, in_features)`` float32 or float64 backend array or Tensor (not
            tracked), or a nested sequence of numbers.

    Returns:
        Backend array ``(P,)``, ``P = max(m, n)``, with ``w``'s dtype, on ``w``'s device.
    """
    wa = _as_tensor(w, name="w").data
    if wa.ndim != 2:
        raise ValueError(f"diagonal_norms: w must be a 2-d (out_features, in_features) "
                         f"matrix; got shape {tuple(wa.shape)}")
    validate.validate_shape(tuple(int(s) for s in wa.shape), "diagonal_norms: w's shape")
    if wa.dtype not in FLOAT_DTYPES:
        raise TypeError(f"diagonal_norms: w must be float32 or float64; got dtype {wa.dtype}")
    return dispatch.diagonal_norms(wa)
