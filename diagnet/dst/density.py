"""Layer-wise density: how a network's weight budget is split among its sparse layers.

Pure functions of the layers' weight shapes ``{name: (m, n)}`` (``m = out_features``,
``n = in_features``); nothing here touches a module. Three steps, each its own function:

1. `layer_densities`: a float density ``d_l`` per layer such that the overall density is
   exactly the requested ``D``::

       sum_l d_l * m_l * n_l  =  D * sum_l m_l * n_l

   * ``"uniform"``: every sparse layer gets the same ``d``;
   * ``"erk"`` (Erdős–Rényi-kernel, Evci et al. 2020 "Rigging the Lottery"):
     ``d_l = eps * ((m_l + n_l) / (m_l * n_l)) ** power`` with one factor ``eps`` for all
     layers, so small layers are denser. A layer whose ``d_l`` would exceed 1 is capped at 1
     and ``eps`` is solved again over the remaining layers; capping only raises ``eps``, so
     the loop ends after at most one round per layer.

   Layers named in ``dense`` are kept at density 1 and count towards the total (the
   "first/last layer dense" option).

2. `diagonal_budgets`: integers ``K_l`` (stored diagonals, ``1 <= K_l <= P_l``,
   ``P_l = max(m_l, n_l)``, each diagonal ``L_l = min(m_l, n_l)`` long). The exact share
   is the fractional ``K*_l = d_l * P_l`` (``d_l m_l n_l = K*_l L_l``); the integers are
   found by a largest-remainder rounding weighted by ``L_l``.

3. `element_budgets`: the same for unstructured masks, in single entries (``L_l = 1``).

Realised density, not only requested density: users of other DST libraries have reported
the realised density drifting from the target (sparse_learning issues 20 and 22: ERK with
capped layers, rounding per layer). Here the float densities hit the target exactly (to
rounding of float64), and the integer budgets to within half a diagonal (resp. half an
entry) of it by construction; see `diagonal_budgets` for the precise bound.
"""

from __future__ import annotations

import math

from ..checks import is_integer, number_in

__all__ = ["DISTRIBUTIONS", "layer_densities", "diagonal_budgets", "element_budgets"]

#: the values of the ``distribution=`` argument
DISTRIBUTIONS = ("uniform", "erk")


# ----------------------------------------------------------------------------- arguments

def _check_shapes(shapes) -> dict:
    if not hasattr(shapes, "items"):
        raise TypeError(f"shapes must be a mapping name -> (m, n); got {type(shapes).__name__}")
    out = {}
    for name, shape in shapes.items():
        ok = isinstance(shape, (tuple, list)) and len(shape) == 2 and all(
            is_integer(s) and s >= 1
            for s in shape)
        if not ok:
            raise ValueError(f"shape of layer {name!r} must be a pair of positive ints "
                             f"(out_features, in_features); got {shape!r}")
        out[name] = (int(shape[0]), int(shape[1]))
    if not out:
        raise ValueError("shapes is empty: give at least one layer")
    return out


def _check_density(density) -> float:
    return number_in("density", density, 0, 1, include_low=False)


def _check_dense(dense, shapes) -> set:
    if isinstance(dense, str):
        raise TypeError(f"dense must be a collection of layer names, not the string {dense!r} "
                        "(write dense=[name])")
    dense = set(dense)
    unknown = sorted(map(str, dense - set(shapes)))
    if unknown:
        raise ValueError(f"dense names layers that are not in shapes: {unknown}")
    return dense


# ----------------------------------------------------------------------------- densities

def layer_densities(shapes, density, distribution="uniform", dense=(), erk_power_scale=1.0):
    """Per-layer densities whose weighted mean is exactly ``density``.

    Args:
        shapes: mapping ``name -> (m, n)`` of the layers' weight shapes (positive ints).
        density: the overall density ``D`` in ``(0, 1]``:
            ``sum_l d_l m_l n_l / sum_l m_l n_l == D`` (to float64 rounding).
        distribution: ``"uniform"`` (one ``d`` for every sparse layer) or ``"erk"``
            (``d_l = eps * ((m_l + n_l) / (m_l n_l)) ** erk_power_scale``, capped at 1 with
            the rest redistributed; see the module docstring).
        dense: names of layers kept at density 1; they count towards the total.
        erk_power_scale: exponent of the ERK raw density (``0`` gives uniform); ``>= 0``.

    Returns:
        dict ``name -> d_l`` (floats in ``(0, 1]``), in the order of ``shapes``.

    Raises:
        ValueError: bad shapes, density, distribution or exponent; ``dense`` naming unknown
            layers; or a target that the ``dense`` layers alone already exceed (or, with
            every layer dense, do not reach).
    """
    shapes = _check_shapes(shapes)
    density = _check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}")
    number_in("erk_power_scale", erk_power_scale, 0, math.inf, include_high=False)
    dense = _check_dense(dense, shapes)
    size = {name: m * n for name, (m, n) in shapes.items()}
    total = sum(size.values())
    target = density * total                     # entries the whole network may store
    if distribution == "uniform":
        raw = {name: 1.0 for name in shapes}
    else:
        raw = {name: ((m + n) / (m * n)) ** float(erk_power_scale)
               for name, (m, n) in shapes.items()}

    full = set(dense)                            # layers at density 1: dense, then capped
    while True:
        sparse = [name for name in shapes if name not in full]
        budget = target - sum(size[name] for name in full)
        if not sparse:
            if abs(budget) > 1e-9 * total:
                raise ValueError(f"every layer is dense, so the density is 1, not {density}")
            break
        if budget <= 0:
            held = sum(size[name] for name in dense) / total
            raise ValueError(f"the dense layers {sorted(map(str, dense))} alone hold a "
                             f"fraction {held:.6g} of all weights, which leaves nothing for "
                             f"the sparse layers at density {density}; lower the number of "
                             "dense layers or raise the density")
        # budget = eps * sum_l raw_l * size_l over the sparse layers
        eps = budget / sum(raw[name] * size[name] for name in sparse)
        over = [name for name in sparse if eps * raw[name] > 1.0]
        if not over:
            break
        full.update(over)                        # capping raises eps: none comes back
    return {name: 1.0 if name in full else min(1.0, eps * raw[name]) for name in shapes}


