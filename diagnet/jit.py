"""How diagnet's CPU kernels are compiled: `noalias_njit`, numba's ``njit`` with LLVM told
that a kernel's array arguments do not overlap.

Why it matters: a loop that writes one array and reads others at run-time offsets (a tile
of the diagonal kernels and its shifted rows, a layer norm's output row and its input
rows) cannot be vectorised unconditionally while LLVM must assume that the arrays overlap.
It then tests every pair of written and read address ranges before the vector loop, with
a scalar loop as the fallback; with many streams the tests cost more than the loop at the
ViT's widths (figures in docs/benchmarks.md). The flag changes no arithmetic, so the
results are those of plain ``njit`` to the bit.

The promise that a kernel makes by using it: an array it writes shares no memory with any
other array argument. Each kernel compiled with it writes only arrays that it or its
public caller allocated (outputs, partial sums, scratch); arrays that are only read may
coincide (``noalias`` allows that).

Numba has the flag (``Flags.noalias``, which its parallel loops already set) but no
decorator option for it, so `noalias_njit` sets it where numba builds a function's compile
flags. With a numba that lacks that hook the kernels compile as plain ``njit`` ones:
slower, same results (``tests/diag/test_diag_cpu_kernels.py`` checks that the flag reaches
LLVM).
"""

from __future__ import annotations

import numba

__all__ = ["noalias_njit"]


def noalias_njit(**options):
    """A decorator: ``numba.njit(**options)`` whose functions get LLVM's ``noalias`` on every
    pointer argument (the arrays' data). ``options`` are ``njit``'s (``cache``,
    ``fastmath``, ``parallel``, ...). Returns the numba dispatcher, as ``njit`` does."""
    decorate = numba.njit(**options)

    def compile_noalias(fn):
        dispatcher = decorate(fn)
        compiler = getattr(dispatcher, "_compiler", None)
        customize = getattr(compiler, "_customize_flags", None)
        if customize is not None:
            def with_noalias(flags):
                flags = customize(flags)
                flags.noalias = True
                return flags

            compiler._customize_flags = with_noalias
        return dispatcher

    return compile_noalias
