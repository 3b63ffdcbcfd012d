"""Optimizers (`diagnet.optim`): update formulas, groups, state dicts, per-row state, clipping.

The update formulas are checked against reference loops written here in plain float64 NumPy
from PyTorch's documented formulas (and against a few values computed by hand, so that the
reference loops are checked too), and against ``torch.optim`` where torch is installed.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import diagnet as dn
from diagnet import backend
from diagnet.autograd import Tensor
from diagnet.nn.parameter import Parameter
from diagnet.optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm_, clip_grad_value_
from diagnet.optim import adam as adam_module
from diagnet.optim import sgd as sgd_module
from tolerances import F32_TOL, F64_TOL

SHAPE = (3, 4)
STEPS = 5


def _grads(seed, shape=SHAPE, steps=STEPS):
    """Gradients that vary from step to step in sign and size (shrinking sizes make
    AMSGrad's maximum differ from the plain second moment)."""
    rng = np.random.default_rng(seed)
    scales = np.array([3.0, 1.0, 0.3, 2.0, 0.1, 1.5, 0.5])[:steps]
    return [s * rng.standard_normal(shape) for s in scales]


def _start(seed, shape=SHAPE):
    return np.random.default_rng(seed + 1000).standard_normal(shape)


def _set_grad(param, g):
    param.grad = Tensor.from_array(np.asarray(g, dtype=param.dtype).copy())


def _run(opt, params, grads_per_param):
    """``opt.step()`` once per gradient, each param getting its own gradient sequence."""
    for step_grads in zip(*grads_per_param):
        for p, g in zip(params, step_grads):
            _set_grad(p, g)
        opt.step()


# ----------------------------------------------------------------------------- references

def sgd_reference(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False):
    p = np.array(p, dtype=np.float64)
    buf = None
    for g in grads:
        g = np.array(g, dtype=np.float64)
        if maximize:
            g = -g
        if weight_decay:
            g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


def adam_reference(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   amsgrad=False, maximize=False, decoupled=False):
    p = np.array(p, dtype=np.float64)
    b1, b2 = betas
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    v_max = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.array(g, dtype=np.float64)
        if maximize:
            g = -g
        if weight_decay and decoupled:
            p = p * (1 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if amsgrad:
            v_max = np.maximum(v_max, v)
        second = v_max if amsgrad else v
        denom = np.sqrt(second) / np.sqrt(1 - b2 ** t) + eps
        p = p - lr / (1 - b1 ** t) * m / denom
    return p, m, v


def test_sgd_reference_against_hand_computed_values():
    # p0 = 1, g = 1 then 2, lr 0.1, momentum 0.9, dampening 0.5:
    # step 1: buf = 1 (no dampening on the first step), p = 0.9
    # step 2: buf = 0.9 * 1 + 0.5 * 2 = 1.9, p = 0.9 - 0.19 = 0.71
    assert sgd_reference(1.0, [1.0, 2.0], 0.1, momentum=0.9, dampening=0.5) == pytest.approx(0.71)
    p = Parameter(np.array([1.0]))
    opt = SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    _run(opt, [p], [[np.array([1.0]), np.array([2.0])]])
    np.testing.assert_allclose(p.data, [0.71], **F64_TOL)
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"], [1.9], **F64_TOL)


def test_adam_first_step_moves_each_entry_by_lr():
    # at t = 1 the bias corrections undo the averaging: the step is lr * g / (|g| + eps)
    g = np.array([[3.0, -0.5], [1e-3, -20.0]])
    p = Parameter(np.zeros((2, 2)))
    opt = Adam([p], lr=0.1, eps=1e-8)
    _run(opt, [p], [[g]])
    np.testing.assert_allclose(p.data, -0.1 * g / (np.abs(g) + 1e-8), **F64_TOL)
    np.testing.assert_allclose(adam_reference(np.zeros((2, 2)), [g], lr=0.1)[0], p.data,
                               **F64_TOL)


# ----------------------------------------------------------------------------- SGD

SGD_CASES = {
    "plain": dict(lr=0.1),
    "weight_decay": dict(lr=0.05, weight_decay=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "momentum_dampening": dict(lr=0.1, momentum=0.8, dampening=0.3),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "maximize": dict(lr=0.1, momentum=0.5, maximize=True),
    "everything": dict(lr=0.02, momentum=0.7, weight_decay=0.05, nesterov=True, maximize=True),
}


@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_reference(case):
    kwargs = SGD_CASES[case]
    p0, grads = _start(1), _grads(1)
    p = Parameter(p0.copy())
    opt = SGD([p], **kwargs)
    _run(opt, [p], [grads])
    np.testing.assert_allclose(p.data, sgd_reference(p0, grads, **kwargs), **F64_TOL)
    # the reference is sensitive to the option under test: the plain update is far away
    if case != "plain":
        assert not np.allclose(p.data, sgd_reference(p0, grads, lr=kwargs["lr"]), rtol=1e-6)


def test_sgd_without_momentum_keeps_no_state():
    p = Parameter(_start(2))
    opt = SGD([p], lr=0.1)
    _run(opt, [p], [_grads(2)])
    assert opt.state[p] == {}


# ----------------------------------------------------------------------------- Adam

ADAM_CASES = {
    "default": (Adam, dict(lr=0.01)),
    "weight_decay": (Adam, dict(lr=0.01, weight_decay=0.1)),
    "amsgrad": (Adam, dict(lr=0.01, amsgrad=True)),
    "maximize": (Adam, dict(lr=0.01, maximize=True)),
    "betas_eps": (Adam, dict(lr=0.02, betas=(0.5, 0.9), eps=1e-3)),
    "adamw": (AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad_maximize": (AdamW, dict(lr=0.01, weight_decay=0.2, amsgrad=True,
                                           maximize=True)),
}


@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_matches_reference(case):
    cls, kwargs = ADAM_CASES[case]
    p0, grads = _start(3), _grads(3)
    p = Parameter(p0.copy())
    opt = cls([p], **kwargs)
    _run(opt, [p], [grads])
    want, m, v = adam_reference(p0, grads, decoupled=cls is AdamW, **kwargs)
    np.testing.assert_allclose(p.data, want, **F64_TOL)
    np.testing.assert_allclose(opt.state[p]["exp_avg"], m, **F64_TOL)
    np.testing.assert_allclose(opt.state[p]["exp_avg_sq"], v, **F64_TOL)
    assert opt.state[p]["step"] == STEPS and type(opt.state[p]["step"]) is int
    assert ("max_exp_avg_sq" in opt.state[p]) == kwargs.get("amsgrad", False)


def test_amsgrad_and_decoupling_change_the_result():
    """The cases above would pass with these options ignored if the references agreed."""
    p0, grads = _start(3), _grads(3)
    plain = adam_reference(p0, grads, lr=0.01)[0]
    assert not np.allclose(adam_reference(p0, grads, lr=0.01, amsgrad=True)[0], plain,
                           rtol=1e-6)
    coupled = adam_reference(p0, grads, lr=0.01, weight_decay=0.1)[0]
    decoupled = adam_reference(p0, grads, lr=0.01, weight_decay=0.1, decoupled=True)[0]
    assert not np.allclose(coupled, decoupled, rtol=1e-6)


def test_adamw_default_weight_decay_and_decoupled_shrink():
    p = Parameter(np.full((2,), 2.0))
    opt = AdamW([p], lr=0.1)
    assert opt.param_groups[0]["weight_decay"] == 1e-2
    assert Adam([Parameter(np.ones(2))]).param_groups[0]["weight_decay"] == 0.0
    # with a zero gradient the Adam part does nothing: only the decay acts
    _run(opt, [p], [[np.zeros(2)]])
    np.testing.assert_allclose(p.data, 2.0 * (1 - 0.1 * 1e-2), **F64_TOL)


# ----------------------------------------------------------------------------- foreach loops

FOREACH_CASES = {
    "adam": (Adam, dict(lr=0.01, weight_decay=0.1)),
    "adam_amsgrad": (Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "adam_maximize": (Adam, dict(lr=0.01, betas=(0.5, 0.9), eps=1e-3, maximize=True)),
    "adamw": (AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad_maximize": (AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True,
                                           maximize=True)),
    "sgd": (SGD, dict(lr=0.1)),
    "sgd_weight_decay_maximize": (SGD, dict(lr=0.05, weight_decay=0.1, maximize=True)),
    "sgd_momentum_dampening": (SGD, dict(lr=0.1, momentum=0.8, dampening=0.3,
                                         weight_decay=0.05)),
    "sgd_nesterov_maximize": (SGD, dict(lr=0.02, momentum=0.7, weight_decay=0.05,
                                        nesterov=True, maximize=True)),
}
#: more parameters than `_foreach.CHUNK`, of several shapes and sizes (0 to 117 values)
FOREACH_SHAPES = [(9, 13), (13,), (1, 1, 5), (), (4, 3), (17,), (2, 3, 4), (1,), (6, 6),
                  (0, 3), (5,), (3, 7), (8,)]


@pytest.fixture
def loop_calls(monkeypatch):
    """The foreach loops of Adam and SGD behind a guard: the list of calls (one entry per
    call) fills as they run, and a call whose arrays differ in size from the parameter they
    go with fails the test. Such a call reads and writes out of bounds (a segfault or damaged
    memory), so without the guard a regression would take the test process down instead."""
    calls = []

    def guard(loop):
        def run(*args):
            tuples = [a for a in args if isinstance(a, tuple)]
            for arrays in zip(*tuples):
                sizes = {a.size for a in arrays}
                assert len(sizes) == 1, f"a compiled loop ran on arrays of sizes {sizes}"
            calls.append(args)
            return loop(*args)
        return run

    for module in (adam_module, sgd_module):
        monkeypatch.setattr(module, "_foreach_loop",
                            lambda *options, make=module._foreach_loop: guard(make(*options)))
    return calls


def _one_at_a_time(cls):
    """``cls`` updating one parameter at a time in its NumPy code (`Optimizer._update_group`
    of the base class): the reference the foreach loops must equal bit for bit."""
    return type(f"OneAtATime{cls.__name__}", (cls,), {"_update_group": Optimizer._update_group})


def _assert_same_state(opt, ref, params, ref_params):
    for p, q in zip(params, ref_params):
        np.testing.assert_array_equal(p.data, q.data)
        assert opt.state.get(p, {}).keys() == ref.state.get(q, {}).keys()
        for key, value in opt.state.get(p, {}).items():
            assert type(value) is type(ref.state[q][key])
            np.testing.assert_array_equal(value, ref.state[q][key])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", FOREACH_CASES)
def test_foreach_loop_equals_the_numpy_code_bit_for_bit(case, dtype, loop_calls):
    """One group of parameters of many shapes, some without a gradient at some steps (so their
    step counts and momentum buffers differ): the compiled loop over the whole group gives
    exactly what the NumPy code gives one parameter at a time."""
    cls, kwargs = FOREACH_CASES[case]
    starts = [np.asarray(_start(50 + i, shape), dtype) for i, shape in enumerate(FOREACH_SHAPES)]
    grads = [[np.asarray(g, dtype) for g in _grads(60 + i, shape, steps=7)]
             for i, shape in enumerate(FOREACH_SHAPES)]
    params = [Parameter(p0.copy()) for p0 in starts]
    ref_params = [Parameter(p0.copy()) for p0 in starts]
    opt, ref = cls(params, **kwargs), _one_at_a_time(cls)(ref_params, **kwargs)
    for step in range(7):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            has_grad = (i + step) % 4 != 0
            for param in (p, q):
                param.grad = None
                if has_grad:
                    _set_grad(param, grads[i][step])
        opt.step()
        ref.step()
        _assert_same_state(opt, ref, params, ref_params)
    # every update went through the compiled loop (counting the non-empty arrays it got)
    updated = sum(a.size > 0 for call in loop_calls for a in call[0])
    assert updated == sum((i + step) % 4 != 0 for i in range(len(params)) for step in range(7)
                          if starts[i].size)
    assert all(not np.array_equal(p.data, p0) for p, p0 in zip(params, starts) if p0.size)
    if isinstance(opt, Adam):
        steps = {opt.state[p]["step"] for p in params}
        assert len(steps) > 1  # the step counts differ: the loop took them apart


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", ["adamw_amsgrad_maximize", "sgd_momentum_dampening",
                                  "sgd_nesterov_maximize"])
