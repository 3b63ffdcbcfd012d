"""`diagnet.jit.noalias_njit`: the flag reaches LLVM, and every CPU kernel module uses it.

The flag changes no arithmetic (the kernels' own tests compare their results with the
references, and the kernels' bits tests with the loops they replaced); what can break
silently is the hook into numba's compile flags (a numba release that moves it) or a kernel
added with a plain ``njit``: both only cost speed, so these tests look for them.
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
