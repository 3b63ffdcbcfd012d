"""The shared argument checks of `diagnet.checks`: what each accepts, returns and refuses."""

import math
import re

import numpy as np
import pytest

from diagnet import checks
from diagnet.autograd import FLOAT_DTYPES as AUTOGRAD_FLOAT_DTYPES


@pytest.mark.parametrize("value, integer, real", [
    (3, True, True), (np.int64(3), True, True), (np.uint8(3), True, True),
    (2.5, False, True), (np.float32(2.5), False, True), (math.nan, False, True),
    (True, False, False), (np.bool_(True), False, False), ("3", False, False),
    (None, False, False), (1 + 0j, False, False),
])
def test_predicates_count_no_bool_as_a_number(value, integer, real):
    assert checks.is_integer(value) is integer
    assert checks.is_real(value) is real


def test_int_at_least_returns_a_python_int_and_names_the_argument():
    assert checks.int_at_least("epochs", np.int32(3), 1) == 3
    assert type(checks.int_at_least("epochs", np.int32(3), 1)) is int
    assert checks.int_at_least("seed", 0, 0) == 0
    for bad in (0, -1, 1.0, True, "2", None):
        with pytest.raises(ValueError, match=rf"epochs must be an int >= 1; got {bad!r}"):
            checks.int_at_least("epochs", bad, 1)


def test_int_at_least_optional_accepts_none_and_says_so():
    assert checks.int_at_least("limit", None, 0, optional=True) is None
    assert checks.int_at_least("limit", 5, 0, optional=True) == 5
    with pytest.raises(ValueError, match=r"limit must be None or an int >= 0; got -1"):
        checks.int_at_least("limit", -1, 0, optional=True)


@pytest.mark.parametrize("low, high, include_low, include_high, good, bad, interval", [
    (0, 1, True, True, (0, 0.5, 1, np.float32(1.0)), (-0.1, 1.5, math.nan), "[0, 1]"),
    (0, 1, False, True, (1e-9, 1), (0, 0.0, -1), "(0, 1]"),
    (0, 1, True, False, (0, 0.999), (1, 1.0), "[0, 1)"),
    (0, math.inf, False, False, (1e-300, 1e300), (0, -1, math.inf, math.nan), "(0, inf)"),
    (0, math.inf, True, False, (0, 7), (-1e-9, math.inf, 10 ** 400), "[0, inf)"),
])
def test_number_in(low, high, include_low, include_high, good, bad, interval):
    for value in good:
        result = checks.number_in("x", value, low, high, include_low=include_low,
                                  include_high=include_high)
        assert type(result) is float and result == float(value)
    for value in bad + (True, "0.5", None):
        with pytest.raises(ValueError, match=rf"x must be a number in {re.escape(interval)}; got"):
            checks.number_in("x", value, low, high, include_low=include_low,
                             include_high=include_high)


def test_float_dtypes_are_defined_once_and_checked_by_float_dtype():
    assert AUTOGRAD_FLOAT_DTYPES is checks.FLOAT_DTYPES
    assert checks.float_dtype("float32") == np.float32
    assert checks.float_dtype(np.float64) == np.float64
    for bad, shown in (("float16", "float16"), (np.int32, "int32"), ("nope", "'nope'")):
        with pytest.raises(TypeError, match=rf"dtype must be float32 or float64; got {shown}"):
            checks.float_dtype(bad)