def test_numpy_code_updates_a_0d_parameter_and_keeps_its_state_as_arrays(case, device):
    """NumPy turns the result of an operation on 0-d arrays into a scalar: the NumPy code must
    neither fail on that (``out=`` a scalar) nor keep a scalar as state, which in-place
    updates would then miss (the momentum buffer stood still)."""
    cls, kwargs = FOREACH_CASES[case]
    xp = backend.xp_for(device)
    p0, grads = np.array(0.7), [np.asarray(g) for g in _grads(95, ())]
    p = Parameter(xp.asarray(p0.copy()))
    opt = _one_at_a_time(cls)([p], **kwargs)
    for g in grads:
        p.grad = Tensor.from_array(xp.asarray(g))
        opt.step()
    if cls is SGD:
        want = sgd_reference(p0, grads, **kwargs)
    else:
        want = adam_reference(p0, grads, decoupled=cls is AdamW, **kwargs)[0]
    np.testing.assert_allclose(backend.to_numpy(p.data), want, **F64_TOL)
    assert all(type(v) is type(p.data) and v.shape == () for k, v in opt.state[p].items()
               if k != "step")


@pytest.mark.parametrize("case", ["adamw_amsgrad_maximize", "sgd_nesterov_maximize"])
def test_foreach_group_with_arrays_the_loop_cannot_take(case, loop_calls):
    """Arrays that are not C-contiguous ndarrays take the NumPy code, in their place in the
    group: the result equals one parameter at a time, even where two parameters share memory
    (the first parameter is a transposed view of the third one's data)."""
    class Buffer(np.ndarray):
        pass

    cls, kwargs = FOREACH_CASES[case]
    shapes = [(3, 5), (5, 3), (5, 3), (6,), (4, 2), (7,)]

    def make_params():
        ps = [Parameter(_start(70 + i, shape).astype(np.float32))
              for i, shape in enumerate(shapes)]
        ps[0].data = ps[2].data.T                        # shares memory, not C-contiguous
        ps[1].data = np.asfortranarray(ps[1].data)       # not C-contiguous
        ps[3].data = ps[3].data.view(Buffer)             # an ndarray subclass
        return ps

    params, ref_params = make_params(), make_params()
    opt, ref = cls(params, **kwargs), _one_at_a_time(cls)(ref_params, **kwargs)
    for grads in zip(*[_grads(80 + i, shape, steps=4) for i, shape in enumerate(shapes)]):
        for p, q, g in zip(params, ref_params, grads):
            _set_grad(p, g)
            _set_grad(q, g)
        params[4].grad.data.flags.writeable = False      # a read-only gradient
        opt.step()
        ref.step()
        _assert_same_state(opt, ref, params, ref_params)
    # the loop took the two C-contiguous ndarrays, each a run of its own between the others
    assert len(loop_calls) == 2 * 4
    assert params[0].data.base is params[2].data


