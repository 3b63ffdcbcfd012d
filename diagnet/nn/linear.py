"""Linear layers: dense `Linear` and diagonally sparse `DiagLinear`.

Both compute ``y = x @ W.T + b`` for ``W`` of shape ``(out_features, in_features) = (m, n)``.
`DiagLinear` stores ``W`` as ``K`` of its ``P = max(m, n)`` wrap-around diagonals:

* ``offsets`` (buffer, int64 ``(K,)``): which diagonals, sorted and unique in ``[0, P)``;
* ``values`` (parameter ``(K, L)``, ``L = min(m, n)``): ``values[k, t]`` is the entry at
  position ``t`` of diagonal ``offsets[k]``, that is row ``(t + p) % m``, column ``t`` when
  ``m >= n``, and row ``t``, column ``(t + p) % n`` when ``m < n`` (``p = offsets[k]``).

Every entry ``(i, j)`` of ``W`` lies on exactly one such diagonal, so ``K`` diagonals hold
``K * L`` numbers and the density is ``K / P``. Nothing of size ``m * n`` is ever built on
the training path: the forward and both gradients run on the diagonal kernels of
`diagnet.diag`.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .. import random as _random
from ..autograd import FLOAT_DTYPES, Tensor
from ..checks import positive_int
from ..diag import dispatch, layout, validate
from ..ops import dense as _dense
from ..ops.diagonal import DiagLinearFunction
from ..sparse import DiagMatrix
from . import init
from .module import Module
from .parameter import Parameter

__all__ = ["Linear", "DiagLinear", "make_linear", "LINEAR_KINDS"]

#: the values of the ``linear=`` argument of attention and of the models in `diagnet.models`
LINEAR_KINDS = ("dense", "diag")


def _dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64; got {dt}")
    return dt


class Linear(Module):
    """Dense ``y = x @ weight.T + bias``.

    Args:
        in_features, out_features: sizes ``n`` and ``m``.
        bias: learn a bias ``(m,)``.
        dtype: float32 (default) or float64. device: ``"cpu"``/``"cuda"`` (default device).
        rng: None (the default generator of `diagnet.random`), an int seed or a Generator.

    Initialisation is PyTorch's: weight and bias drawn from U(-1/sqrt(n), 1/sqrt(n)).
    """

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, device=None,
                 rng=None):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        dt, dev, gen = _dtype(dtype), backend.resolve_device(device), _random.as_generator(rng)
        bound = init.linear_bound(self.in_features)
        self.weight = Parameter(init.uniform_array((self.out_features, self.in_features), bound,
                                                   dt, dev, gen))
        if bias:
            self.bias = Parameter(init.uniform_array((self.out_features,), bound, dt, dev, gen))
        else:
            self.register_parameter("bias", None)

    def forward(self, x, add_bias=True):
        """``x`` ``(..., in_features)`` -> ``x @ weight.T + bias`` ``(..., out_features)``.

        ``add_bias=False`` leaves the bias out, for an op that adds it itself in its own pass
        (`F.bias_gelu`); forward hooks then see the output without the bias.
        """
        return _dense.linear(x, self.weight, self.bias if add_bias else None)

    @classmethod
    def from_diag(cls, layer: "DiagLinear") -> "Linear":
        """A dense layer holding the same ``W`` (densified) and bias as ``layer``."""
        if not isinstance(layer, DiagLinear):
            raise TypeError(f"layer must be a DiagLinear; got {type(layer).__name__}")
        out = cls.__new__(cls)
        Module.__init__(out)
        out.in_features, out.out_features = layer.in_features, layer.out_features
        out.weight = Parameter(layer.to_matrix().to_dense())
        if layer.bias is not None:
            out.bias = Parameter(layer.bias.data.copy())
        else:
            out.register_parameter("bias", None)
        return out

    def weight_stats(self):
        """``(stored, dense)`` entries of the weight matrix: ``(m*n, m*n)``."""
        n = self.out_features * self.in_features
        return n, n

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class DiagLinear(Module):
    """``y = x @ W.T + bias`` with ``W`` stored as ``K`` wrap-around diagonals.

    Args:
        in_features, out_features: sizes ``n`` and ``m`` of ``W`` (``m x n``).
        sparsity: target fraction of zeros in ``W``, a number in ``[0, 1]``;
            ``K = max(1, ceil((1 - sparsity) P))`` diagonals are kept. Ignored when
            ``offsets`` is given (it may then be None). The realised sparsity, ``1 - K / P``,
            is the `sparsity` property.
        bias: learn a bias ``(m,)``.
        offsets: the stored diagonals (sorted, unique ints in ``[0, P)``; an empty sequence
            gives ``K = 0``, ``W = 0``); default a uniformly random ``K``-subset drawn from
            ``rng``.
        rng: None (the default generator of `diagnet.random`), an int seed or a Generator;
            draws the offsets, then the values, then the bias.
        dtype: float32 (default) or float64. device: ``"cpu"``/``"cuda"`` (default device).

    Initialisation. A dense ``nn.Linear`` draws U(-1/sqrt(n), 1/sqrt(n)): each output sums
    ``n`` inputs, so its variance is ``n * 1/(3n) = 1/3`` of the inputs' second moment. Here
    an output sums only the entries of its row of ``W`` that are stored, ``K * L / m`` on
    average (exactly ``K`` when ``m <= n``). Values and bias are therefore drawn from
    U(-b, b) with ``b = 1 / sqrt(K * L / m)``: the bound a dense layer with that fan-in
    would use, which keeps the output variance of the dense layer. (Using the dense
    ``1/sqrt(n)`` would shrink activations by ``sqrt(density)`` per layer.)

    Attributes: ``offsets`` (buffer), ``values`` and ``bias`` (parameters); properties
    ``K``, ``P``, ``L``, ``shape``, ``nnz``, ``density``, ``sparsity``.

    Changing the stored diagonals goes through `set_offsets` only: it keeps the values of
    diagonals that stay, starts new ones as asked and remaps the per-row optimizer state.
    """

    def __init__(self, in_features, out_features, sparsity=0.9, bias=True, offsets=None,
                 rng=None, dtype=np.float32, device=None):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        m, n = self.out_features, self.in_features
        dt, dev, gen = _dtype(dtype), backend.resolve_device(device), _random.as_generator(rng)
        P = max(m, n)
        if offsets is None:
            sparsity = validate.check_sparsity(sparsity)
            host = np.sort(gen.choice(P, size=layout.diagonals_for_sparsity((m, n), sparsity),
                                      replace=False)).astype(np.int64)
        else:
            if sparsity is not None:  # ignored next to offsets, but never garbage
                validate.check_sparsity(sparsity)
            host = validate.validate_offsets(_on_host(offsets), (m, n))
        self.target_sparsity = sparsity if offsets is None else 1.0 - host.size / P
        self.register_buffer("offsets", Tensor.from_array(backend.to_device(host, dev)))
        bound = self.init_bound(host.size)
        self.values = Parameter(init.uniform_array((host.size, min(m, n)), bound, dt, dev, gen))
        if bias:
            self.bias = Parameter(init.uniform_array((m,), bound, dt, dev, gen))
        else:
            self.register_parameter("bias", None)
        self._prepared_from = None  # the offsets array that _prepared was made from
        self._prepared = None

    # ------------------------------------------------------------------ structure
    @property
    def shape(self):
        """``(out_features, in_features)``, the shape of ``W``."""
        return (self.out_features, self.in_features)

    @property
    def K(self) -> int:
        """Number of stored diagonals."""
        return int(self.offsets.shape[0])

    @property
    def P(self) -> int:
        """Number of possible diagonals, ``max(m, n)``."""
        return max(self.shape)

    @property
    def L(self) -> int:
        """Length of each diagonal, ``min(m, n)``."""
        return min(self.shape)

    @property
    def nnz(self) -> int:
        """Stored weight entries, ``K * L`` (explicit zeros included)."""
        return self.K * self.L

    @property
    def density(self) -> float:
        """Realised density of ``W``: ``K * L / (m * n) = K / P``."""
        return self.nnz / (self.out_features * self.in_features)

    @property
    def sparsity(self) -> float:
        """Realised sparsity of ``W``: ``1 - density``."""
        return 1.0 - self.density

    def init_bound(self, K=None) -> float:
        """The U(-b, b) bound of the initial values: ``1 / sqrt(K * L / m)`` (see the class doc)."""
        K = self.K if K is None else K
        return init.linear_bound(max(1.0, K * self.L / self.out_features))

    def _kernel_offsets(self):
        """The offsets in kernel form, validated and converted once per change of ``offsets``.

        Any path that replaces the offsets array (`set_offsets`, `load_state_dict`, `to`)
        gives a new array object, which is noticed here; the hot path then costs nothing.
        """
        data = self.offsets.data
        if self._prepared_from is not data:
            validate.validate_offsets(data, self.shape, "offsets")
            self._prepared = dispatch.prepare_offsets(data)
            self._prepared_from = data
        return self._prepared

    def forward(self, x, add_bias=True, relu=False):
        """``x`` ``(..., in_features)`` -> ``(..., out_features)``, on the diagonal kernels;
        ``add_bias=False`` leaves the bias out (as `Linear.forward`); ``relu=True`` returns
        ``relu(linear(x))``, the ReLU applied in the same pass and node (an MLP's hidden
        layer: `models.MLP` uses it)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"DiagLinear expects a Tensor; got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"DiagLinear: x's last dim must be in_features={self.in_features}; "
                             f"got x of shape {x.shape}")
        if type(relu) is not bool:
            raise TypeError(f"DiagLinear: relu must be a bool; got {type(relu).__name__}")
        fn = DiagLinearFunction(self._kernel_offsets(), self.shape, relu)
        bias = self.bias if add_bias else None
        return fn(x, self.values) if bias is None else fn(x, self.values, bias)

    def set_offsets(self, offsets, keep=True, init="zeros", rng=None):
        """Replace the stored diagonals: the one way to change a layer's structure.

        Args:
            offsets: the new diagonals, ``(K_new,)`` integers, sorted, unique, in ``[0, P)``
                (NumPy, CuPy, a sequence or a Tensor). ``K_new`` may differ from ``K``.
            keep: diagonals present before and after keep their values and their optimizer
                state (True); with False every diagonal starts afresh.
            init: how new diagonals start: ``"zeros"`` (dynamic sparse training's rule, so
                that growing does not change the function), ``"uniform"`` (the layer's
                initial distribution, drawn from ``rng``), or an array ``(K_new, L)`` whose
                rows at the new diagonals are used.
            rng: for ``init="uniform"``: None (default generator), int seed or Generator.

        Returns:
            NumPy int64 ``(K_new,)``: for each new diagonal, its row in the old ``values``,
            or -1 for a new one.

        Every optimizer that holds ``values`` remaps its per-row state in the same call
        (kept rows keep their moments, new rows start at zero), through
        `Parameter.remap_rows`. Validation of ``offsets`` happens here, once.
        """
        new = validate.validate_offsets(_on_host(offsets), self.shape)
        old = backend.to_numpy(self.offsets.data)
        pos = np.searchsorted(old, new)
        found = (pos < old.size) & (old[np.minimum(pos, max(old.size - 1, 0))] == new) \
            if old.size else np.zeros(new.size, dtype=bool)
        index = np.where(found & bool(keep), pos, -1).astype(np.int64)
        device, dtype = self.values.device, self.values.dtype
        if isinstance(init, str):
            if init == "zeros":
                new_rows = None
            elif init == "uniform":
                new_rows = _init_uniform(self, new.size, rng)
            else:
                raise ValueError(f"init must be 'zeros', 'uniform' or an array; got {init!r}")
        else:
            new_rows = validate.as_array(backend.unwrap(init), "init")
            if tuple(new_rows.shape) != (new.size, self.L):
                raise ValueError(f"init must have shape ({new.size}, {self.L}); got "
                                 f"{tuple(new_rows.shape)}")
            new_rows = backend.to_device(new_rows.astype(dtype, copy=False), device)
        self.values.remap_rows(backend.to_device(index, device), new_rows)
        self.offsets.data = backend.to_device(new, device)
        self._mark_prepared()  # validated above, on the host: no device check needed
        return index

    def _mark_prepared(self):
        self._prepared = dispatch.prepare_offsets(self.offsets.data)
        self._prepared_from = self.offsets.data

    def _check_state(self, local):
        if "offsets" in local:
            validate.validate_offsets(local["offsets"], self.shape, "offsets")

    def _state_loaded(self):
        self._mark_prepared()  # _check_state validated the loaded offsets

    # ------------------------------------------------------------------ conversions
    def to_matrix(self) -> DiagMatrix:
        """``W`` as a `DiagMatrix` sharing this layer's offsets and values arrays."""
        return DiagMatrix(self.offsets.data, self.values.data, self.shape)

    def to_dense(self) -> Tensor:
        """``W`` as a dense ``(m, n)`` Tensor (a copy, outside the graph)."""
        return Tensor.from_array(self.to_matrix().to_dense())

    @classmethod
    def from_dense(cls, linear, sparsity=0.9, k=None) -> "DiagLinear":
        """Keep the ``K`` diagonals of a dense layer's weight with the largest L2 norm.

        Args:
            linear: an `nn.Linear` (its weight's dtype and device are kept, the bias copied).
            sparsity: target sparsity (``K = max(1, ceil((1 - s) P))``), or give ``k``
                (the number of diagonals, in ``[1, P]``); ``sparsity=None`` keeps all ``P``.
        """
        if not isinstance(linear, Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        if k is not None:
            sparsity = None  # k replaces the default sparsity rather than clashing with it
        mat = DiagMatrix.from_dense(linear.weight.data, sparsity=sparsity, k=k)
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  offsets=backend.to_numpy(mat.offsets), rng=0, dtype=linear.weight.dtype,
                  device=linear.weight.device)
        out.values.data = mat.values.copy()
        if linear.bias is not None:
            out.bias.data = linear.bias.data.copy()
        return out

    # ------------------------------------------------------------------ reporting
    def weight_stats(self):
        """``(stored, dense)`` entries of the weight matrix: ``(K*L, m*n)``."""
        return self.nnz, self.out_features * self.in_features

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"K={self.K}/{self.P}, sparsity={self.sparsity:.4f}, bias={self.bias is not None}")


