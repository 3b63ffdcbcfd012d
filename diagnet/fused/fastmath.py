"""Vectorisable elementary functions for numba loops whose results are stored as float32.

A ``math.exp`` call in a numba loop is scalar code (numba has no vector math library here),
and the table of `diagnet.fused.softmax.exp_nonpositive` makes LLVM gather from memory, which
it does one lane at a time. A float32 result does not need float64's last digits, so
`exp_nonpositive_f32` trades them for plain arithmetic that LLVM turns into SIMD code:

``exp(x) = exp(x / 2**k) ** (2**k)``: the Taylor polynomial of degree 9 on
``x / 2**k`` in ``[-1/4, 0]`` (truncation below ``0.25**10 / 10! < 3e-13``), then ``k = 10``
squarings. Each squaring doubles the relative error, so the result is within
``2**10 * 3e-13 < 4e-10`` of ``exp(x)`` (plus float64 rounding): far below float32's unit
roundoff of 6e-8. No table, no integer conversion, no branch: only multiplications, adds
and selects.

`exp_nonpositive_f32` takes and returns float64 scalars: callers compute in float64
registers and round once on the store. `exp_f32` is for loops that compute in float32
registers throughout (twice the SIMD lanes of float64): the textbook range reduction
``x = n ln2 + r``, ``|r| <= ln2 / 2``, a degree-7 Taylor polynomial for ``exp(r)``
(truncation below ``0.347**8 / 8! < 6e-9``), and ``2**n`` built from its exponent bits
(`_f32_from_bits`, a bit cast that LLVM vectorises like any other operation). Within 1.3
ulps of ``exp(x)`` over ``[-87.33, 0]`` (measured against float64 in the tests); 0 below,
where ``exp(x)`` would be a subnormal float32.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ..jit import noalias_njit

__all__ = ["exp_nonpositive_f32", "exp_f32"]

# The compile options of the element and row loops of `diagnet.fused.gelu` and `.softmax`.
# contract: FMA; reassoc: lets LLVM vectorise sums. Not nnan/ninf: NaN and inf must
# propagate as in the references.
FASTMATH = {"contract", "reassoc"}
#: a loop: error_model="numpy" makes a division by zero give inf (as in NumPy) instead of a
#: Python exception check, whose branch would keep the loop from being vectorised; noalias:
#: see `diagnet.jit` (the kernels of `diagnet.fused` write only the outputs and scratch that
#: they or their public functions allocate)
jit = noalias_njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
#: a loop over ``numba.prange`` tasks
parallel_jit = noalias_njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy",
                          parallel=True)
#: `jit` and `parallel_jit` for loops whose vector lanes hold independent elements (no sum
#: across them, as in GELU and ReLU): they may use 512-bit vectors, which give the same bits
#: there (`diagnet.jit`); a row sum's order would change with the lane count
elementwise_jit = noalias_njit(wide_vectors=True, cache=True, fastmath=FASTMATH, nogil=True,
                               error_model="numpy")
elementwise_parallel_jit = noalias_njit(wide_vectors=True, cache=True, fastmath=FASTMATH,
                                        nogil=True, error_model="numpy", parallel=True)
#: a scalar helper, inlined by numba itself: LLVM's inliner finds such helpers too big, and a
#: call inside a loop stops it from being vectorised
inline_jit = numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")

#: ``exp(x / 2**_SQUARINGS)`` is squared this many times
_SQUARINGS = 10
#: below this argument the result is 0: ``exp(-256) = 7e-112``, and any finite float32
#: times it still rounds to 0 in float32
_MIN_ARG = -256.0


@inline_jit
def exp_nonpositive_f32(x):
    """``exp(x)`` for a float64 ``x <= 0``, to a relative 4e-10: enough for a float32 result.

    Returns exactly 0 for ``x < -256`` (``-inf`` included) and NaN for NaN. For ``x > 0`` the
    result is wrong: callers make sure the argument is not positive.
    """
    f = (_MIN_ARG if x < _MIN_ARG else x) * (1.0 / (1 << _SQUARINGS))  # NaN stays NaN
    y = 1.0 + f * (1.0 + f * (1 / 2 + f * (1 / 6 + f * (1 / 24 + f * (1 / 120 + f * (
        1 / 720 + f * (1 / 5040 + f * (1 / 40320 + f * (1 / 362880)))))))))
    y = y ** (1 << _SQUARINGS)  # _SQUARINGS squarings
    return 0.0 if x < _MIN_ARG else y


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a bit cast, no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_F32 = np.float32
_LOG2E_F32 = _F32(1.4426950408889634)
# ln 2 in two parts (Cody and Waite): n * _LN2_HI is exact for the |n| <= 126 used here
_LN2_HI_F32 = _F32(0.693359375)
_LN2_LO_F32 = _F32(-2.12194440e-4)
#: below this float32 argument `exp_f32` returns 0: exp(-87.33) is about float32's smallest
#: normal number, 1.18e-38, and 2**n is built for normal exponents only
_MIN_ARG_F32 = _F32(-87.33)


@inline_jit
def exp_f32(x):
    """``exp(x)`` for a float32 ``x <= 0``, in float32 arithmetic, to about 1.3 ulps.

    Returns exactly 0 for ``x < -87.33`` (``-inf`` included) and NaN for NaN. For ``x > 0``
    the result is wrong: callers make sure the argument is not positive.
    """
    xc = _MIN_ARG_F32 if x < _MIN_ARG_F32 else x  # NaN stays NaN
    # nearest integer to x / ln2 (truncation of a non-positive number minus one half); a
    # NaN is converted as 0 (converting NaN to an integer is undefined), and comes back
    # through r
    q = xc * _LOG2E_F32 - _F32(0.5)
    n = np.int32(q if q == q else _F32(0.0))
    nf = _F32(n)
    r = (xc - nf * _LN2_HI_F32) - nf * _LN2_LO_F32
    p = _F32(1 / 5040) * r + _F32(1 / 720)
    p = p * r + _F32(1 / 120)
    p = p * r + _F32(1 / 24)
    p = p * r + _F32(1 / 6)
    p = p * r + _F32(0.5)
    p = p * r + _F32(1.0)
    p = p * r + _F32(1.0)
    y = p * _f32_from_bits((n + np.int32(127)) << np.int32(23))
    return _F32(0.0) if x < _MIN_ARG_F32 else y
