"""Compile the CUDA sources of ``kernels/`` and launch their kernels with checked arguments.

Every GPU kernel of diagnet lives in a ``kernels/*.cu`` file, is compiled at run time by
``cupy.RawModule`` and is launched through this module. A kernel is described once, by a
`Kernel`: the file, the entry point without its dtype suffix, and the signature::

    LAYER_NORM_FORWARD = Kernel(
        "layer_norm.cu", "layer_norm_forward",
        "x:F weight:F bias:F y:O mean:O rstd:O rows:i cols:i has_weight:i has_bias:i eps:f",
        macro_prefix="LN")

    LAYER_NORM_FORWARD(x.dtype, grid, block, (x, w, b, y, mean, rstd, R, N, 1, 1, 1e-5),
                       defines=("-DLN_THREADS=256",))

**Signatures.** One ``name:letter`` per kernel parameter, in order; the letters are those of
the SIMT emulation harness (``tests/simt``), which derives the same letters from the C
declarations and refuses a launch whose arguments do not match:

==========  =====================================================  =====================
letter      C parameter                                            Python argument
==========  =====================================================  =====================
``F``       ``const T*``, ``T`` the kernel's dtype (an input)      C-contiguous CuPy array
``O``       ``T*`` (an output)                                     C-contiguous CuPy array
``I``       ``const int*``                                         C-contiguous int32 array
``L``       ``const long long*``                                   C-contiguous int64 array
``U``       ``const unsigned long long*``: device addresses        C-contiguous uint64 array
``i``       ``int``                                                int in [-2**31, 2**31)
``l``       ``long long``                                          int in [-2**63, 2**63)
``f``       ``T`` (a scalar of the kernel's dtype)                 real number
==========  =====================================================  =====================

Arrays are checked, never converted (a copy of an output would be written and lost):
wrong type, dtype or layout raises `TypeError`/`ValueError` naming the kernel and the
parameter. Scalars are cast to the exact NumPy type of the parameter (CuPy passes a Python
``int`` as ``long long`` and a ``float`` as ``double`` whatever the kernel declares); an int
out of range raises `ValueError`. Every check is O(1) per argument: no array is scanned.

**Compilation.** A ``.cu`` file is compiled once per dtype and set of ``-D`` options, and
the module memoised (`clear_cache` forgets them). Every file instantiates its entry points
for float32 and float64 (suffixes ``_f32`` and ``_f64``) under the macros
``<PREFIX>_ENABLE_F32`` and ``<PREFIX>_ENABLE_F64`` (default 1, for stand-alone builds);
`compile_options` adds the pair that selects one dtype after the caller's ``defines``, so a
module holds one dtype's kernels. Tuning constants travel as ``-D`` options too (a Python
config object renders them once and passes the same tuple on every launch; the tuple is the
memo key). The ``.cu`` files have no ``#include`` so that NVRTC needs no toolkit headers
and the harness can compile them as C++.

This module imports without CuPy; compiling or launching needs it (`require_cupy`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import operator

import numpy as np

from . import backend

#: The dtypes every kernel file is instantiated for, and the suffixes of their entry points.
DTYPE_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

_PARAM_KINDS = frozenset("FOILUilf")
#: the integer array letters (``U``: a table of device addresses, ``a.data.ptr`` of arrays)
_INDEX_DTYPES = {"I": np.dtype(np.int32), "L": np.dtype(np.int64), "U": np.dtype(np.uint64)}
_INT32 = (-2**31, 2**31 - 1)
_INT64 = (-2**63, 2**63 - 1)


def require_cupy(what: str = "the CUDA kernels"):
    """CuPy, or a `RuntimeError` saying that ``what`` needs it and why it cannot be used."""
    cp = backend.cupy_or_none()
    if cp is None:
        raise RuntimeError(f"{what} need CuPy and a CUDA device: "
                           + backend.cuda_unavailable_reason())
    return cp


def source(filename: str) -> str:
    """The CUDA C text of ``kernels/<filename>``, as shipped in the ``diagnet.kernels`` package."""
    return importlib.resources.files("diagnet.kernels").joinpath(filename).read_text()


def dtype_suffix(dtype) -> str:
    """``"f32"`` or ``"f64"``; `TypeError` for any other dtype."""
    try:
        return DTYPE_SUFFIX[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"CUDA kernels exist for float32 and float64; got dtype {dtype}") from None


def compile_options(macro_prefix: str, dtype, defines=()) -> tuple[str, ...]:
    """The NVRTC options of a module: ``defines`` (``-D`` strings), then the dtype selection
    ``-D<PREFIX>_ENABLE_F32=0|1`` and ``-D<PREFIX>_ENABLE_F64=0|1``."""
    suffix = dtype_suffix(dtype)
    return tuple(defines) + (f"-D{macro_prefix}_ENABLE_F32={int(suffix == 'f32')}",
                             f"-D{macro_prefix}_ENABLE_F64={int(suffix == 'f64')}")


@functools.lru_cache(maxsize=None)
def _module(filename: str, options: tuple[str, ...]):
    return require_cupy().RawModule(code=source(filename), options=options)


@functools.lru_cache(maxsize=None)
def _function(filename: str, macro_prefix: str, entry: str, dtype, defines: tuple[str, ...]):
    # Memoised on what the caller passes (a dtype and a tuple it keeps) rather than on the
    # option strings: building those on every launch cost more host time than a small launch.
    dtype = np.dtype(dtype)
    module = _module(filename, compile_options(macro_prefix, dtype, defines))
    return module.get_function(f"{entry}_{dtype_suffix(dtype)}")


def clear_cache() -> None:
    """Forget compiled modules (after switching devices or CuPy stand-ins, or in tests)."""
    _function.cache_clear()
    _module.cache_clear()


def _type_name(a) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One entry point of a ``kernels/*.cu`` file, launched with checked arguments.

    Args:
        filename: the source, e.g. ``"layer_norm.cu"``.
        entry: the ``extern "C"`` name without the dtype suffix, e.g. ``"layer_norm_forward"``.
        signature: ``"name:letter ..."``, one per parameter (letters in the module docstring).
        macro_prefix: the prefix of the file's dtype-selection macros (``"LN"`` for
            ``LN_ENABLE_F32``).
    """

    filename: str
    entry: str
    signature: str
    macro_prefix: str
    params: tuple[tuple[str, str], ...] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        params = []
        for item in self.signature.split():
            name, _, kind = item.partition(":")
            if not name or kind not in _PARAM_KINDS or len(kind) != 1:
                raise ValueError(f"Kernel {self.entry}: each parameter must be 'name:letter' with "
                                 f"a letter of {''.join(sorted(_PARAM_KINDS))}; got {item!r}")
            params.append((name, kind))
        object.__setattr__(self, "params", tuple(params))

    def __call__(self, dtype, grid, block, args, *, defines: tuple[str, ...] = ()):
        """Launch the ``dtype`` version on ``grid`` x ``block`` (tuples of 3 ints).

        ``args`` follow the signature; ``defines`` are the module's ``-D`` options (keep the
        tuple: it is the memo key of the compiled module). Everything is checked before the
        module is compiled or the kernel launched.
        """
        cp = require_cupy()
        dtype = np.dtype(dtype)
        dtype_suffix(dtype)  # refuses a dtype the file has no kernels for
        values = self._checked(cp, dtype, args)
        function = _function(self.filename, self.macro_prefix, self.entry, dtype, defines)
        function(grid, block, values)

    def _checked(self, cp, dtype, args) -> tuple:
        if len(args) != len(self.params):
            raise TypeError(f"{self.entry} takes {len(self.params)} arguments "
                            f"({self.signature}); got {len(args)}")
        return tuple(self._check(cp, dtype, name, kind, a)
                     for (name, kind), a in zip(self.params, args))

    def _check(self, cp, dtype, name, kind, a):
        where = f"{self.entry}: argument {name!r}"
        if kind in "FOILU":
            want = _INDEX_DTYPES.get(kind, dtype)
            if not isinstance(a, cp.ndarray):
                raise TypeError(f"{where} must be a cupy.ndarray; got {_type_name(a)}")
            if a.dtype != want:
                raise TypeError(f"{where} must have dtype {want}; got {a.dtype}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{where} must be C-contiguous; got strides {a.strides} "
                                 f"for shape {tuple(a.shape)}")
            return a
        if kind == "f":
            real = isinstance(a, (int, float, np.integer, np.floating))
            if isinstance(a, (bool, np.bool_)) or not real:
                raise TypeError(f"{where} must be a real number; got {_type_name(a)}")
            return dtype.type(a)
        try:
            value = operator.index(a)
        except TypeError:
            raise TypeError(f"{where} must be an int; got {_type_name(a)}") from None
        lo, hi = _INT32 if kind == "i" else _INT64
        if not lo <= value <= hi:
            raise ValueError(f"{where} must fit a {'32' if kind == 'i' else '64'}-bit int; "
                             f"got {value}")
        return np.int32(value) if kind == "i" else np.int64(value)


# ---- launch configurations: frozen dataclasses of compile-time constants ---------------------

def check_positive_fields(config) -> None:
    """Raise ValueError unless every field of the dataclass ``config`` is an int >= 1 (not a
    bool); the message names the class and the field. Each kernel's config checks its own
    relations between fields after this."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{field.name} must be a positive int; "
                             f"got {value!r}")


def config_defines(config, compiled_fields: dict[str, str]) -> tuple[str, ...]:
    """The ``-D`` options that compile ``config``'s constants into a kernel:
    ``compiled_fields`` maps each field name to its macro name."""
    return tuple(f"-D{macro}={getattr(config, field)}" for field, macro in compiled_fields.items())

