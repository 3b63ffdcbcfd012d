"""A parallel region that does nothing but start numba's worker threads.

`diagnet.diag.threadpools` runs it once, with all of numba's threads, to learn which
threads the pool creates (and lower their priority). A module of its own so that importing
`threadpools` compiles nothing; cached on disk like the kernels.
"""

from __future__ import annotations

import numba


@numba.njit(cache=True, parallel=True)
def touch_in_parallel(a):
    """``a += 1`` over numba's threads: ``a`` ``(n,)`` float64, ``n`` at least the thread
    count, so that every thread gets a share."""
    for i in numba.prange(a.shape[0]):
        a[i] += 1.0
