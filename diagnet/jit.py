"""How diagnet's CPU kernels are compiled: `noalias_njit`, numba's ``njit`` with LLVM told
that a kernel's array arguments do not overlap, and optionally that its loops may use the
CPU's widest vectors.

**noalias.** A loop that writes one array and reads others at run-time offsets (a tile of
the diagonal kernels and its shifted rows, a layer norm's output row and its input rows)
cannot be vectorised unconditionally while LLVM must assume that the arrays overlap. It
then tests every pair of written and read address ranges before the vector loop, with a
scalar loop as the fallback; with many streams the tests cost more than the loop at the
ViT's widths (figures in docs/benchmarks.md). The flag changes no arithmetic, so the
results are those of plain ``njit`` to the bit.

The promise that a kernel makes by using it: an array it writes shares no memory with any
other array argument. Each kernel compiled with it writes only arrays that it or its
public caller allocated (outputs, partial sums, scratch); arrays that are only read may
coincide (``noalias`` allows that).

**Wide vectors** (``wide_vectors=True``). On CPUs with AVX-512, LLVM vectorises with 256-bit
vectors unless a function asks for more (the ``"prefer-vector-width"`` attribute), because
512-bit code lowered the clock of early AVX-512 cores. OpenBLAS already runs 512-bit code
in the same process, and the element-wise kernels that ask for it (GELU: about 0.8x the
time) compute every element by the same operations at either width: their results are the
same to the bit. Kernels with reductions across the vector lanes (layer norm's and
softmax's row sums) do not ask for it: the lane count sets the order of their sums.

Numba has the noalias flag (``Flags.noalias``, which its parallel loops already set) but no
decorator option for either, so `noalias_njit` sets the flag where numba builds a
function's compile flags, and, for wide vectors, adds the attribute to the functions that
numba lowers while it compiles such a kernel (a hook on numba's CPU lowering, inactive
otherwise). With a numba that lacks these hooks the kernels compile as plain ``njit`` ones:
slower, same results (``tests/core/test_jit.py`` checks that both reach LLVM).
"""

from __future__ import annotations

import threading

import numba

__all__ = ["noalias_njit"]

#: the LLVM function attribute of `noalias_njit`'s ``wide_vectors``
PREFER_WIDE_VECTORS = '"prefer-vector-width"="512"'

# How many wide-vector compilations are in progress on this thread (numba compiles a
# kernel's callees inside the kernel's own compilation, so they nest).
_wide = threading.local()


def noalias_njit(wide_vectors=False, **options):
    """A decorator: ``numba.njit(**options)`` whose functions get LLVM's ``noalias`` on every
    pointer argument (the arrays' data), and with ``wide_vectors`` LLVM's preference for
    512-bit vectors (see the module docstring: only for kernels whose lanes hold independent
    elements). ``options`` are ``njit``'s (``cache``, ``fastmath``, ``parallel``, ...).
    Returns the numba dispatcher, as ``njit`` does."""
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
        compile_core = getattr(compiler, "_compile_core", None)
        if wide_vectors and compile_core is not None and _hook_lowering():
            def compile_wide(*args, **kwargs):
                _wide.depth = getattr(_wide, "depth", 0) + 1
                try:
                    return compile_core(*args, **kwargs)
                finally:
                    _wide.depth -= 1

            compile_wide.wide_vectors = True
            compiler._compile_core = compile_wide
        return dispatcher

    return compile_noalias


def _hook_lowering() -> bool:
    """Wrap numba's CPU ``post_lowering`` (once) so that the functions it finishes while a
    wide-vector kernel compiles get `PREFER_WIDE_VECTORS`; False if numba has no such step."""
    from numba.core import cpu

    lowering = getattr(cpu.CPUContext, "post_lowering", None)
    if lowering is None:
        return False
    if getattr(lowering, "adds_wide_vectors", False):
        return True

    def post_lowering(self, mod, library):
        if getattr(_wide, "depth", 0):
            for fn in mod.functions:
                if not fn.is_declaration:
                    # llvmlite's attribute set checks names against the flag attributes
                    # it knows; a key="value" attribute is written out as it is
                    set.add(fn.attributes, PREFER_WIDE_VECTORS)
        return lowering(self, mod, library)

    post_lowering.adds_wide_vectors = True
    cpu.CPUContext.post_lowering = post_lowering
    return True
