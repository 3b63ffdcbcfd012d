r"""`DiagMatrix`: a matrix stored as a few of its wrap-around diagonals.

The format
==========

A matrix ``W`` of shape ``(m, n)`` (in a layer: ``(out_features, in_features)``, used as
``y = x @ W.T``) is cut into ``P = max(m, n)`` *wrap-around diagonals*, each exactly
``L = min(m, n)`` entries long. A diagonal starts in the first column (tall or square
matrices) or in the first row (wide matrices), steps one row down and one column right per
position, and wraps around the longer side:

* tall or square (``m >= n``): position ``t`` of diagonal ``p`` is entry ``((t + p) % m, t)``;
* wide (``m < n``):             position ``t`` of diagonal ``p`` is entry ``(t, (t + p) % n)``.

Every entry belongs to exactly one diagonal. Writing the diagonal number ``p`` into each
entry of a 4 x 3 (tall) and a 3 x 4 (wide) matrix shows the partition::

    tall, m=4, n=3: p = (i - j) % 4       wide, m=3, n=4: p = (j - i) % 4

             j=0 j=1 j=2                           j=0 j=1 j=2 j=3
        i=0    0   3   2                      i=0    0   1   2   3
        i=1    1   0   3                      i=1    3   0   1   2
        i=2    2   1   0                      i=2    2   3   0   1
        i=3    3   2   1

and the position ``t`` is the column ``j`` (tall) or the row ``i`` (wide). In the tall
example diagonal 3 is the entries ``(3, 0), (0, 1), (1, 2)``, in that order.

A `DiagMatrix` keeps ``K`` of the ``P`` diagonals; every other entry is zero:

* ``offsets``: shape ``(K,)``, integer (stored as int64), sorted, unique, each in ``[0, P)``;
* ``values``:  shape ``(K, L)``, float32 or float64; ``values[k, t]`` is position ``t`` of
  diagonal ``offsets[k]``.

So the tall example with ``offsets = [0, 3]`` stores ``values[0] = [W[0,0], W[1,1], W[2,2]]``
and ``values[1] = [W[3,0], W[0,1], W[1,2]]``. The density is ``K / P``, the sparsity
``1 - K / P`` and the number of stored entries ``K * L``; for a target sparsity ``s`` a
layer keeps ``K = max(1, ceil((1 - s) * P))`` diagonals
(`diagnet.diag.layout.diagonals_for_sparsity`).

Two facts that follow from the definition and that `DiagMatrix.T` relies on:

* for a non-square matrix the transpose has the *same* ``offsets`` and ``values`` (only
  the shape is swapped): entry ``((t + p) % m, t)`` of a tall ``W`` is entry
  ``(t, (t + p) % m)`` of the wide ``W.T``, which is position ``t`` of its diagonal ``p``;
* for a square ``n x n`` matrix the transpose maps diagonal ``p`` to ``(n - p) % n`` and
  rotates its values: ``values_T[k', t] = values[k, (t - p) % n]``.

Arrays live on one device, as NumPy (CPU) or CuPy (GPU) arrays chosen through
`diagnet.backend`; products use the kernels picked by `diagnet.diag.dispatch`.

NaN and infinity are allowed in ``values`` (as in NumPy and SciPy): checking costs a pass
over the data, and a GPU synchronisation. Pass ``check_finite=True`` to the constructor to
reject them.

The package holds the class in `matrix.py` and its conversions to and from SciPy's sparse
formats in `scipy_format.py`.
"""

from .matrix import DiagMatrix

__all__ = ["DiagMatrix"]