@pytest.mark.parametrize("case", ["adamw_amsgrad_maximize", "sgd_momentum_dampening"])
def test_foreach_group_mixing_float32_and_float64(case, loop_calls):
    """A group may hold float32 and float64 parameters: each compiled call takes one dtype."""
    cls, kwargs = FOREACH_CASES[case]
    dtypes = [np.float32, np.float32, np.float64, np.float64, np.float32]
    shapes = [(3, 4), (4,), (2, 5), (5,), (6,)]

    def make_params():
        return [Parameter(_start(100 + i, shape).astype(dtype))
                for i, (shape, dtype) in enumerate(zip(shapes, dtypes))]

    params, ref_params = make_params(), make_params()
    opt, ref = cls(params, **kwargs), _one_at_a_time(cls)(ref_params, **kwargs)
    for grads in zip(*[_grads(110 + i, shape, steps=3) for i, shape in enumerate(shapes)]):
        for p, q, g in zip(params, ref_params, grads):
            _set_grad(p, g)
            _set_grad(q, g)
        opt.step()
        ref.step()
        _assert_same_state(opt, ref, params, ref_params)
    assert len(loop_calls) == 3 * 3  # float32, float64, float32 at each step
    for call in loop_calls:
        assert len({a.dtype for a in call if isinstance(a, np.ndarray)} |
                   {a.dtype for t in call if isinstance(t, tuple) for a in t}) == 1


def test_foreach_loop_compiles_once_per_dtype():
    """Groups of every size share one compiled version of each loop per dtype (and set of
    options)."""
    for count in (1, 3, 8, 9, 20):
        for case in ("adam_amsgrad", "sgd_nesterov_maximize"):
            cls, kwargs = FOREACH_CASES[case]
            params = [Parameter(_start(90 + i, (i + 1,)).astype(np.float32))
                      for i in range(count)]
            _run(cls(params, **kwargs), params,
                 [_grads(90 + i, (i + 1,), steps=2) for i in range(count)])
    loops = [adam_module._foreach_loop(False, True, True),  # Adam, weight decay, amsgrad
             sgd_module._foreach_loop(True, True, True, True, True),  # the first step
             sgd_module._foreach_loop(True, True, True, True, False)]  # the others
    for loop in loops:
        signatures = [str(sig[0]) for sig in loop.signatures]
        assert sum("float32" in sig for sig in signatures) == 1, signatures


# ----------------------------------------------------------------------------- groups, dtypes

def test_parameter_groups_with_different_lrs():
    a0, b0 = _start(4), _start(5)
    ga, gb = _grads(4), _grads(5)
    a, b = Parameter(a0.copy()), Parameter(b0.copy())
    opt = SGD([{"params": [a], "lr": 0.3}, {"params": [b], "momentum": 0.5}], lr=0.01,
              momentum=0.9)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[1]["lr"] == 0.01 and opt.param_groups[1]["momentum"] == 0.5
    assert opt.param_groups[1]["nesterov"] is False  # defaults filled in
    _run(opt, [a, b], [ga, gb])
    np.testing.assert_allclose(a.data, sgd_reference(a0, ga, 0.3, momentum=0.9), **F64_TOL)
    np.testing.assert_allclose(b.data, sgd_reference(b0, gb, 0.01, momentum=0.5), **F64_TOL)


def test_group_lr_change_takes_effect():
    p = Parameter(np.zeros(3))
    opt = SGD([p], lr=0.1)
    opt.param_groups[0]["lr"] = 0.5
    _run(opt, [p], [[np.ones(3)]])
    np.testing.assert_allclose(p.data, -0.5, **F64_TOL)


def test_add_param_group():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(3))
    opt = Adam([a], lr=0.1)
    opt.add_param_group({"params": b, "lr": 0.2})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert len(opt.param_groups[1]["params"]) == 1 and opt.param_groups[1]["params"][0] is b
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="invalid lr=-1.*param group 2"):
        opt.add_param_group({"params": [Parameter(np.zeros(1))], "lr": -1})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True, maximize=True),
    lambda ps: Adam(ps, lr=0.01, weight_decay=0.01, amsgrad=True),
    lambda ps: AdamW(ps, lr=0.01, maximize=True),
], ids=["sgd", "sgd_nesterov", "adam", "adamw"])
def test_float32_parameters_stay_float32(make):
    p0 = _start(6).astype(np.float32)
    grads = [g.astype(np.float32) for g in _grads(6)]
    p = Parameter(p0.copy())
    opt = make([p])
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    array = p.data
    _run(opt, [p], [grads])
    assert p.data is array and p.dtype == np.float32
    for value in opt.state[p].values():
        assert not backend.is_array(value) or value.dtype == np.float32
    if isinstance(opt, SGD):
        want = sgd_reference(p0, grads, **group)
    else:
        want = adam_reference(p0, grads, decoupled=isinstance(opt, AdamW), **group)[0]
    np.testing.assert_allclose(p.data, want, **F32_TOL)


# ----------------------------------------------------------------------------- step mechanics

def test_step_is_in_place_skips_params_without_grad_and_records_no_graph():
    a, b = Parameter(np.ones(3)), Parameter(np.ones(3))
    opt = Adam([a, b], lr=0.1)
    array = a.data
    _set_grad(a, np.ones(3))
    opt.step()
    assert a.data is array and a.is_leaf and a.creator is None
    assert np.all(a.data < 1)
    np.testing.assert_array_equal(b.data, np.ones(3))
    assert a in opt.state and b not in opt.state


