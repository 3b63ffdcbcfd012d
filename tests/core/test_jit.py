"""`diagnet.jit.noalias_njit`: the noalias flag and the wide-vector attribute reach LLVM,
every CPU kernel module uses them, and wide vectors leave an element-wise kernel's bits alone.

Neither changes arithmetic (the kernels' own tests compare their results with the
references); what can break silently is a hook into numba (a numba release that moves it)
or a kernel added with a plain ``njit``: both only cost speed, so these tests look for them.
"""

from __future__ import annotations

import importlib
import re

import numba
import numpy as np
import pytest
from numba.core.compiler import Flags

from diagnet.jit import noalias_njit

#: the modules whose compiled functions write only arrays they or their callers allocate
KERNEL_MODULES = ["diagnet.diag.cpu.tiles", "diagnet.diag.cpu.gather",
                  "diagnet.diag.cpu.scatter", "diagnet.diag.cpu.value_grad",
                  "diagnet.diag.cpu.both_grads", "diagnet.fused.layer_norm_cpu",
                  "diagnet.fused.softmax", "diagnet.fused.gelu", "diagnet.fused.relu"]
#: those whose vector lanes hold independent elements (no sum across lanes): wide vectors
ELEMENTWISE_MODULES = {"diagnet.diag.cpu.tiles", "diagnet.diag.cpu.gather",
                       "diagnet.diag.cpu.scatter", "diagnet.diag.cpu.value_grad",
                       "diagnet.diag.cpu.both_grads", "diagnet.fused.gelu",
                       "diagnet.fused.relu"}


def _array_pointer_attributes(llvm_ir, name):
    """The attributes of each pointer argument of the numba function ``name`` (the arrays'
    data and memory-info pointers), without numba's own return and exception pointers."""
    (header,) = [line for line in llvm_ir.splitlines()
                 if line.startswith("define") and name in line and "cpython" not in line
                 and "cfunc" not in line][:1]
    return re.findall(r"ptr ([^,%]*)%arg\.", header)


def _axpy(out, a, x):
    for i in range(out.shape[0]):
        out[i] += a * x[i]


def test_array_arguments_reach_llvm_as_noalias():
    """A plain ``njit`` function has no ``noalias`` argument, so the check can fail; compiled
    without the disk cache, whose code cannot be inspected."""
    marked = noalias_njit(cache=False)(_axpy)
    plain = numba.njit(cache=False)(_axpy)
    out = np.zeros(8)
    marked(out, 2.0, np.ones(8))
    plain(out, 2.0, np.ones(8))
    np.testing.assert_array_equal(out, np.full(8, 4.0))
    marked_args = _array_pointer_attributes(next(iter(marked.inspect_llvm().values())), "_axpy")
    plain_args = _array_pointer_attributes(next(iter(plain.inspect_llvm().values())), "_axpy")
    assert marked_args and all("noalias" in a for a in marked_args)
    assert plain_args and not any("noalias" in a for a in plain_args)


def test_options_pass_through_to_njit():
    parallel = noalias_njit(cache=False, parallel=True, fastmath={"contract"})(_axpy)
    assert parallel.targetoptions["parallel"] is True
    assert parallel.targetoptions["fastmath"] == {"contract"}


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_kernel_is_compiled_with_noalias(name):
    """Each compiled function defined in a kernel module gets the flag; a kernel added with
    a plain ``njit`` would lose it silently. (Helpers that numba inlines itself,
    ``inline="always"``, have no arguments of their own in the compiled code.)"""
    module = importlib.import_module(name)
    kernels = [obj for obj in vars(module).values()
               if isinstance(obj, numba.core.registry.CPUDispatcher)
               and obj.py_func.__module__ == name
               and obj.targetoptions.get("inline", "never") == "never"]
    assert kernels
    for kernel in kernels:
        assert kernel._compiler._customize_flags(Flags()).noalias, kernel.py_func.__name__
        wide = getattr(kernel._compiler._compile_core, "wide_vectors", False)
        assert wide == (name in ELEMENTWISE_MODULES), kernel.py_func.__name__


def _square_plus(x, y):
    for i in range(x.shape[0]):
        y[i] = x[i] * x[i] + x[i]


def _float32_vector_registers(dispatcher):
    """The vector register widths (``ymm``, ``zmm``) of the float32 arithmetic in the
    machine code of ``dispatcher``'s one compiled version."""
    asm = next(iter(dispatcher.inspect_asm().values()))
    return set(re.findall(r"v(?:mul|add|fmadd\w*)ps\s+%?(ymm|zmm)", asm))


def _has_avx512():
    import llvmlite.binding as llvm

    return "+avx512f" in llvm.get_host_cpu_features().flatten()


@pytest.mark.skipif(not _has_avx512(), reason="the CPU has no AVX-512: LLVM has no 512-bit "
                                                "vectors to prefer")
def test_wide_vectors_reach_llvm():
    """With ``wide_vectors`` the float32 loop runs in 512-bit registers; without, LLVM's
    default on these CPUs keeps it in 256-bit ones (so the check can fail)."""
    wide = noalias_njit(wide_vectors=True, cache=False)(_square_plus)
    narrow = noalias_njit(cache=False)(_square_plus)
    x = np.linspace(-2, 2, 1000, dtype=np.float32)
    y_wide, y_narrow = np.empty_like(x), np.empty_like(x)
    wide(x, y_wide)
    narrow(x, y_narrow)
    assert np.array_equal(y_wide, y_narrow)
    assert "zmm" in _float32_vector_registers(wide)
    assert _float32_vector_registers(narrow) == {"ymm"}


@pytest.mark.parametrize("tanh_form", [False, True])
def test_wide_gelu_gives_the_bits_of_the_narrow_one(tanh_form):
    """The GELU kernel (exponentials, a division, polynomials per element) gives the same
    bits compiled for either vector width, NaN and infinities included."""
    from diagnet.fused import gelu

    narrow = noalias_njit(cache=False, fastmath={"contract", "reassoc"}, nogil=True,
                          error_model="numpy")(gelu._bias_gelu_slope_rows.py_func)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((37, 129)) * 4).astype(np.float32)
    x[0, :4] = [np.nan, np.inf, -np.inf, 0.0]
    bias = rng.standard_normal(129).astype(np.float32)
    y, slope = np.empty_like(x), np.empty_like(x)
    y0, slope0 = np.empty_like(x), np.empty_like(x)
    gelu._bias_gelu_slope_rows(x, bias, y, slope, tanh_form, 0, 37)
    narrow(x, bias, y0, slope0, tanh_form, 0, 37)
    assert np.array_equal(y.view(np.uint32), y0.view(np.uint32))
    assert np.array_equal(slope.view(np.uint32), slope0.view(np.uint32))
