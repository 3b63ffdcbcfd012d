"""`DiagMatrix`: the class that stores a matrix as ``K`` of its wrap-around diagonals.

The format itself is described in the package docstring (`diagnet.sparse`); the SciPy
conversions behind `DiagMatrix.to_scipy` and `DiagMatrix.from_scipy` are in
`scipy_format.py`. Arrays live on one device, as NumPy (CPU) or CuPy (GPU) arrays chosen
through `diagnet.backend`; products use the kernels picked by `diagnet.diag.dispatch`.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import random as _random
from ..checks import FLOAT_DTYPES, float_dtype
from ..diag import dispatch, layout
from ..diag.validate import (as_array, check_same_device, resolve_num_diagonals,
                            validate_offsets, validate_shape, validate_values)
from . import scipy_format

__all__ = ["DiagMatrix"]


class DiagMatrix:
    """An ``(m, n)`` matrix that stores ``K`` of its ``P = max(m, n)`` wrap-around diagonals.

    See the `diagnet.sparse` package docstring for the convention. Position ``t`` of
    diagonal ``p`` is entry ``((t + p) % m, t)`` when ``m >= n`` and ``(t, (t + p) % n)``
    when ``m < n``.

    Args:
        offsets: ``(K,)`` integer array (NumPy, CuPy, a sequence, or a Tensor), sorted,
            unique, each in ``[0, P)``. Stored as C-contiguous int64.
        values: ``(K, L)`` float32/float64 array, ``L = min(m, n)``; ``values[k, t]`` is
            position ``t`` of diagonal ``offsets[k]``. Kept as given (not copied, unless
            ``copy=True`` or it has to be made contiguous).
        shape: ``(m, n)``, two positive ints.
        check_finite: raise `ValueError` if ``values`` holds NaN or infinity (off by
            default: the check is a full pass over the values).
        copy: copy ``values`` (and ``offsets``) instead of referencing them.

    Raises:
        TypeError / ValueError naming the argument, what was expected and what was given.

    A sequence given for ``offsets`` or ``values`` is placed on the device of the other
    argument; two arrays on different devices are an error.
    """

    # Make NumPy/CuPy arrays return NotImplemented from ``x @ self`` so that Python calls
    # `__rmatmul__` instead of turning this object into an object array.
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, offsets, values, shape, *, check_finite=False, copy=False):
        shape = validate_shape(shape)
        offsets, values = backend.unwrap(offsets), backend.unwrap(values)
        if backend.is_array(offsets) and backend.is_array(values):
            check_same_device(offsets=offsets, values=values)
        xp = None
        for a in (values, offsets):
            if backend.is_array(a):
                xp = backend.get_array_module(a)
                break
        offsets = validate_offsets(offsets, shape, "offsets", xp)
        values = validate_values(values, shape, offsets.shape[0], "values", xp)
        xp = backend.get_array_module(values)
        if copy:
            offsets = offsets.copy()
            values = xp.array(values, copy=True, order="C")
        else:
            values = xp.ascontiguousarray(values)
        if check_finite and values.size and not bool(xp.isfinite(values).all()):
            bad = int(values.size - int(xp.isfinite(values).sum()))
            raise ValueError(f"values must be finite (check_finite=True); got {bad} NaN or "
                             "infinite entries")
        self._shape = shape
        self._offsets = offsets
        self._values = values

    @classmethod
    def _trusted(cls, offsets, values, shape):
        """Build without validation (arguments produced by this module)."""
        obj = cls.__new__(cls)
        obj._shape = shape
        obj._offsets = offsets
        obj._values = values
        return obj

    # -- attributes
    @property
    def shape(self):
        """``(m, n)``."""
        return self._shape

    @property
    def offsets(self):
        """``(K,)`` int64 backend array of the stored diagonals, sorted."""
        return self._offsets

    @property
    def values(self):
        """``(K, L)`` float backend array; ``values[k, t]`` is position ``t`` of ``offsets[k]``."""
        return self._values

    @property
    def dtype(self):
        """The dtype of ``values`` (float32 or float64)."""
        return self._values.dtype

    @property
    def device(self):
        """``"cpu"`` or ``"cuda"``."""
        return backend.device_of(self._values)

    @property
    def K(self) -> int:
        """Number of stored diagonals."""
        return int(self._offsets.shape[0])

    @property
    def P(self) -> int:
        """Number of diagonals of the full matrix, ``max(m, n)``."""
        return layout.num_diagonals(self._shape)

    @property
    def L(self) -> int:
        """Length of every diagonal, ``min(m, n)``."""
        return layout.diagonal_length(self._shape)

    @property
    def nnz(self) -> int:
        """Number of stored entries, ``K * L`` (explicit zeros included)."""
        return self.K * self.L

    @property
    def density(self) -> float:
        """Fraction of diagonals (equivalently of entries) stored: ``K / P``."""
        return self.K / self.P

    @property
    def sparsity(self) -> float:
        """``1 - density``."""
        return 1.0 - self.density

    @property
    def ndim(self) -> int:
        return 2

    def __repr__(self):
        m, n = self._shape
        return (f"DiagMatrix(shape=({m}, {n}), K={self.K}, P={self.P}, L={self.L}, "
                f"density={self.density:.4g}, dtype={self.dtype}, device='{self.device}')")

    # -- conversion
    def _xp(self):
        return backend.get_array_module(self._values)

    def coordinates(self):
        """Row and column index arrays ``(K, L)`` int64 of every stored entry (same device)."""
        return layout.diagonal_coordinates(self._shape, self._offsets, self._xp())

    def to_dense(self):
        """The full ``(m, n)`` backend array (same device and dtype), zeros off the diagonals."""
        xp = self._xp()
        out = xp.zeros(self._shape, dtype=self.dtype)
        if self.K:
            rows, cols = self.coordinates()
            out[rows, cols] = self._values  # the diagonals are disjoint: no collisions
        return out

    def to_scipy(self, format="csr"):  # noqa: A002 - SciPy's own word
        """A SciPy sparse array (on the CPU) with the same entries.

        Args:
            format: ``"csr"``, ``"coo"`` (``K * L`` stored entries, explicit zeros kept) or
                ``"dia"``. SciPy's DIA offset ``d`` holds the entries ``(i, i + d)`` and its
                ``data[k, j]`` is the entry in column ``j``; a wrap-around diagonal ``p``
                becomes up to two SciPy diagonals: ``-p`` and ``m - p`` (tall/square) or
                ``p`` and ``p - n`` (wide).

        Returns:
            ``scipy.sparse.csr_array``, ``coo_array`` or ``dia_array`` of shape ``(m, n)``
            and this matrix's dtype.
        """
        fmt = str(format).lower()
        if fmt not in ("csr", "coo", "dia"):
            raise ValueError(f"format must be one of 'csr', 'coo', 'dia'; got {format!r}")
        return scipy_format.to_scipy(backend.to_numpy(self._offsets),
                                     backend.to_numpy(self._values), self._shape, fmt)

    @property
    def T(self) -> "DiagMatrix":
        """The transpose, shape ``(n, m)``, as a `DiagMatrix`.

        Non-square: the same ``offsets`` and ``values`` arrays (shared, not copied): the
        convention is symmetric under transposition. Square ``n x n``: diagonal ``p`` becomes
        ``(n - p) % n`` with ``values_T[k', t] = values[k, (t - p) % n]`` (new arrays).
        """
        m, n = self._shape
        if m != n:
            return DiagMatrix._trusted(self._offsets, self._values, (n, m))
        xp = self._xp()
        new = (n - self._offsets) % n                      # offset of each old diagonal
        order = xp.argsort(new)                            # new offsets must be sorted
        new_offsets = xp.ascontiguousarray(new[order])
        old_p = self._offsets[order].reshape(-1, 1)
        t = xp.arange(n, dtype=xp.int64).reshape(1, -1)
        idx = (t - old_p) % n                              # values_T[k', t] = values[k, t - p]
        new_values = xp.take_along_axis(self._values[order], idx, axis=1)
        return DiagMatrix._trusted(new_offsets, xp.ascontiguousarray(new_values), (n, m))

    def to(self, device) -> "DiagMatrix":
        """This matrix on ``device`` (``"cpu"`` or ``"cuda"``); ``self`` when already there."""
        name = backend.resolve_device(device)
        if name == self.device:
            return self
        return DiagMatrix._trusted(backend.to_device(self._offsets, name),
                                   backend.to_device(self._values, name), self._shape)

    def astype(self, dtype, copy=True) -> "DiagMatrix":
        """The matrix with values cast to ``dtype`` (float32/float64); offsets are shared.

        With ``copy=False`` and the same dtype, ``self`` is returned.
        """
        dt = float_dtype(dtype)
        if dt == self.dtype and not copy:
            return self
        return DiagMatrix._trusted(self._offsets, self._values.astype(dt, copy=True),
                                   self._shape)

    def copy(self) -> "DiagMatrix":
        """A deep copy (new offsets and values arrays)."""
        return DiagMatrix._trusted(self._offsets.copy(), self._values.copy(), self._shape)

    # -- construction
    @classmethod
    def from_dense(cls, W, sparsity=None, k=None) -> "DiagMatrix":
        """Keep the ``K`` wrap-around diagonals of ``W`` with the largest L2 norm.

        Args:
            W: ``(m, n)`` float32/float64 backend array (or Tensor, or nested list); the
                result is on its device and has its dtype.
            sparsity: target sparsity in ``[0, 1]``; ``K = max(1, ceil((1 - s) P))``.
            k: number of diagonals to keep, in ``[1, P]``. Give at most one of ``sparsity``
                and ``k``; with neither all ``P`` diagonals are kept (a lossless conversion).

        Ties in the norm are broken towards the lowest offset; norms are compared as float64
        sums of squares. Diagonals whose norm is NaN rank last.
        """
        W = as_array(backend.unwrap(W), "W")
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D (m, n); got shape {tuple(W.shape)}")
        if W.dtype not in FLOAT_DTYPES:
            raise TypeError(f"W must be float32 or float64; got dtype {W.dtype}")
        shape = validate_shape(tuple(int(s) for s in W.shape), "W.shape")
        K = resolve_num_diagonals(shape, sparsity, k)
        xp = backend.get_array_module(W)
        P = layout.num_diagonals(shape)
        rows, cols = layout.diagonal_coordinates(shape, xp.arange(P), xp)
        diags = W[rows, cols]                                        # (P, L)
        sq = backend.to_numpy((diags.astype(np.float64) ** 2).sum(axis=1))
        sq = np.where(np.isnan(sq), -np.inf, sq)                     # NaN ranks last
        # lexsort: last key is primary; descending norm, then ascending offset
        order = np.lexsort((np.arange(P), -sq))
        keep = np.sort(order[:K])
        keep_dev = xp.asarray(keep.astype(np.int64))
        return cls._trusted(xp.ascontiguousarray(keep_dev),
                            xp.ascontiguousarray(diags[keep_dev]), shape)

    @classmethod
    def from_scipy(cls, A, offsets=None, dtype=None) -> "DiagMatrix":
        """The `DiagMatrix` of a SciPy sparse matrix or array (any format) or a NumPy array.

        Every entry ``(i, j)`` lies on exactly one wrap-around diagonal (``p = (i - j) % m``
        when ``m >= n``, ``p = (j - i) % n`` otherwise), so any matrix converts; the result
        stores the diagonals that hold at least one non-zero (zeros inside them are kept as
        values). Explicitly stored zeros count as zeros, duplicate COO entries are summed and
        NaN counts as a non-zero. A sparse input is read through its COO coordinates: nothing
        of size ``m * n`` is built.

        Args:
            A: a ``scipy.sparse`` matrix or array of shape ``(m, n)``, or a 2-D NumPy array;
                float, integer or bool entries.
            offsets: the diagonals to store (sorted, unique ints in ``[0, P)``); every
                non-zero of ``A`` must lie on one of them. Default: the diagonals holding a
                non-zero.
            dtype: float32 or float64; default ``A``'s dtype when it is one of them, else
                float64.

        Returns:
            A `DiagMatrix` of shape ``(m, n)`` on the CPU (move it with `to`).

        Raises:
            TypeError: ``A`` is neither sparse nor a NumPy array, or holds complex or object
                entries; ``dtype`` is not float32/float64.
            ValueError: ``A`` is not 2-D or has an empty side; with ``offsets``, a non-zero
                of ``A`` off them (the message names the first one, in row-major order).
        """
        dt = None if dtype is None else float_dtype(dtype)
        rows, cols, vals, shape = scipy_format.nonzero_triples(A)
        if dt is None:
            dt = vals.dtype if vals.dtype in FLOAT_DTYPES else np.dtype(np.float64)
        p, t = layout.diagonal_of(shape, rows, cols)
        if offsets is None:
            offsets = np.unique(p)
        else:
            offsets = backend.to_numpy(validate_offsets(backend.unwrap(offsets), shape))
            scipy_format.check_on_offsets(p, rows, cols, vals, offsets, shape)
        values = np.zeros((offsets.size, layout.diagonal_length(shape)), dtype=dt)
        values[np.searchsorted(offsets, p), t] = vals
        return cls._trusted(np.ascontiguousarray(offsets, dtype=np.int64), values, shape)

    @classmethod
    def random(cls, shape, sparsity=None, k=None, rng=None, dtype=np.float32,
               device=None) -> "DiagMatrix":
        """A matrix with ``K`` distinct random diagonals and uniform random values.

        Args:
            shape: ``(m, n)``.
            sparsity, k: how many diagonals to keep, as in `from_dense` (neither: all).
            rng: ``None`` (fresh entropy), an int seed, or a ``numpy.random.Generator``.
                Everything is drawn on the CPU in float64 and then cast and moved, so a seed
                gives the same matrix on every device (up to the dtype's rounding).
            dtype: float32 (default) or float64.
            device: ``"cpu"``/``"cuda"``; default `diagnet.backend.default_device()`.

        The offsets are a uniformly random ``K``-subset of ``range(P)``, sorted. The values
        are ``Uniform(-b, b)`` with ``b = 1 / sqrt(fan_in)``, the bound PyTorch's
        ``nn.Linear`` uses, where ``fan_in = max(1, K * L / m)`` is the mean number of stored
        entries per row of ``W`` (the inputs that feed one output): ``K`` for wide and square
        matrices, ``K * n / m`` for tall ones.
        """
        shape = validate_shape(shape)
        dt = float_dtype(dtype)
        K = resolve_num_diagonals(shape, sparsity, k)
        gen = np.random.default_rng() if rng is None else _random.as_generator(rng)
        m, n = shape
        P, L = max(m, n), min(m, n)
        offsets = np.sort(gen.choice(P, size=K, replace=False)).astype(np.int64)
        bound = 1.0 / math.sqrt(max(1.0, K * L / m))
        values = gen.uniform(-bound, bound, size=(K, L)).astype(dt)
        name = backend.resolve_device(device)
        return cls._trusted(backend.to_device(offsets, name), backend.to_device(values, name),
                            shape)

    # -- products
    def _check_operand(self, x, what):
        x = _unwrap_operand(x, what)
        if backend.device_of(x) != self.device:
            raise ValueError(f"{what}: the operand is on {backend.device_of(x)} but the "
                             f"DiagMatrix is on {self.device}; move one with .to(device)")
        if x.dtype != self.dtype:
            raise TypeError(f"{what}: the operand has dtype {x.dtype} but the DiagMatrix has "
                            f"dtype {self.dtype}; cast one with .astype()")
        return x

    def rmatmul(self, x):
        """``x @ self`` for ``x`` of shape ``(..., m)`` (or ``(m,)``); returns ``(..., n)``.

        With ``W`` an ``(out, in)`` weight, ``x @ W.T`` is the layer's forward pass and
        ``dy @ W`` its input gradient; both run the diagonal kernels without forming a dense
        matrix. ``x`` must be a NumPy/CuPy array with this matrix's dtype and device.
        """
        x = self._check_operand(x, "x @ DiagMatrix")
        m, n = self._shape
        if x.ndim == 0 or x.shape[-1] != m:
            raise ValueError(f"x @ DiagMatrix: x must have shape (..., {m}) for a DiagMatrix "
                             f"of shape {self._shape}; got {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        xp = self._xp()
        x2 = xp.ascontiguousarray(x.reshape(-1, m))
        if self.K == 0:
            out = xp.zeros((x2.shape[0], n), dtype=self.dtype)
        else:
            # x @ D is the input-gradient product dy @ W with W = D
            out = dispatch.input_grad(x2, self._offsets, self._values, n)
        return out.reshape(lead + (n,))

    def matmul(self, x):
        """``self @ x`` for ``x`` of shape ``(n,)``, ``(n, j)`` or ``(..., n, j)``.

        Returns ``(m,)``, ``(m, j)`` or ``(..., m, j)``: NumPy's ``@`` rules with a 2-D left
        operand. ``x`` must be a NumPy/CuPy array with this matrix's dtype and device.
        """
        x = self._check_operand(x, "DiagMatrix @ x")
        m, n = self._shape
        vec = x.ndim == 1
        if x.ndim == 0 or (x.shape[0] if vec else x.shape[-2]) != n:
            raise ValueError(f"DiagMatrix @ x: x must have shape ({n},) or (..., {n}, j) for a "
                             f"DiagMatrix of shape {self._shape}; got {tuple(x.shape)}")
        xp = self._xp()
        xt = x.reshape(1, n) if vec else xp.swapaxes(x, -1, -2)   # (..., j, n)
        lead = tuple(xt.shape[:-1])
        x2 = xp.ascontiguousarray(xt.reshape(-1, n))
        if self.K == 0:
            out = xp.zeros((x2.shape[0], m), dtype=self.dtype)
        else:
            # D @ x = (x.T @ D.T).T, and x.T @ D.T is the forward product with W = D
            out = dispatch.forward(x2, self._offsets, self._values, m)
        out = out.reshape(lead + (m,))
        return out.reshape(m) if vec else xp.swapaxes(out, -1, -2)

    def __matmul__(self, other):
        if isinstance(other, DiagMatrix):
            return NotImplemented
        return self.matmul(other)

    def __rmatmul__(self, other):
        if isinstance(other, DiagMatrix):
            return NotImplemented
        return self.rmatmul(other)


def _unwrap_operand(x, what):
    if backend.unwrap(x) is not x:
        raise TypeError(f"{what}: got a diagnet Tensor; DiagMatrix products work on NumPy/CuPy "
                        "arrays (use diagnet.functional.diag_linear for a differentiable "
                        "product)")
    if not backend.is_array(x):
        raise TypeError(f"{what}: the operand must be a NumPy or CuPy array; got "
                        f"{type(x).__name__}")
    return x