def test_step_closure_runs_with_grad_enabled_and_returns_its_loss():
    p = Parameter(np.array([2.0]))
    opt = SGD([p], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    with dn.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 4.0
    np.testing.assert_allclose(p.data, [2.0 - 0.25 * 4.0], **F64_TOL)


def test_zero_grad_both_forms():
    a, b = Parameter(np.ones(3)), Parameter(np.ones(2))
    opt = SGD([a, b], lr=0.1)
    _set_grad(a, [1.0, 2.0, 3.0])
    grad_array = a.grad.data
    opt.zero_grad(set_to_none=False)
    assert a.grad.data is grad_array  # zeroed in place
    np.testing.assert_array_equal(a.grad.data, 0)
    assert b.grad is None  # no gradient stays no gradient
    opt.zero_grad()
    assert a.grad is None


def test_state_is_keyed_by_parameter_identity():
    # equal values, distinct parameters: element-wise == must not merge them
    a, b = Parameter(np.ones(3)), Parameter(np.ones(3))
    assert hash(a) != hash(b)
    opt = Adam([a, b], lr=0.1)
    _set_grad(a, np.ones(3))
    _set_grad(b, -np.ones(3))
    opt.step()
    assert len(opt.state) == 2
    assert opt.state[a]["exp_avg"] is not opt.state[b]["exp_avg"]
    np.testing.assert_allclose(opt.state[a]["exp_avg"], 0.1)
    np.testing.assert_allclose(opt.state[b]["exp_avg"], -0.1)


def test_plain_tensors_can_be_optimized():
    t = dn.tensor(np.ones(2), dtype="float64", requires_grad=True)
    opt = SGD([t], lr=0.5)
    _set_grad(t, np.ones(2))
    opt.step()
    np.testing.assert_allclose(t.data, 0.5, **F64_TOL)


def test_optimizer_attaches_to_parameters():
    p = Parameter(np.ones(2))
    opt = SGD([p], lr=0.1)
    assert opt in p._optimizers


# ----------------------------------------------------------------------------- validation

def test_params_validation():
    p = Parameter(np.ones(2))
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="ordered"):
        SGD({p}, lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        SGD([{"params": [p]}, {"params": [p], "lr": 0.2}], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        SGD([p, p], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[1\].*int64"):
        SGD([p, dn.tensor(np.arange(3))], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\].*ndarray"):
        SGD([np.ones(3)], lr=0.1)
    leaf = dn.tensor(np.ones(2), dtype="float64", requires_grad=True)
    with pytest.raises(ValueError, match=r"non-leaf.*'h'"):
        SGD([("h", leaf * 2.0)], lr=0.1)
    with pytest.raises(ValueError, match="empty 'params'"):
        SGD([{"params": []}], lr=0.1)


@pytest.mark.parametrize("make, message", [
    (lambda ps: SGD(ps, lr=-0.1), r"invalid lr=-0\.1"),
    (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), r"invalid momentum=-0\.5"),
    (lambda ps: SGD(ps, lr=0.1, weight_decay=-1e-4), r"invalid weight_decay=-0\.0001"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), r"nesterov.*momentum > 0"),
    (lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     r"nesterov.*dampening=0\.1"),
    (lambda ps: Adam(ps, lr=-1e-3), r"invalid lr=-0\.001"),
    (lambda ps: Adam(ps, betas=(1.0, 0.999)), r"invalid betas\[0\]=1\.0"),
    (lambda ps: Adam(ps, betas=(0.9, -0.1)), r"invalid betas\[1\]=-0\.1"),
    (lambda ps: Adam(ps, eps=-1e-8), r"invalid eps=-1e-08"),
    (lambda ps: AdamW(ps, weight_decay=-0.01), r"invalid weight_decay=-0\.01"),
    (lambda ps: Adam(ps, lr=float("nan")), r"invalid lr=nan"),
    (lambda ps: SGD([{"params": ps}, {"params": [Parameter(np.ones(1))], "lr": -2}], lr=0.1),
     r"invalid lr=-2 in param group 1"),
])
def test_hyperparameter_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make([Parameter(np.ones(2))])


def test_hyperparameter_types():
    with pytest.raises(TypeError, match="lr"):
        SGD([Parameter(np.ones(2))], lr="0.1")
    with pytest.raises(TypeError, match="amsgrad"):
        Adam([Parameter(np.ones(2))], amsgrad=1)
    with pytest.raises(TypeError, match="betas"):
        Adam([Parameter(np.ones(2))], betas=0.9)


def test_numpy_hyperparameters_become_python_scalars():
    opt = Adam([Parameter(np.ones(2, np.float32))], lr=np.float64(0.1),
               betas=(np.float32(0.5), 0.9))
    group = opt.param_groups[0]
    assert type(group["lr"]) is float and all(type(b) is float for b in group["betas"])


def test_repr_lists_groups_and_hyperparameters():
    opt = SGD([{"params": [Parameter(np.ones(1))]},
               {"params": [Parameter(np.ones(1))], "lr": 0.5}], lr=0.1, momentum=0.9)
    text = repr(opt)
    assert text.startswith("SGD (\nParameter Group 0\n") and text.endswith("\n)")
    assert "Parameter Group 1\n" in text and "    lr: 0.5\n" in text
    assert "    momentum: 0.9\n" in text and "params" not in text


# ----------------------------------------------------------------------------- mismatched arrays

MISMATCH_OPTIMIZERS = {
    "adam": lambda ps: Adam(ps, lr=0.01),
    "adamw_amsgrad": lambda ps: AdamW(ps, lr=0.01, amsgrad=True),
    "sgd_momentum": lambda ps: SGD(ps, lr=0.1, momentum=0.9),
    "sgd": lambda ps: SGD(ps, lr=0.1),
}


def _linear_params(seed=40, dtype=np.float32):
    """A ``(4, 6)`` weight and a ``(4,)`` bias, as ``nn.Linear(6, 4)`` has them."""
    return (Parameter(_start(seed, (4, 6)).astype(dtype)),
            Parameter(_start(seed + 1, (4,)).astype(dtype)))


def _stepped(make, params, steps=2):
    """``make(named params)`` after ``steps`` good steps (so that state exists)."""
    opt = make(list(zip(["bias", "weight"], params[::-1])))
    _run(opt, list(params), [_grads(41 + i, p.shape, steps) for i, p in enumerate(params)])
    return opt


def _snapshot_all(opt):
    return [p.data.copy() for p in opt._params()], _snapshot(opt)


def _assert_unchanged(before, opt):
    values, snapshot = before
    for p, v in zip(opt._params(), values):
        np.testing.assert_array_equal(p.data, v)
    _assert_same(snapshot, opt)


@pytest.mark.parametrize("bad_grad, error, message", [
    (lambda w: Tensor.from_array(np.ones((1, 6), w.dtype)), ValueError,
     r"gradient of parameter 'weight' has shape \(1, 6\), but the parameter has shape \(4, 6\)"),
    (lambda w: Tensor.from_array(np.ones(6, w.dtype)), ValueError,  # would broadcast
     r"gradient of parameter 'weight' has shape \(6,\), but the parameter has shape \(4, 6\)"),
    (lambda w: Tensor.from_array(np.ones((4, 6))), ValueError,
     "gradient of parameter 'weight' has dtype float64, but the parameter has dtype float32"),
    (lambda w: np.ones((4, 6), w.dtype), TypeError,
     "gradient of parameter 'weight' must be a Tensor; got ndarray"),
], ids=["shape", "broadcastable", "dtype", "array"])
@pytest.mark.parametrize("make", MISMATCH_OPTIMIZERS.values(), ids=MISMATCH_OPTIMIZERS.keys())
def test_step_refuses_a_gradient_unlike_its_parameter_and_changes_nothing(
        make, bad_grad, error, message, loop_calls):
    w, b = _linear_params()
    opt = _stepped(make, (w, b))
    before = _snapshot_all(opt)
    _set_grad(b, np.ones(4))  # b comes first and is fine: a refused step must not update it
    w.grad = bad_grad(w)
    calls = len(loop_calls)
    with pytest.raises(error, match=message):
        opt.step()
    _assert_unchanged(before, opt)
    assert len(loop_calls) == calls  # refused before any compiled loop ran


def test_step_refusal_names_an_unnamed_parameter_by_group_and_index(loop_calls):
    a, b = Parameter(np.zeros(3)), Parameter(np.zeros((2, 3)))
    opt = Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    _set_grad(a, np.ones(3))
    b.grad = Tensor.from_array(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"gradient of params\[0\] in param group 1 has shape"):
        opt.step()
    assert not opt.state
    np.testing.assert_array_equal(a.data, 0.0)


def test_step_accepts_arrays_of_another_class_on_the_same_device():
    """The check compares array types for speed; an ndarray subclass is still a CPU array."""
    class Buffer(np.ndarray):
        pass

    p = Parameter(np.zeros((2, 3)))
    opt = SGD([p], lr=0.5, momentum=0.9)
    p.grad = Tensor.from_array(np.ones((2, 3)).view(Buffer))
    opt.step()
    opt.step()
    np.testing.assert_allclose(p.data, -0.5 - 0.5 * 1.9, **F64_TOL)


@pytest.mark.parametrize("replace, message", [
    (lambda w: np.zeros((8, 6), w.dtype),
     r"state '(exp_avg|momentum_buffer)' of parameter 'weight' has shape \(4, 6\), but the "
     r"parameter has shape \(8, 6\)"),
    (lambda w: np.zeros((2, 6), w.dtype), r"has shape \(4, 6\), but the parameter has shape"),
    (lambda w: w.data.astype(np.float64),
     "state '(exp_avg|momentum_buffer)' of parameter 'weight' has dtype float32, but the "
     "parameter has dtype float64"),
], ids=["larger", "smaller", "dtype"])
@pytest.mark.parametrize("make", [MISMATCH_OPTIMIZERS[k] for k in (
    "adam", "adamw_amsgrad", "sgd_momentum")], ids=["adam", "adamw_amsgrad", "sgd_momentum"])
def test_step_refuses_parameter_data_replaced_after_its_state_was_made(
        make, replace, message, loop_calls):
    w, b = _linear_params()
    opt = _stepped(make, (w, b))
    w.data = replace(w)
    _set_grad(b, np.ones(4))
    _set_grad(w, np.ones(w.shape))
    before = _snapshot_all(opt)
    calls = len(loop_calls)
    with pytest.raises(ValueError, match=message) as info:
        opt.step()
    assert "del optimizer.state[param]" in str(info.value)  # and says what to do instead
    _assert_unchanged(before, opt)
    assert len(loop_calls) == calls
    # dropping the stale state is one way out: the parameter starts afresh
    del opt.state[w]
    opt.step()
    assert all(v.shape == w.shape for v in opt.state[w].values() if backend.is_array(v))


_MISSING = object()


@pytest.mark.parametrize("step", [-1, float("nan"), 1e308, 2.0, True, 2 ** 63, "3", _MISSING],
                         ids=["negative", "nan", "huge-float", "whole-float", "bool", "2**63",
                              "str", "missing"])
@pytest.mark.parametrize("make", [MISMATCH_OPTIMIZERS[k] for k in ("adam", "adamw_amsgrad")],
                         ids=["adam", "adamw_amsgrad"])
def test_step_refuses_a_step_count_set_by_hand_and_changes_nothing(make, step, loop_calls):
    """Adam's bias correction uses the step count: one set in memory to -1, NaN or 1e308
    would silently give a wrong update (or a late TypeError or KeyError)."""
    w, b = _linear_params()
    opt = _stepped(make, (w, b))
    if step is _MISSING:
        del opt.state[w]["step"]
    else:
        opt.state[w]["step"] = step
    _set_grad(b, np.ones(4))  # b comes first and is fine: a refused step must not update it
    _set_grad(w, np.ones(w.shape))
    before = _snapshot_all(opt)
    calls = len(loop_calls)
    with pytest.raises(ValueError, match=r"optimizer state 'step' of parameter 'weight' must be "
                                         r"an int in \[0, 2\*\*63\) \(a step count\); got"):
        opt.step()
    _assert_unchanged(before, opt)
    assert len(loop_calls) == calls


@pytest.mark.gpu
def test_step_after_the_model_moved_to_the_gpu_names_the_devices():
    cp = backend.cupy_or_none()
    model = dn.nn.Linear(3, 2, device="cpu")
    opt = Adam(model.named_parameters(), lr=0.01)
    x = dn.tensor(_start(42, (5, 3)), dtype="float32", device="cpu")
    model(x).sum().backward()
    opt.step()
    model.to("cuda")
    model.zero_grad()
    model(x.to("cuda")).sum().backward()
    before = model.weight.numpy()
    with pytest.raises(ValueError, match="state 'exp_avg' of parameter 'weight' is on cpu, "
                                         "but the parameter is on cuda") as info:
        opt.step()
    assert "load_state_dict" in str(info.value)  # says how to move the state
    np.testing.assert_array_equal(model.weight.numpy(), before)
    # the way out that the message gives: load_state_dict copies the state to the parameters
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert isinstance(opt.state[model.weight]["exp_avg"], cp.ndarray)
    assert opt.state[model.weight]["step"] == 2
    model.weight.grad = Tensor.from_array(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="gradient of parameter 'weight' is on cpu, but the "
                                         "parameter is on cuda"):
        opt.step()


# ----------------------------------------------------------------------------- state dicts

def _adam_setup(seed=7, names=False):
    ps = [Parameter(_start(seed)), Parameter(_start(seed + 1)[0])]
    entries = list(zip(["w", "b"], ps)) if names else ps
    opt = Adam([{"params": entries[:1]}, {"params": entries[1:], "lr": 0.05}], lr=0.01,
               amsgrad=True)
    return ps, opt


def _snapshot(opt):
    """A deep copy of everything the optimizer holds (to check it did not change)."""
    return (copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                           for g in opt.param_groups]),
            {id(p): copy.deepcopy(s) for p, s in opt.state.items()})


