"""Every numerical tolerance of the test suite, in one table, each with its reason.

Tests import their tolerances from here, so a reader sees in one place how close each kind
of result must be, and why that is honest: tight enough that a wrong formula (off by O(1))
fails, loose enough for the rounding of the dtype and the length of the sums involved.

Two kinds of rule are used:

* ``numpy.testing.assert_allclose`` style, ``|got - want| <= atol + rtol * |want|``
  (the ``*_TOL`` dicts);
* scaled, ``|got - want| <= rtol * scale`` where ``scale`` is the same computation on
  absolute values (the sum of magnitudes each output is accumulated from); this is the right
  rule for sums with cancellation (the ``*_RTOL`` tables).
"""

from __future__ import annotations

import numpy as np

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

# ---- gradient checks (central differences, float64) --------------------------------------
#: eps = 1e-6: truncation error O(eps**2) ~ 1e-12, rounding about 1e-16 * |f| / eps ~ 1e-10 |f|;
#: the projected objectives have |f| of order 1-100, so atol 1e-6 + rtol 1e-5 leaves two or
#: more orders of margin without hiding a wrong derivative.
GRADCHECK_TOL = dict(eps=1e-6, atol=1e-6, rtol=1e-5)

# ---- op values against NumPy/SciPy ---------------------------------------------------------
#: float64 forward values: a few ulps apart.
F64_TOL = dict(rtol=1e-12, atol=1e-12)
#: float32 forward values vs a float64 reference from the same float32 inputs: unit roundoff
#: 6e-8, and the ops checked (bounded inputs, well-conditioned formulas) stay within a few
#: dozen ulps.
F32_TOL = dict(rtol=1e-5, atol=1e-6)
#: float64 gradients: sums over broadcast dims may run in another order than the reference.
F64_GRAD_TOL = dict(rtol=1e-10, atol=1e-12)
#: float32 gradients compared with the float64 analytic value.
F32_GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
#: layer-norm gradients in float32, scaled rule: the float32 mean subtraction adds about
#: u * |x| * rstd to xhat and the longest sums have 64 terms; measured errors stay below
#: 3e-7 * scale, so 1e-5 leaves a 30x margin, while a dropped term or 1/(N-1) for 1/N is off
#: by 1e-2 or more.
LAYER_NORM_RTOL = 1e-5

# ---- diagonal products ------------------------------------------------------------------------
#: diag_linear and DiagMatrix products vs the SciPy dense oracle (scaled rule). float32 sums of
#: up to a few hundred terms in any order: a few hundred ulps of the scale at worst.
DENSE_ORACLE_RTOL = {F32: 1e-4, F64: 1e-10}
#: the numba kernels vs the NumPy reference on the same inputs (scaled rule): both sum the same
#: terms, in a different order.
CPU_KERNEL_RTOL = {F32: 1e-5, F64: 1e-12}


def cuda_kernel_tol(dtype, terms: int) -> dict:
    """CUDA (or emulated) kernel vs the NumPy reference: ``rtol`` plus an ``atol`` growing
    with the number of summed ``terms`` (K for the gathers, B for the value grad), since a
    different summation order costs about one ulp of the running sum per term."""
    if np.dtype(dtype) == F32:
        return dict(rtol=2e-5, atol=1e-6 * terms)
    return dict(rtol=1e-12, atol=1e-13 * terms)
