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

The functions take and return float64 scalars: callers compute in float64 registers and
round once on the store.
"""

from __future__ import annotations

import numba

__all__ = ["exp_nonpositive_f32"]

# The compile options of the element and row loops of `diagnet.fused.gelu` and `.softmax`.
# contract: FMA; reassoc: lets LLVM vectorise sums. Not nnan/ninf: NaN and inf must
# propagate as in the references.
FASTMATH = {"contract", "reassoc"}
#: a loop: error_model="numpy" makes a division by zero give inf (as in NumPy) instead of a
#: Python exception check, whose branch would keep the loop from being vectorised
jit = numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
#: a loop over ``numba.prange`` tasks
parallel_jit = numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy",
                          parallel=True)
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