# ----------------------------------------------------------------------------- integer budgets

def _apportion(exact, unit, upper, fixed):
    """Integers ``k_l`` in ``[1, upper_l]`` with ``sum k_l unit_l`` closest to
    ``sum exact_l unit_l``, by largest remainders.

    1. ``k_l = max(1, floor(exact_l))`` (``fixed`` layers: ``exact_l``, already whole);
    2. while short of the target: in order of decreasing remainder ``exact_l - k_l`` (ties
       in layer order), add 1 to a layer if that brings the total closer (``unit_l < 2R``);
    3. if the one-per-layer minimum overshot the target: in order of increasing remainder,
       take 1 from a non-fixed layer above 1 if that brings the total closer, repeated while
       any such move helps.
    """
    names = list(exact)
    k = {}
    for name in names:
        k[name] = int(round(exact[name])) if name in fixed else \
            min(upper[name], max(1, math.floor(exact[name])))
    target = sum(exact[name] * unit[name] for name in names)
    left = target - sum(k[name] * unit[name] for name in names)   # R: entries still to place
    order = sorted(names, key=lambda name: -(exact[name] - k[name]))   # stable: layer order
    for name in order:
        if left <= 0:
            break
        if name not in fixed and k[name] < upper[name] and unit[name] < 2 * left:
            k[name] += 1
            left -= unit[name]
    # only a forced minimum (a share below one unit) may push the total over the target:
    # otherwise every layer stays within one unit of its exact share
    moved = left < 0 and any(exact[name] < 1.0 for name in names if name not in fixed)
    while moved:
        moved = False
        for name in sorted(names, key=lambda name: exact[name] - k[name]):
            if name not in fixed and k[name] > 1 and unit[name] < -2 * left:
                k[name] -= 1
                left += unit[name]
                moved = True
    return k


def diagonal_budgets(shapes, density, distribution="uniform", dense=(), erk_power_scale=1.0):
    """Diagonals per layer: integers ``K_l`` whose stored entries hit ``density`` overall.

    Each layer of weight shape ``(m, n)`` has ``P = max(m, n)`` diagonals of length
    ``L = min(m, n)``; ``K_l`` stored diagonals hold ``K_l L_l`` entries. With ``d_l`` from
    `layer_densities`, the exact share is ``K*_l = d_l P_l`` and the target is
    ``T = density * sum_l m_l n_l = sum_l K*_l L_l``. The integers come from a
    largest-remainder rounding of ``K*_l`` weighted by ``L_l``.

    Bound: ``|sum_l K_l L_l - T| <= max_l L_l / 2`` whenever every ``K*_l >= 1`` (each
    step of the rounding only moves towards ``T``, and a layer is passed over only when
    its ``L_l`` exceeds twice what is left). Layers whose share is below one diagonal are
    raised to ``K_l = 1``; the overshoot that forces is then taken back from other layers
    where that helps. Layers in ``dense`` (and capped ERK layers) get ``K_l = P_l``.

    Args: as `layer_densities`.

    Returns:
        dict ``name -> K_l`` (Python ints, ``1 <= K_l <= P_l``), in the order of ``shapes``.
    """
    dens = layer_densities(shapes, density, distribution, dense, erk_power_scale)
    shapes = _check_shapes(shapes)
    P = {name: max(shape) for name, shape in shapes.items()}
    L = {name: min(shape) for name, shape in shapes.items()}
    exact = {name: dens[name] * P[name] for name in shapes}
    fixed = {name for name in shapes if dens[name] == 1.0}
    exact.update((name, float(P[name])) for name in fixed)
    return _apportion(exact, L, P, fixed)


def element_budgets(shapes, density, distribution="uniform", dense=(), erk_power_scale=1.0):
    """Active entries per layer for unstructured masks: integers ``k_l`` in ``[1, m_l n_l]``.

    The exact share is ``d_l m_l n_l`` (``d_l`` from `layer_densities`); the same
    largest-remainder rounding as `diagonal_budgets` with unit weights makes the total
    ``sum_l k_l`` equal to the target ``density * sum_l m_l n_l`` to within half an entry
    (so exactly its rounding, unless a layer had to be raised to one entry).

    Args: as `layer_densities`.

    Returns:
        dict ``name -> k_l`` (Python ints), in the order of ``shapes``.
    """
    dens = layer_densities(shapes, density, distribution, dense, erk_power_scale)
    shapes = _check_shapes(shapes)
    size = {name: m * n for name, (m, n) in shapes.items()}
    exact = {name: dens[name] * size[name] for name in shapes}
    fixed = {name for name in shapes if dens[name] == 1.0}
    exact.update((name, float(size[name])) for name in fixed)
    return _apportion(exact, {name: 1 for name in shapes}, size, fixed)
