"""`diagnet.settings`: read from the environment once, changed through its functions.

The suite's conftest restores every setting after each test, so these tests change them
freely.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from diagnet import backend, settings
from diagnet.diag import dispatch, reference
from diagnet.ops import activation


def test_the_environment_is_read_at_import_not_per_call(monkeypatch):
    settings.set_cpu_kernels("numba")
    monkeypatch.setenv(settings.ENV_CPU_KERNELS, "reference")
    x = np.ones((2, 3))
    assert dispatch.implementation(x) is not reference  # the variable changed after import
    settings.read_environment()
    assert settings.cpu_kernels == "reference"
    assert dispatch.implementation(x) is reference
    assert activation.fused_cpu(x, "gelu") is None


def test_a_fresh_process_reads_every_variable():
    env = dict(os.environ, DIAGNET_DEVICE=" CPU ", DIAGNET_CPU_KERNELS="reference",
               DIAGNET_ATTENTION_KERNELS="numba", DIAGNET_BLAS_THREAD_TIMEOUT="12",
               DIAGNET_GOMP_SPINCOUNT="off", DIAGNET_HEAP=" Off ")
    code = ("from diagnet import settings as s; print(s.device, s.cpu_kernels, "
            "s.attention_kernels, s.blas_thread_timeout, s.gomp_spincount, s.heap)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    assert res.stdout.split() == ["cpu", "reference", "numba", "12", "off", "off"]


def test_a_bad_variable_fails_the_import_naming_it():
    env = dict(os.environ, DIAGNET_CPU_KERNELS="fast")
    res = subprocess.run([sys.executable, "-c", "import diagnet"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "DIAGNET_CPU_KERNELS must be one of ('numba', 'reference'); got 'fast'" in res.stderr


def test_setters_normalise_and_defaults_come_back_with_none():
    settings.set_device("cuda:0")
    assert settings.device == "cuda"
    settings.set_device(None)
    assert settings.device is None
    settings.set_cpu_kernels(" Reference ")
    assert settings.cpu_kernels == "reference"
    settings.set_attention_kernels(None)
    assert settings.attention_kernels == "blas"
    settings.set_blas_thread_timeout("OFF")
    assert settings.blas_thread_timeout == "off"
    settings.set_gomp_spincount(0)
    assert settings.gomp_spincount == 0
    settings.set_heap("NO")
    assert settings.heap == "off"
    settings.set_heap(None)
    assert settings.heap is None


@pytest.mark.parametrize("setter, value, error, message", [
    ("set_device", "tpu", ValueError, "device must be one of \\('cpu', 'cuda'\\); got 'tpu'"),
    ("set_device", 0, TypeError, "device must be a str.*got int"),
    ("set_cpu_kernels", "fast", ValueError, "cpu_kernels must be one of .*got 'fast'"),
    ("set_attention_kernels", 1, TypeError, "attention_kernels must be a str.*got int"),
    ("set_blas_thread_timeout", 3, ValueError, "blas_thread_timeout must be 'off' or an int "
                                               "in \\[4, 30\\]; got 3"),
    ("set_blas_thread_timeout", True, TypeError, "blas_thread_timeout .* got bool"),
    ("set_gomp_spincount", "-1", ValueError, "gomp_spincount must be 'off' or an int >= 0"),
    ("set_gomp_spincount", 2.5, TypeError, "gomp_spincount .* got float"),
    ("set_heap", "on", ValueError, "heap must be 'off' \\(or unset\\); got 'on'"),
    ("set_heap", 0, TypeError, "heap must be 'off' or None; got int"),
])
def test_a_refused_value_names_the_setting_and_changes_nothing(setter, value, error, message):
    before = {name: getattr(settings, name) for name in ("device", "cpu_kernels",
              "attention_kernels", "blas_thread_timeout", "gomp_spincount", "heap")}
    with pytest.raises(error, match=message):
        getattr(settings, setter)(value)
    assert {name: getattr(settings, name) for name in before} == before


def test_read_environment_checks_every_variable_before_changing_any():
    settings.set_cpu_kernels("numba")
    env = {settings.ENV_CPU_KERNELS: "reference", settings.ENV_GOMP_SPINCOUNT: "many"}
    with pytest.raises(ValueError, match="DIAGNET_GOMP_SPINCOUNT must be 'off' or an int"):
        settings.read_environment(env)
    assert settings.cpu_kernels == "numba"


def test_override_restores_every_setting():
    settings.set_device("cpu")
    settings.set_cpu_kernels("numba")
    with settings.override(cpu_kernels="reference"):
        assert settings.cpu_kernels == "reference"
        settings.set_device(None)  # changed inside the block: restored too
    assert settings.cpu_kernels == "numba" and settings.device == "cpu"
    with pytest.raises(TypeError, match="unknown settings \\['kernels'\\]"):
        with settings.override(kernels="reference"):
            pass
    assert backend.check_device is settings.check_device  # one device vocabulary