def _on_host(offsets):
    """``offsets`` with a device array copied to the host; a sequence is passed on as it is,
    so that validation sees what the caller wrote (``[]``, a bool among ints)."""
    offsets = backend.unwrap(offsets)
    return backend.to_numpy(offsets) if backend.is_array(offsets) else offsets


def _init_uniform(layer, K_new, rng):
    return init.uniform_array((K_new, layer.L), layer.init_bound(), layer.values.dtype,
                              layer.values.device, rng)


def make_linear(in_features, out_features, linear="dense", sparsity=0.9, bias=True,
                dtype=np.float32, device=None, rng=None):
    """An ``nn.Linear`` (``linear="dense"``) or an ``nn.DiagLinear`` (``linear="diag"``).

    The one switch that attention and every model in `diagnet.models` use to choose
    between dense and diagonally sparse layers. ``sparsity`` is the diagonal layer's target
    sparsity and is ignored by a dense one. ``rng`` (None, int seed or Generator) draws the
    layer's initial weights (and, for ``"diag"``, its offsets first).
    """
    if linear == "dense":
        return Linear(in_features, out_features, bias=bias, dtype=dtype, device=device, rng=rng)
    if linear == "diag":
        return DiagLinear(in_features, out_features, sparsity=sparsity, bias=bias, rng=rng,
                          dtype=dtype, device=device)
    raise ValueError(f"linear must be one of {LINEAR_KINDS}; got {linear!r}")