def _assert_same(snapshot, opt):
    groups, state = snapshot
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert set(state) == {id(p) for p in opt.state}
    for p, s in opt.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            np.testing.assert_array_equal(v, state[id(p)][k])


def _plain_values(obj):
    """Every non-array value of a state dict (recursively), to check they are JSON types."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _plain_values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _plain_values(v)
    elif not backend.is_array(obj):
        yield obj


def test_state_dict_layout_is_torch_like_and_json_able():
    (w, b), opt = _adam_setup(names=True)
    _run(opt, [w, b], [_grads(7, w.shape, 2), _grads(8, b.shape, 2)])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "param_names"}
    assert sd["param_names"] == ["w", "b"]
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    assert sd["param_groups"][1]["lr"] == 0.05 and sd["param_groups"][0]["betas"] == [0.9, 0.999]
    assert set(sd["state"]) == {0, 1}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["exp_avg"] is opt.state[w]["exp_avg"]  # live arrays
    for value in _plain_values(sd):
        assert type(value) in (int, float, bool, str, type(None)), (type(value), value)
    without_arrays = {"param_groups": sd["param_groups"], "param_names": sd["param_names"],
                      "state": {i: {k: v for k, v in s.items() if not backend.is_array(v)}
                                for i, s in sd["state"].items()}}
    json.dumps(without_arrays)
    # unnamed parameters: no param_names entry
    _, unnamed = _adam_setup()
    assert "param_names" not in unnamed.state_dict()


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    lambda ps: Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.01),
    lambda ps: AdamW(ps, lr=0.01),
], ids=["sgd", "adam", "adamw"])
def test_state_dict_round_trip_continues_bit_identically(make):
    p0 = _start(9).astype(np.float32)
    grads = [g.astype(np.float32) for g in _grads(9, steps=7)]
    p = Parameter(p0.copy())
    opt = make([p])
    _run(opt, [p], [grads[:3]])
    sd = opt.state_dict()
    # what a checkpoint does: copy the arrays, store the rest as JSON
    saved = json.loads(json.dumps({
        "param_groups": sd["param_groups"],
        "state": {i: {k: v for k, v in s.items() if not backend.is_array(v)}
                  for i, s in sd["state"].items()}}))
    for i, s in sd["state"].items():
        saved["state"][str(i)].update({k: v.copy() for k, v in s.items() if backend.is_array(v)})
    q = Parameter(p.data.copy())
    fresh = make([q])
    fresh.load_state_dict(saved)
    for k, v in opt.state[p].items():
        assert not backend.is_array(v) or fresh.state[q][k] is not v  # copied, not shared
    _run(opt, [p], [grads[3:]])
    _run(fresh, [q], [grads[3:]])
    np.testing.assert_array_equal(q.data, p.data)
    assert q.dtype == np.float32


def test_load_state_dict_takes_hyperparameters_and_copies_arrays():
    (w, b), opt = _adam_setup()
    _run(opt, [w, b], [_grads(7, w.shape, 2), _grads(8, b.shape, 2)])
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.123
    (w2, b2), other = _adam_setup(seed=20)
    other.check_state_dict(sd)  # accepted, and nothing changes yet
    assert other.param_groups[0]["lr"] == 0.01 and not other.state
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.123 and other.param_groups[0]["params"][0] is w2
    assert other.param_groups[0]["betas"] == (0.9, 0.999)  # back to a tuple
    assert other.state[w2]["step"] == 2
    sd["state"][0]["exp_avg"][...] = 99.0
    assert not np.any(other.state[w2]["exp_avg"] == 99.0)


def _wrong_shape(sd):
    sd["state"][1]["exp_avg"] = np.zeros((7,))


def _wrong_dtype(sd):
    sd["state"][1]["exp_avg_sq"] = sd["state"][1]["exp_avg_sq"].astype(np.float32)


@pytest.mark.parametrize("spoil, message", [
    (lambda sd: sd["param_groups"].pop(), "has 1 parameter groups, but the optimizer has 2"),
    (lambda sd: sd["param_groups"][1]["params"].append(5),
     "param group 1: loaded state dict has 2 parameters"),
    (_wrong_shape, r"state 'exp_avg' of .* has shape \(7,\), but the parameter has shape "
                   r"\(4,\)"),
    (_wrong_dtype, "state 'exp_avg_sq' of .* has dtype float32, but the parameter has dtype "
                   "float64"),
    (lambda sd: sd["state"][1].update(momentum_buffer=np.zeros(4)),
     "unknown state entry 'momentum_buffer'"),
    (lambda sd: sd["state"][1].pop("step"), r"lacks \['step'\]"),
    (lambda sd: sd.update(extra=1), r"unknown keys .*extra"),
    (lambda sd: sd["param_groups"][0].update(momentum=0.9),
     r"unknown hyperparameters \['momentum'\]"),
    (lambda sd: sd["param_groups"][0].update(lr=-1.0), "invalid lr=-1.0 in loaded param group 0"),
    (lambda sd: sd["state"].update({5: {}}), "state entry 5 names no parameter"),
    (lambda sd: sd.update(param_names=["w", "c"]), "named 'b' here but 'c'"),
    *[pytest.param(lambda sd, step=step: sd["state"][1].update(step=step),
                   r"state 'step' of parameter 'b' must be an int in \[0, 2\*\*63\)",
                   id=f"step={step!r}")
      for step in (-1, float("nan"), 1e308, 2.5, 3.0, True, np.bool_(True), 2 ** 63, "3")],
])
def test_load_state_dict_errors_leave_the_optimizer_unchanged(spoil, message):
    (w, b), opt = _adam_setup(names=True)
    _run(opt, [w, b], [_grads(7, w.shape, 2), _grads(8, b.shape, 2)])
    (w2, b2), other = _adam_setup(seed=30, names=True)
    _run(other, [w2, b2], [_grads(9, w.shape, 3), _grads(10, b.shape, 3)])
    other.param_groups[0]["lr"] = 0.777
    before = _snapshot(other)
    sd = copy.deepcopy(opt.state_dict())
    spoil(sd)
    with pytest.raises(ValueError, match=message):
        other.check_state_dict(sd)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(sd)
    _assert_same(before, other)


def test_load_state_dict_takes_numpy_integer_steps_as_python_ints():
    (w, b), opt = _adam_setup()
    _run(opt, [w, b], [_grads(7, w.shape, 2), _grads(8, b.shape, 2)])
    sd = opt.state_dict()
    sd["state"][0]["step"] = np.int64(2)
    sd["state"][1]["step"] = 0  # saved before a first update: valid
    (w2, b2), other = _adam_setup()
    other.load_state_dict(sd)
    assert type(other.state[w2]["step"]) is int and other.state[w2]["step"] == 2
    _run(other, [w2, b2], [_grads(9, w.shape, 1), _grads(10, b.shape, 1)])
    assert other.state[b2]["step"] == 1 and np.all(np.isfinite(b2.data))


def test_load_state_dict_moves_state_into_place_in_parameter_order():
    (w, b), opt = _adam_setup()
    _run(opt, [w, b], [_grads(7, w.shape, 1), _grads(8, b.shape, 1)])
    sd = opt.state_dict()
    del sd["state"][0]  # only the second parameter has state
    (w2, b2), other = _adam_setup()
    other.load_state_dict(sd)
    assert w2 not in other.state and other.state[b2]["step"] == 1


# ----------------------------------------------------------------------------- per-row state

def _stepped_adam(p, seed=11, steps=2):
    opt = Adam([p], lr=0.1, amsgrad=True)
    _run(opt, [p], [_grads(seed, p.shape, steps)])
    return opt


def test_remap_rows_moves_parameter_grad_and_adam_state():
    p = Parameter(_start(11, (4, 3)))
    opt = _stepped_adam(p)
    _set_grad(p, _start(12, (4, 3)))
    old = {k: np.array(v, copy=True) for k, v in opt.state[p].items() if backend.is_array(v)}
    old_data, old_grad = p.data.copy(), p.grad.data.copy()
    index = np.array([2, -1, 0, 3])
    p.remap_rows(index)
    for new, before in [(p.data, old_data), (p.grad.data, old_grad)] + [
            (opt.state[p][k], old[k]) for k in old]:
        assert new.shape == (4, 3)
        np.testing.assert_array_equal(new[[0, 2, 3]], before[[2, 0, 3]])
        np.testing.assert_array_equal(new[1], 0.0)
    assert set(old) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert opt.state[p]["step"] == 2
    # the optimizer keeps working on the remapped state
    _set_grad(p, np.ones((4, 3)))
    opt.step()
    assert opt.state[p]["step"] == 3 and np.all(np.isfinite(p.data))


def test_remap_rows_can_change_the_row_count_and_works_on_1d_parameters():
    p = Parameter(_start(13, (3,)))
    opt = _stepped_adam(p, seed=13)
    m = opt.state[p]["exp_avg"].copy()
    p.remap_rows(np.array([-1, 2, 1, -1, 0]))
    assert p.shape == (5,) and opt.state[p]["exp_avg"].shape == (5,)
    np.testing.assert_array_equal(opt.state[p]["exp_avg"], [0.0, m[2], m[1], 0.0, m[0]])


def test_remap_rows_leaves_other_optimizers_alone_and_updates_every_holder():
    p = Parameter(_start(14, (4, 3)))
    q = Parameter(_start(15, (4, 3)))
    adam = Adam([p], lr=0.1)
    sgd = SGD([p], lr=0.1, momentum=0.9)  # a second optimizer holding the same parameter
    other = Adam([q], lr=0.1)
    for g_p, g_q in zip(_grads(14, (4, 3), 2), _grads(15, (4, 3), 2)):
        _set_grad(p, g_p)
        _set_grad(q, g_q)
        adam.step()
        sgd.step()
        other.step()
    other_state = {k: v for k, v in other.state[q].items()}
    other_copy = {k: np.array(v, copy=True) for k, v in other_state.items()
                  if backend.is_array(v)}
    buf = sgd.state[p]["momentum_buffer"].copy()
    m = adam.state[p]["exp_avg"].copy()
    p.remap_rows(np.array([3, 2, -1, 0]))
    np.testing.assert_array_equal(sgd.state[p]["momentum_buffer"][[0, 1, 3]], buf[[3, 2, 0]])
    np.testing.assert_array_equal(sgd.state[p]["momentum_buffer"][2], 0.0)
    np.testing.assert_array_equal(adam.state[p]["exp_avg"][[0, 1, 3]], m[[3, 2, 0]])
    for k, v in other.state[q].items():
        assert v is other_state[k]
        if k in other_copy:
            np.testing.assert_array_equal(v, other_copy[k])


def test_remap_rows_with_new_rows_and_a_wrong_index():
    p = Parameter(np.ones((3, 2)))
    opt = _stepped_adam(p)
    p.remap_rows(np.array([0, -1, 2]), new_rows=np.full((3, 2), 5.0))
    np.testing.assert_array_equal(p.data[1], 5.0)
    np.testing.assert_array_equal(opt.state[p]["exp_avg"][1], 0.0)
    with pytest.raises(ValueError, match="index has 2 entries but the parameter has 3 rows"):
        opt.remap_rows(p, np.array([0, 1]))


def test_reset_rows_zeroes_chosen_rows_of_the_state():
    p = Parameter(_start(16, (4, 3)))
    opt = _stepped_adam(p, seed=16)
    arrays = {k: v for k, v in opt.state[p].items() if backend.is_array(v)}
    before = {k: v.copy() for k, v in arrays.items()}
    data = p.data.copy()
    opt.reset_rows(p, np.array([0, 2]))
    for k, v in arrays.items():
        assert opt.state[p][k] is v  # in place
        np.testing.assert_array_equal(v[[0, 2]], 0.0)
        np.testing.assert_array_equal(v[[1, 3]], before[k][[1, 3]])
        assert np.all(before[k][[0, 2]] != 0)
    opt.reset_rows(p, np.array([False, True, False, False]))
    for v in arrays.values():
        np.testing.assert_array_equal(v[[0, 1, 2]], 0.0)
        assert np.all(v[3] != 0)
    np.testing.assert_array_equal(p.data, data)  # the parameter itself is not touched
    assert opt.state[p]["step"] == 2
    with pytest.raises(ValueError, match="does not hold"):
        opt.reset_rows(Parameter(np.ones((4, 3))), [0])
    with pytest.raises(ValueError, match="boolean mask must have shape"):
        opt.reset_rows(p, np.array([True, False]))


# ----------------------------------------------------------------------------- torch

TORCH_CASES = {
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "SGD-nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True),
    "Adam": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05),
    "Adam-amsgrad": dict(lr=0.01, amsgrad=True, maximize=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_matches_torch_optim(case):
    torch = pytest.importorskip(
        "torch", reason="torch is not installed: the comparison with torch.optim needs it "
                        "(the float64 NumPy references above cover the same formulas)")
    name = case.split("-")[0]
    kwargs = TORCH_CASES[case]
    p0, grads = _start(17), _grads(17)
    ours = Parameter(p0.copy())
    opt = getattr(dn.optim, name)([ours], **kwargs)
    theirs = torch.tensor(p0.copy(), dtype=torch.float64, requires_grad=True)
    topt = getattr(torch.optim, name)([theirs], **kwargs)
    for g in grads:
        _set_grad(ours, g)
        opt.step()
        theirs.grad = torch.tensor(g.copy(), dtype=torch.float64)
        topt.step()
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), **F64_TOL)


# ----------------------------------------------------------------------------- clipping

def _with_grads(seed, shapes=((3, 4), (5,), (2, 2, 2)), dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = []
    for shape in shapes:
        p = Parameter(np.zeros(shape, dtype=dtype))
        p.grad = Tensor.from_array(rng.standard_normal(shape).astype(dtype))
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf"), "inf"])
def test_clip_grad_norm_clips_to_max_norm(norm_type):
    params = _with_grads(18)
    flat = np.concatenate([p.grad.data.ravel() for p in params])
    order = float(norm_type)
    want = np.abs(flat).max() if order == np.inf else np.sum(np.abs(flat) ** order) ** (1 / order)
    originals = [p.grad.data.copy() for p in params]
    total = clip_grad_norm_(params, max_norm=0.5, norm_type=norm_type)
    assert isinstance(total, Tensor) and total.shape == () and total.dtype == np.float64
    np.testing.assert_allclose(total.item(), want, **F64_TOL)
    assert want > 0.5  # so clipping happened
    for p, g in zip(params, originals):
        np.testing.assert_allclose(p.grad.data, g * 0.5 / (want + 1e-6), **F64_TOL)
    flat = np.concatenate([p.grad.data.ravel() for p in params])
    new = np.abs(flat).max() if order == np.inf else np.sum(np.abs(flat) ** order) ** (1 / order)
    np.testing.assert_allclose(new, 0.5, rtol=1e-5)


def test_clip_grad_norm_leaves_small_gradients_unchanged():
    params = _with_grads(19, dtype=np.float32)
    originals = [p.grad.data.copy() for p in params]
    want = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in originals))
    total = clip_grad_norm_(params, max_norm=1e3)
    assert total.dtype == np.float32
    np.testing.assert_allclose(total.item(), want, **F32_TOL)
    for p, g in zip(params, originals):
        np.testing.assert_array_equal(p.grad.data, g)


def test_clip_grad_norm_skips_missing_grads_and_accepts_one_tensor():
    a, b = _with_grads(20, shapes=((3,), (2,)))
    b.grad = None
    total = clip_grad_norm_(a, 0.1)
    np.testing.assert_allclose(np.linalg.norm(a.grad.data), 0.1, rtol=1e-5)
    assert total.item() > 0.1
    assert clip_grad_norm_([b], 1.0).item() == 0.0


def test_clip_grad_norm_nonfinite():
    params = _with_grads(21)
    params[1].grad.data[2] = np.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    params[1].grad.data[2] = np.nan
    assert np.isnan(clip_grad_norm_(params, 1.0).item())  # as torch: no error by default


def test_clip_grad_value_and_argument_checks():
    params = _with_grads(22)
    originals = [p.grad.data.copy() for p in params]
    clip_grad_value_(params, 0.3)
    for p, g in zip(params, originals):
        np.testing.assert_array_equal(p.grad.data, np.clip(g, -0.3, 0.3))
    with pytest.raises(ValueError, match="max_norm=-1"):
        clip_grad_norm_(params, -1)
    before = [p.grad.data.copy() for p in params]
    total = clip_grad_norm_(params, float("inf"))  # the usual way to only measure the norm
    np.testing.assert_allclose(total.item(), np.sqrt(sum(np.sum(g ** 2) for g in before)),
                               **F64_TOL)
    for p, g in zip(params, before):
        np.testing.assert_array_equal(p.grad.data, g)
    with pytest.raises(ValueError, match="norm_type=0"):
        clip_grad_norm_(params, 1.0, norm_type=0)
    with pytest.raises(ValueError, match="clip_value=-0.1"):
        clip_grad_value_(params, -0.1)


def test_public_names():
    import diagnet.optim as optim

    for name in ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler", "StepLR",
                 "CosineAnnealingLR", "LinearWarmup", "WarmupCosine", "clip_grad_norm_",
                 "clip_grad_value_"]:
        assert hasattr(optim, name), name
    assert issubclass(AdamW, Adam) and issubclass(SGD, Optimizer)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_sgd_adam_remap_and_clip_match_cpu():
    cp = backend.cupy_or_none()
    counts = hasattr(cp, "host_transfers")  # the stand-in counts device-to-host reads
    p0, grads = _start(23, (4, 3)).astype(np.float32), [
        g.astype(np.float32) for g in _grads(23, (4, 3), 3)]
    results = {}
    for device in ("cpu", "cuda"):
        xp = backend.xp_for(device)
        a, b = Parameter(xp.asarray(p0.copy())), Parameter(xp.asarray(p0.copy()))
        sgd = SGD([a], lr=0.1, momentum=0.9, weight_decay=0.01)
        adam = Adam([b], lr=0.01, amsgrad=True)
        before = cp.host_transfers if counts else 0
        for g in grads:
            a.grad = Tensor.from_array(xp.array(g))  # copies: clipping scales them in place
            b.grad = Tensor.from_array(xp.array(g))
            total = clip_grad_norm_([a, b], 1.0)
            sgd.step()
            adam.step()
        index = xp.asarray(np.array([2, -1, 0, 3]))
        a.remap_rows(index)
        b.remap_rows(index)
        adam.reset_rows(b, xp.asarray(np.array([False, False, False, True])))
        if device == "cuda":
            assert isinstance(a.data, cp.ndarray) and isinstance(total.data, cp.ndarray)
            assert all(isinstance(v, cp.ndarray) for v in adam.state[b].values()
                       if not isinstance(v, int))
            if counts:
                assert cp.host_transfers == before, "a device-to-host read in the optimizers"
        results[device] = [backend.to_numpy(x) for x in (
            a.data, b.data, sgd.state[a]["momentum_buffer"], adam.state[b]["exp_avg"],
            adam.state[b]["exp_avg_sq"], adam.state[b]["max_exp_avg_sq"], total.data)]
        assert adam.state[b]["step"] == 3
    for got, want in zip(results["cuda"], results["cpu"]):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, **F32_TOL)
    # a CPU state dict loads into the GPU optimizer (arrays uploaded)
    cpu_p = Parameter(p0.copy())
    cpu_opt = Adam([cpu_p], lr=0.01)
    _run(cpu_opt, [cpu_p], [grads])
    gpu_p = Parameter(cp.asarray(p0.copy()))
    gpu_opt = Adam([gpu_p], lr=0.01)
    gpu_opt.load_state_dict(cpu_opt.state_dict())
    assert isinstance(gpu_opt.state[gpu_p]["exp_avg"], cp.ndarray)
    np.testing.assert_array_equal(backend.to_numpy(gpu_opt.state[gpu_p]["exp_avg"]),
                                  cpu_opt.state[cpu_p]["exp_avg"])


def test_mask_state_zeroes_masked_entries_of_every_per_element_state_in_place():
    p = Parameter(_start(17, (4, 3)))
    adam = _stepped_adam(p, seed=17)  # exp_avg, exp_avg_sq, max_exp_avg_sq and a step count
    sgd = SGD([p], lr=0.1, momentum=0.9)
    _run(sgd, [p], [_grads(18, (4, 3), 2)])
    keep = np.random.default_rng(0).random((4, 3)) < 0.5
    holders = [(adam, k) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")] + [
        (sgd, "momentum_buffer")]
    arrays = [opt.state[p][k] for opt, k in holders]
    before = [v.copy() for v in arrays]
    data = p.data.copy()
    adam.mask_state(p, keep)
    sgd.mask_state(p, dn.tensor(keep))  # a Tensor works too
    for (opt, k), v, old in zip(holders, arrays, before):
        assert opt.state[p][k] is v  # in place
        np.testing.assert_array_equal(v, old * keep)
        assert np.all(old[~keep] != 0)  # so the zeros come from mask_state
    np.testing.assert_array_equal(p.data, data)  # the parameter itself is not touched
    assert adam.state[p]["step"] == 2
    # a parameter without state yet: nothing to do
    fresh = Parameter(np.ones((4, 3)))
    idle = Adam([fresh], lr=0.1)
    idle.mask_state(fresh, keep)
    assert fresh not in idle.state
    with pytest.raises(ValueError, match="does not hold"):
        adam.mask_state(fresh, keep)
    with pytest.raises(ValueError, match=r"keep must have the parameter's shape \(4, 3\)"):
        adam.mask_state(p, keep[:2])
    with pytest.raises(TypeError, match="keep must be a boolean array"):
        adam.mask_state(p, keep.astype(np.float64))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mask_state_zeroes_masked_entries_that_hold_nan_or_inf(device):
    xp = backend.xp_for(device)
    p = Parameter(xp.asarray(_start(19, (3, 4))))
    opt = Adam([p], lr=0.1, amsgrad=True)
    for g in _grads(19, (3, 4), 2):
        p.grad = Tensor.from_array(xp.asarray(g))
        opt.step()
    keep = np.random.default_rng(2).random((3, 4)) < 0.5
    assert keep.any() and (~keep).sum() >= 3
    kept_nan = np.unravel_index(np.argmax(keep), keep.shape)
    arrays = {k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    before = {}
    for key, value in arrays.items():
        host = backend.to_numpy(value).copy()
        # NaN, inf and -inf at the masked entries: a product with the mask would keep NaN
        host[~keep] = np.resize([np.nan, np.inf, -np.inf], (~keep).sum())
        host[kept_nan] = np.nan  # a kept NaN stays: masking is not cleaning
        value[...] = xp.asarray(host)
        before[key] = host
    opt.mask_state(p, keep)
    for key, value in arrays.items():
        assert opt.state[p][key] is value
        got = backend.to_numpy(value)
        np.testing.assert_array_equal(got[~keep], 0.0)
        np.testing.assert_array_equal(got[keep], before[key][keep])
        assert np.isnan(got[kept_nan])
