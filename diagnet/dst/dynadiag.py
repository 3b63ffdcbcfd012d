"""DynaDiag: a learned soft top-k over the diagonals of a layer, annealed to a hard one.

The method (Tyagi et al., ICML 2025)
------------------------------------
A weight ``W`` ``(m, n)`` has ``P = max(m, n)`` wrap-around diagonals of length
``L = min(m, n)`` (the convention of `diagnet.nn.DiagLinear`); a budget of ``K`` of them
may be active. Each diagonal ``p`` has a learnable importance ``alpha_p``, and a soft top-k

    ``s = clamp(K * softmax(alpha / T), 0, 1)``        (over the candidate diagonals)

scales it: ``W = sum_p s_p V_p`` with ``V_p`` the values of diagonal ``p`` placed on it,
``y = x @ W.T + b``. ``s`` sums to about ``K``; where ``K * softmax > 1`` it is clamped to 1
and passes no gradient. The temperature ``T`` follows a schedule (`temperature`): at a high
``T`` every diagonal gets ``s ~ K / P``, at a low one the ``K`` largest ``alpha`` get 1 and the
rest 0. At a chosen epoch the selection is *frozen* to the hard top-``K`` of ``alpha``; from
then on the layer is a plain `DiagLinear` with ``K`` diagonals and ``alpha`` stops training.

Two modes, and what they cost
-----------------------------
* ``mode="reference"``: all ``P`` diagonals are stored and computed while the selection is
  soft, as in the paper's code: dense memory (``P * L = m * n`` values) and dense compute
  (``2 B m n`` flops per product), every step until the freeze. It exists for parity checks
  on small layers and as the baseline of the benchmark.
* ``mode="sparse"`` (default): only ``S = K + ceil(pool * K)`` diagonals (at most ``P``) are
  stored and computed: the ``K`` the soft top-k currently favours plus a *pool* of
  candidates. Forward and backward cost ``2 B S L`` flops each, and memory ``S * L`` values
  (plus ``alpha``, ``P`` numbers). The softmax of ``s`` runs over the ``S`` stored
  diagonals, the candidates of this mode, just as the reference's runs over its ``P``
  candidates: the stored scales sum to about ``K`` in both, and the top ``K`` approach 1 as
  ``T`` falls. (A softmax over all ``P`` would hand the diagonals that are not stored,
  which contribute nothing, most of the budget: at 90% sparsity and the default pool the
  stored ones would start at an eighth of the reference's total scale. Measured on MNIST,
  that variant trained to 97.7% where this one reaches 98.0%, the reference mode's
  accuracy.) A diagonal that is not stored contributes zero.

  Diagonals enter the stored set through `DynaDiagLinear.swap`, every ``swap_every`` steps
  (`DynaDiag` controller): the pool diagonals with the smallest scale leave, and the
  non-stored diagonals with the largest *gradient score* ``G_p = ||dL/dW on diagonal p||``
  enter, with zero values and fresh optimizer state. A swap step costs one dense product
  ``dy.T @ x`` (``2 B m n`` flops, `GradientTap`) and a host synchronisation; other steps
  pay nothing for it. With a pool covering all ``P`` diagonals, sparse mode *is* reference
  mode (same seed, same numbers).

The freeze keeps, among the stored diagonals, the ``K`` with the largest ``alpha`` (ties: the
lower offset), folds their current scale into their values (so the function changes only
by the dropped diagonals, whose scale is ~0 at a low temperature), stores exactly those
``K`` (``set_offsets``) and stops ``alpha``'s training. Afterwards the forward is exactly
`DiagLinear`'s, scale 1. (The reference sets the kept scales to 1 without folding; at its
freeze temperature they are 1 already, so both agree there.)

Metrics
-------
``sparsity`` is the realised one, ``1 - S / P`` (what memory and compute follow);
``effective_k()`` counts the stored diagonals with ``s > 1e-3`` (those that still shape the
function; ``effective_sparsity = 1 - effective_k / P``); ``itop()`` is the in-time
over-parameterisation rate, the fraction of all ``P`` diagonals that were ever stored (and
so computed and trained), kept in the persistent buffer ``ever_active``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import backend
from .. import random as _random
from ..autograd import Tensor
from ..config import no_grad
from ..diag import layout, validate
from ..nn.linear import DiagLinear
from ..nn._validate import positive_int
from ..nn.module import Module
from ..nn.parameter import Parameter
from ..ops import activation as _act
from ..ops import basic as _basic
from ..ops import shape as _shape
from ..ops.diagonal import DiagLinearFunction
from .base import SparsityController, event
from .capture import GradientTap
from .temperature import TemperatureSchedule

__all__ = ["DynaDiagLinear", "DynaDiag", "dynadiag_layers", "MODES", "EFFECTIVE_THRESHOLD"]

#: the values of ``DynaDiagLinear(mode=...)``
MODES = ("sparse", "reference")
#: a stored diagonal with scale above this counts as effective (`effective_k`)
EFFECTIVE_THRESHOLD = 1e-3


def _positive_temperature(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"temperature must be a positive finite number; got {value!r}")
    return float(value)


class DynaDiagLinear(DiagLinear):
    """A `DiagLinear` whose diagonals are chosen by DynaDiag's soft top-k (module doc).

    Args:
        in_features, out_features: sizes ``n`` and ``m`` of ``W`` (``m x n``).
        sparsity: target sparsity; the active budget is ``active_k = max(1, ceil((1 -
            sparsity) * P))`` diagonals (our rule, `DiagLinear`'s; the reference's
            ``max(1, ceil(floor((1 - s) m n) / L))`` can differ by one).
        bias: learn a bias ``(m,)``; it starts at zero, as in the reference layer.
        mode: ``"sparse"`` (default): store ``K + ceil(pool * K)`` diagonals (at most ``P``),
            chosen uniformly at random; ``"reference"``: store all ``P`` while soft.
        pool: the candidate pool of sparse mode, as a fraction of ``K`` (default 0.25;
            0 means no candidates, so nothing can be swapped). Ignored in reference mode.
        temperature: the initial ``T`` (default 1.0); the `DynaDiag` controller sets it.
        rng: None (default generator of `diagnet.random`), an int seed or a Generator:
            draws ``V`` for all ``P`` diagonals, then (sparse mode) the stored ones.
        dtype: float32 (default) or float64. device: ``"cpu"``/``"cuda"`` (default device).

    Initialisation is the reference's: ``V`` ~ U(-1/sqrt(L), 1/sqrt(L)) (PyTorch's
    ``kaiming_uniform_(a=sqrt(5))`` on a ``(P, L)`` tensor), drawn for all ``P`` diagonals
    in both modes (sparse mode keeps its stored rows), and ``alpha = 1/P``. This differs from
    `DiagLinear`'s ``1/sqrt(K L / m)`` on purpose. That bound keeps a dense layer's output
    variance for ``K`` diagonals of scale 1; here the effective weights are ``s_p V_p``, with
    ``s_p`` moving during training from ``K / P`` on every diagonal (a high ``T``) to 0 or 1
    (the freeze), so no fixed bound keeps the variance throughout. We draw what the
    reference draws (for a square layer, the dense ``nn.Linear`` bound ``1/sqrt(n)``), so
    that the two modes, and this layer and the paper's code, agree number for number.

    Attributes:
        ``offsets``, ``values`` (``(S, L)``), ``bias``: as in `DiagLinear` (``K`` there, and
        the inherited ``K``/``nnz``/``density``/``sparsity``, count the *stored* diagonals
        ``S``); ``alpha`` (parameter ``(P,)``); ``active_k`` (the budget); ``n_stored``
        (``S`` while soft); ``T`` (float); ``frozen`` (bool); buffers ``temperature`` and
        ``is_frozen`` (0-d, so that ``T`` and the freeze travel with the state dict) and
        ``ever_active`` (bool ``(P,)``).

    State dicts: a frozen layer stores ``K`` diagonals, a soft one ``S``. Loading a state
    (`load_state_dict` of the layer or of any model holding it, `diagnet.load`) first gives
    the layer the saved stored count (`_prepare_state`, through `set_offsets`, so that
    optimizers holding ``values`` follow), and undoes that if anything is refused.
    """

    def __init__(self, in_features, out_features, sparsity=0.9, bias=True, mode="sparse",
                 pool=0.25, temperature=1.0, rng=None, dtype=np.float32, device=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if isinstance(pool, bool) or not isinstance(pool, numbers.Real) \
                or not (math.isfinite(float(pool)) and float(pool) >= 0):
            raise ValueError(f"pool must be a finite number >= 0; got {pool!r}")
        T = _positive_temperature(temperature)
        m = positive_int("out_features", out_features)
        n = positive_int("in_features", in_features)
        shape = (m, n)
        P, L = layout.num_diagonals(shape), layout.diagonal_length(shape)
        K = layout.diagonals_for_sparsity(shape, validate.check_sparsity(sparsity))
        if mode == "reference":
            S = P
        else:  # round() first, as in diagonals_for_sparsity: 0.25 * 4 must stay 1
            S = min(P, K + math.ceil(round(float(pool) * K, 9)))
        gen = _random.as_generator(rng)
        bound = 1.0 / math.sqrt(L)
        V = gen.uniform(-bound, bound, size=(P, L))  # every diagonal, as the reference
        if S == P:
            host = np.arange(P, dtype=np.int64)
        else:
            host = np.sort(gen.choice(P, size=S, replace=False)).astype(np.int64)
        # DiagLinear builds the structure (offsets buffer, values, bias); its own draws come
        # from a throw-away generator and are replaced below by the reference's numbers.
        super().__init__(in_features, out_features, bias=bias, offsets=host,
                         rng=np.random.default_rng(0), dtype=dtype, device=device)
        dt, dev = self.values.dtype, self.values.device
        xp = backend.xp_for(dev)
        self.values.data = backend.to_device(V[host].astype(dt), dev)
        if self.bias is not None:
            self.bias.data = xp.zeros((m,), dtype=dt)
        self.target_sparsity = float(sparsity)
        self.mode, self.pool = mode, float(pool)
        self.active_k, self.n_stored = K, S
        self.alpha = Parameter(xp.full((P,), 1.0 / P, dtype=dt))
        self.register_buffer("temperature", Tensor._wrap(xp.asarray(T, dtype=dt)))
        self.register_buffer("is_frozen", Tensor._wrap(xp.zeros((), dtype=bool)))
        ever = np.zeros(P, dtype=bool)
        ever[host] = True
        self.register_buffer("ever_active", Tensor._wrap(backend.to_device(ever, dev)))
        self._T, self._frozen = T, False

    # ------------------------------------------------------------------ temperature, freeze
    @property
    def T(self) -> float:
        """The softmax temperature (a Python float; the buffer ``temperature`` mirrors it)."""
        return self._T

    @T.setter
    def T(self, value):
        self._T = _positive_temperature(value)
        self.temperature.data.fill(self._T)  # in place, on the device: no host round trip

    @property
    def frozen(self) -> bool:
        """True once `freeze` ran: ``K`` diagonals, scale 1, ``alpha`` no longer trained."""
        return self._frozen

    # ------------------------------------------------------------------ forward
    def stored_scale(self) -> Tensor:
        """``s`` of the stored diagonals, ``(S,)`` in the order of ``offsets``: the soft top-k
        ``clamp(K * softmax(alpha[offsets] / T), 0, 1)``, differentiable in ``alpha``.

        The softmax runs over the stored diagonals, the candidates the layer computes: in
        reference mode all ``P`` of them, which is the paper's formula; in sparse mode the
        ``S`` stored ones, so that their scales sum to about ``K`` as in the reference
        (a softmax over all ``P`` would give the ``P - S`` diagonals that are not stored a
        share of the budget while they contribute nothing: the stored ones would start at
        ``S K / P`` in total, an eighth of the reference's ``K`` at the default pool).
        Once frozen: ones.
        """
        if self._frozen:
            xp = backend.get_array_module(self.alpha.data)
            return Tensor._wrap(xp.ones(self.K, dtype=self.alpha.dtype))
        alpha = self.alpha
        if self.K != self.P:  # reference mode stores every diagonal in order: no gather
            alpha = _shape.getitem(alpha, self.offsets.data)
        soft = _act.softmax(alpha / self._T, axis=0)
        return _basic.clip(soft * self.active_k, 0.0, 1.0)

    def scale(self) -> Tensor:
        """``s`` over all ``P`` diagonals, ``(P,)``: `stored_scale` at the stored offsets, 0
        elsewhere (a diagonal that is not stored contributes nothing). Differentiable in
        ``alpha`` in reference mode; in sparse mode a constant (use `stored_scale`)."""
        s = self.stored_scale()
        if self.K == self.P:
            return s
        xp = backend.get_array_module(s.data)
        full = xp.zeros(self.P, dtype=s.dtype)
        full[self.offsets.data] = s.data
        return Tensor._wrap(full)

    def forward(self, x, add_bias=True):
        """``x`` ``(..., in_features)`` -> ``(..., out_features)``; ``add_bias=False`` leaves
        the bias out (as `Linear.forward`).

        While soft: ``y = x @ W.T + b`` with stored diagonal ``k`` scaled by
        ``s[offsets[k]]``; gradients reach ``values``, ``alpha``, ``bias`` and ``x``. Frozen:
        `DiagLinear.forward` exactly.
        """
        if self._frozen:
            return super().forward(x, add_bias)
        if not isinstance(x, Tensor):
            raise TypeError(f"DynaDiagLinear expects a Tensor; got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"DynaDiagLinear: x's last dim must be in_features="
                             f"{self.in_features}; got x of shape {x.shape}")
        scaled = self.values * _shape.reshape(self.stored_scale(), self.K, 1)
        fn = DiagLinearFunction(self._kernel_offsets(), self.shape)
        bias = self.bias if add_bias else None
        return fn(x, scaled) if bias is None else fn(x, scaled, bias)

    def _scale_data(self):
        """``s`` as a backend array ``(P,)``, outside the graph (same arithmetic as forward)."""
        with no_grad():
            return self.scale().data

    # ------------------------------------------------------------------ structure changes
    def set_offsets(self, offsets, keep=True, init="zeros", rng=None):
        """`DiagLinear.set_offsets`, keeping the stored count fixed while soft.

        The stored count ``S`` is part of the layer's configuration (the state dict of a soft
        layer is checked against it); only `freeze` and loading a state change it. Newly
        stored diagonals are marked in ``ever_active``.
        """
        count = np.shape(backend.unwrap(offsets))
        if not self._frozen and count != (self.n_stored,):
            raise ValueError(f"a soft DynaDiagLinear keeps {self.n_stored} stored diagonals; "
                             f"got offsets of shape {count} (freeze() changes the count)")
        return self._restructure(offsets, keep=keep, init=init, rng=rng)

    def _restructure(self, offsets, keep=True, init="zeros", rng=None):
        index = DiagLinear.set_offsets(self, offsets, keep=keep, init=init, rng=rng)
        self.ever_active.data[self.offsets.data] = True  # device scatter: no host sync
        return index

    def swap(self, scores, n, rng=None):
        """Replace up to ``n`` pool diagonals by better non-stored ones (sparse mode).

        Args:
            scores: ``(P,)`` array (NumPy/CuPy/Tensor): the gradient score of every diagonal,
                ``G_p = ||dy.T @ x on diagonal p||`` (`GradientTap.diagonal_scores`).
            n: the most diagonals to exchange (int >= 0).
            rng: tie-breaking noise: None (default generator), an int seed or a Generator.
                ``P`` uniform numbers are drawn per call, whatever happens.

        The rule:

        1. The stored diagonals are ranked by their scale ``s`` (ties by the noise); the
           ``K`` largest form the active set and never leave. The other ``S - K`` are the
           pool; the ``n`` with the smallest ``s`` are the candidates to leave.
        2. The non-stored diagonals are ranked by ``scores``, largest first (ties by the
           noise); the first ``n`` are the candidates to enter.
        3. The ``i``-th candidate out is exchanged for the ``i``-th candidate in only if the
           incoming score is strictly larger than the outgoing diagonal's own score: both
           are the norm of the loss gradient with respect to the entries of ``W`` on that
           diagonal, so an exchange never trades a diagonal for one the loss is less
           sensitive to, and a swap at convergence changes nothing.
        4. Incoming diagonals start with zero values, so the function changes only by the
           outgoing ones (small ``s``). Every optimizer holding ``values`` gives them fresh
           (zero) state (`set_offsets`); their ``alpha`` is set to the median ``alpha`` of
           the pool before the swap, so that they enter as average candidates rather than
           with whatever their ``alpha`` drifted to while absent, and ``alpha``'s optimizer
           state at them is reset (``reset_rows``) so that no momentum from that absence
           pushes them.

        Why a gradient score rather than ``alpha``: a diagonal that is not stored is outside
        the softmax and contributes nothing, so its ``alpha`` receives no gradient at all;
        it keeps whatever value it had when it left (or its initial ``1/P``) and says
        nothing about whether the diagonal would help now. The gradient norm at ``W``
        (RigL's criterion) says how fast the loss would fall if the diagonal were trained.

        ``active_k`` and the stored count never change; offsets stay sorted and unique. The
        host reads ``scores``, ``alpha`` and the offsets (one synchronisation per swap).

        Returns:
            ``(dropped, grown)``: lists of Python ints, the offsets that left and entered
            (equal lengths, disjoint, each sorted).
        """
        if self.mode != "sparse":
            raise ValueError("swap needs mode='sparse': a reference-mode layer stores every "
                             "diagonal already")
        if self._frozen:
            raise RuntimeError("swap: the layer is frozen; its diagonals are final")
        n = validate.check_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        host_scores = backend.to_numpy(backend.unwrap(scores)).astype(np.float64, copy=False)
        if host_scores.shape != (self.P,):
            raise ValueError(f"scores must have shape (P,) = ({self.P},); got "
                             f"{host_scores.shape}")
        if not np.all(np.isfinite(host_scores)):
            raise ValueError("scores must be finite")
        gen = _random.as_generator(rng)
        noise = gen.random(self.P)
        offsets = backend.to_numpy(self.offsets.data)
        s = backend.to_numpy(self._scale_data()).astype(np.float64)
        alpha = backend.to_numpy(self.alpha.data)
        # 1. stored diagonals by scale, smallest first; the last K are the active set
        order = offsets[np.lexsort((noise[offsets], s[offsets]))]
        pool = order[:offsets.size - self.active_k]
        # 2. non-stored diagonals by score, largest first
        stored = np.zeros(self.P, dtype=bool)
        stored[offsets] = True
        outside = np.flatnonzero(~stored)
        entering = outside[np.lexsort((noise[outside], -host_scores[outside]))]
        count = min(n, pool.size, entering.size)
        out, inn = pool[:count], entering[:count]
        # 3. exchange only where the incoming diagonal beats the outgoing one
        better = host_scores[inn] > host_scores[out]
        dropped, grown = np.sort(out[better]), np.sort(inn[better])
        if grown.size == 0:
            return [], []
        # 4. restructure; the new diagonals start at zero with fresh optimizer state
        median = np.median(alpha[pool])
        new = np.union1d(np.setdiff1d(offsets, dropped), grown)
        self._restructure(new, keep=True, init="zeros")
        xp = backend.get_array_module(self.alpha.data)
        rows = xp.asarray(grown)
        self.alpha.data[rows] = self.alpha.dtype.type(median)
        self.alpha._version_counter().bump()  # a graph that read alpha must not backward now
        for opt in list(self.alpha._optimizers):
            opt.reset_rows(self.alpha, rows)
        return dropped.tolist(), grown.tolist()

    def freeze(self):
        """Freeze the selection to the hard top-``K`` (see the module doc); returns the kept
        offsets (a list of ints), or None if the layer was frozen already.

        Keeps the ``active_k`` stored diagonals with the largest ``alpha`` (ties: the lower
        offset), multiplies their values by their current scale ``s`` (the same float
        product the forward used), stores only them (`set_offsets`: optimizers follow),
        sets ``alpha.requires_grad = False`` and drops its gradient, so optimizers skip it.
        """
        if self._frozen:
            return None
        offsets = backend.to_numpy(self.offsets.data)
        alpha = backend.to_numpy(self.alpha.data)
        best = np.lexsort((offsets, -alpha[offsets].astype(np.float64)))[:self.active_k]
        kept = np.sort(offsets[best])
        s = self._scale_data()
        xp = backend.get_array_module(s)
        s_kept = s[xp.asarray(kept)]
        self._restructure(kept, keep=True, init="zeros")
        self.values.data = self.values.data * s_kept.reshape(-1, 1)
        self.alpha.requires_grad = False
        self.alpha.grad = None
        self._frozen = True
        self.is_frozen.data.fill(True)
        return kept.tolist()

    # ------------------------------------------------------------------ metrics
    def effective_k(self) -> int:
        """Stored diagonals with ``s > 1e-3`` (all ``K`` once frozen). Reads the device."""
        if self._frozen:
            return self.K
        s = self._scale_data()[self.offsets.data]
        return int((s > EFFECTIVE_THRESHOLD).sum())

    @property
    def effective_sparsity(self) -> float:
        """``1 - effective_k / P``: the sparsity of the function (the realised one,
        `sparsity`, counts every stored diagonal)."""
        return 1.0 - self.effective_k() / self.P

    def itop(self) -> float:
        """In-time over-parameterisation: the fraction of the ``P`` diagonals ever stored."""
        return float(self.ever_active.data.mean())

    def weight_stats(self):
        """``(stored, dense)`` entries of ``W``: ``(S * L, m * n)`` (``K * L`` once frozen)."""
        return self.nnz, self.out_features * self.in_features

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"mode={self.mode!r}, active_k={self.active_k}, stored={self.K}/{self.P}, "
                f"T={self._T:.4g}, frozen={self._frozen}, bias={self.bias is not None}")

    # ------------------------------------------------------------------ state dicts
    def _prepare_state(self, local):
        """Take the stored count of the incoming ``offsets`` (``K`` frozen, ``S`` soft), before
        `Module` compares shapes; return the undo (see `Module._prepare_state`).

        The layer takes the saved offsets through `DiagLinear.set_offsets`, so every
        optimizer holding ``values`` resizes its per-row state with it (to zeros: the saved
        moments come with the optimizer's own state); the values come with the load.
        """
        saved = local.get("offsets")
        if saved is None or saved.ndim != 1 or saved.shape[0] == self.K:
            return None  # no offsets, or the same count: the shape checks handle it
        flag = local.get("is_frozen")
        frozen = bool(backend.to_numpy(flag)) if flag is not None and flag.shape == () \
            else self._frozen
        want = self.active_k if frozen else self.n_stored
        if saved.shape[0] != want:
            state = "frozen" if frozen else "soft"
            raise ValueError(f"offsets: a {state} DynaDiagLinear stores {want} diagonals "
                             f"(active_k={self.active_k}, n_stored={self.n_stored}); the "
                             f"state dict has {saved.shape[0]}")
        host = validate.validate_offsets(backend.to_numpy(saved), self.shape, "offsets")
        undo = self._structure_restorer()
        DiagLinear.set_offsets(self, host, keep=False)
        return undo

    def _structure_restorer(self):
        """A callable that puts back the current offsets, values (and gradient) and every
        optimizer's state of ``values``: the undo of a resize."""
        values = self.values
        kept = (self.offsets.data, values.data, values.grad, self._prepared,
                self._prepared_from)
        states = [(opt.state[values], dict(opt.state[values]))
                  for opt in list(values._optimizers) if values in opt.state]

        def undo():
            (self.offsets.data, values.data, values.grad, self._prepared,
             self._prepared_from) = kept
            for live, saved in states:  # the optimizer's own dict: references stay valid
                live.clear()
                live.update(saved)
        return undo

    def _check_state(self, local):
        super()._check_state(local)
        if "temperature" in local:
            _positive_temperature(float(backend.to_numpy(local["temperature"])))
        frozen = bool(backend.to_numpy(local["is_frozen"])) if "is_frozen" in local \
            else self._frozen
        if "offsets" in local:
            count, want = int(local["offsets"].shape[0]), \
                self.active_k if frozen else self.n_stored
            if count != want:
                state = "frozen" if frozen else "soft"
                raise ValueError(f"offsets: a {state} DynaDiagLinear stores {want} diagonals "
                                 f"(active_k={self.active_k}, n_stored={self.n_stored}); the "
                                 f"state dict has {count}")

    def _state_loaded(self):
        super()._state_loaded()
        self._T = float(backend.to_numpy(self.temperature.data))
        self._frozen = bool(backend.to_numpy(self.is_frozen.data))
        self.alpha.requires_grad = not self._frozen
        if self._frozen:
            self.alpha.grad = None


def dynadiag_layers(model) -> dict:
    """``{dotted name: layer}`` of every `DynaDiagLinear` in ``model`` (in module order)."""
    if not isinstance(model, Module):
        raise TypeError(f"model must be a Module; got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, DynaDiagLinear)}


class DynaDiag(SparsityController):
    """The DynaDiag training schedule: temperature, swaps (sparse mode) and the freeze.

    Args:
        layers: mapping name -> `DynaDiagLinear`, or a `Module` (its DynaDiagLinear layers).
        schedule: a `TemperatureSchedule`; its ``per`` says whether ``T`` is set at the
            start of each epoch or before each step. None: the controller leaves ``T`` alone.
        swap_every: swap every this many optimizer steps (after steps ``swap_every - 1``,
            ``2 * swap_every - 1``, ...); None (default) for no swaps. Sparse mode only.
        swap_until: no swaps from this step on (default None: until the freeze).
        swap_fraction: the share of a layer's pool considered per swap, in ``(0, 1]``
            (default 0.5): ``n = max(1, ceil(swap_fraction * (S - K)))`` (see
            `DynaDiagLinear.swap`, which also exchanges only where the newcomer's gradient
            score beats the leaver's).
        freeze_at: freeze every layer before epoch ``freeze_at`` starts (``freeze_per=
            "epoch"``, in `start_epoch`) or before step ``freeze_at`` runs (``"step"``, in
            `after_step` of step ``freeze_at - 1``); None (default): never. The reference
            freezes at epoch 30 of 100.
        freeze_per: ``"epoch"`` (default) or ``"step"``.
        rng: the controller's own generator for the swaps' tie-breaking noise: an int seed,
            a Generator, or None (seeded from `diagnet.random`'s default generator). Its
            state is in `state_dict`.

    Events (`event` dicts): ``{"event": "swap", "step", "layer", "dropped", "grown", "k",
    "stored", "sparsity", "effective_k", "itop", "temperature"}`` per layer at every swap step
    (empty lists when nothing beat the pool), and ``{"event": "freeze", "step", "layer",
    "kept", "k", "stored", "sparsity", "temperature"}`` (plus ``"epoch"`` at an epoch).
    """

    def __init__(self, layers, schedule=None, swap_every=None, swap_until=None,
                 swap_fraction=0.5, freeze_at=None, freeze_per="epoch", rng=None):
        if isinstance(layers, Module):
            layers = dynadiag_layers(layers)
        super().__init__(layers)
        for name, layer in self.layers.items():
            if not isinstance(layer, DynaDiagLinear):
                raise TypeError(f"layer {name!r} is a {type(layer).__name__}; DynaDiag manages "
                                "DynaDiagLinear layers")
        if schedule is not None and not isinstance(schedule, TemperatureSchedule):
            raise TypeError(f"schedule must be a TemperatureSchedule or None; got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule
        self.swap_every = self._optional_int("swap_every", swap_every, 1)
        self.swap_until = self._optional_int("swap_until", swap_until, 0)
        if isinstance(swap_fraction, bool) or not isinstance(swap_fraction, numbers.Real) \
                or not 0 < float(swap_fraction) <= 1:
            raise ValueError(f"swap_fraction must be in (0, 1]; got {swap_fraction!r}")
        self.swap_fraction = float(swap_fraction)
        if freeze_per not in ("epoch", "step"):
            raise ValueError(f"freeze_per must be 'epoch' or 'step'; got {freeze_per!r}")
        self.freeze_per = freeze_per
        self.freeze_at = self._optional_int("freeze_at", freeze_at,
                                            1 if freeze_per == "step" else 0)
        reference = [n for n, l in self.layers.items() if l.mode != "sparse"]
        if self.swap_every is not None and reference:
            raise ValueError(f"swap_every needs sparse-mode layers; {reference} are in "
                             "reference mode (they store every diagonal already)")
        if rng is None:  # a stream of its own, seeded from the default generator
            rng = int(_random.default_generator().integers(0, 2**63))
        self.rng = _random.as_generator(rng)
        self.tap = GradientTap(self.layers)
        self.temperature = None  # the last T this controller set
        self.epoch = None        # the last epoch started
        self.next_step = 0       # steps completed
        self.swaps = 0           # swap steps done

    @staticmethod
    def _optional_int(name, value, low):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be None or an int >= {low}; got {value!r}")
        return int(value)

    def config(self) -> dict:
        """The controller's settings, JSON-able (for run logs)."""
        return {"algorithm": "dynadiag",
                "schedule": None if self.schedule is None else self.schedule.config(),
                "swap_every": self.swap_every, "swap_until": self.swap_until,
                "swap_fraction": self.swap_fraction, "freeze_at": self.freeze_at,
                "freeze_per": self.freeze_per,
                "layers": {name: {"mode": l.mode, "active_k": l.active_k, "stored": l.n_stored,
                                  "P": l.P, "pool": l.pool}
                           for name, l in self.layers.items()}}

    # ------------------------------------------------------------------ the hooks
    def _set_temperature(self, T):
        self.temperature = float(T)
        for layer in self.layers.values():
            layer.T = self.temperature

    def _swaps_at(self, step) -> bool:
        return (self.swap_every is not None and (step + 1) % self.swap_every == 0
                and (self.swap_until is None or step < self.swap_until)
                and any(not layer.frozen for layer in self.layers.values()))

    def start_epoch(self, epoch: int) -> list:
        """Set ``T`` (per-epoch schedules), then freeze if ``epoch >= freeze_at`` (per epoch)."""
        epoch = validate.check_int(epoch, "epoch")
        self.epoch = epoch
        if self.schedule is not None and self.schedule.per == "epoch":
            self._set_temperature(self.schedule(epoch))
        if self.freeze_per == "epoch" and self.freeze_at is not None and epoch >= self.freeze_at:
            return self._freeze(self.next_step, epoch=epoch)
        return []

    def before_step(self, step: int) -> None:
        """Set ``T`` (per-step schedules); arm the gradient tap if ``step`` swaps."""
        step = validate.check_int(step, "step")
        if self.schedule is not None and self.schedule.per == "step":
            self._set_temperature(self.schedule(step))
        if self._swaps_at(step):
            self.tap.arm()

    def after_step(self, step: int) -> list:
        """Swap (at swap steps, from the tap's scores), then freeze (per step)."""
        step = validate.check_int(step, "step")
        events = []
        if self._swaps_at(step):
            n_done = 0
            for name, layer in self.layers.items():
                if layer.frozen or not self.tap.ready(name):
                    continue  # not called in this step's forward: nothing to score it by
                n = max(1, math.ceil(round(self.swap_fraction * (layer.K - layer.active_k), 9)))
                dropped, grown = layer.swap(self.tap.diagonal_scores(name), n, rng=self.rng)
                n_done += 1
                events.append(event("swap", step, layer=name, dropped=dropped, grown=grown,
                                    k=layer.active_k, stored=layer.K, sparsity=layer.sparsity,
                                    effective_k=layer.effective_k(), itop=layer.itop(),
                                    temperature=layer.T))
            self.swaps += 1 if n_done else 0
        self.tap.disarm()
        self.tap.clear()
        self.next_step = step + 1
        if self.freeze_per == "step" and self.freeze_at is not None and step + 1 >= self.freeze_at:
            events += self._freeze(step)
        return events

    def _freeze(self, step, **extra) -> list:
        events = []
        for name, layer in self.layers.items():
            kept = layer.freeze()
            if kept is not None:
                events.append(event("freeze", step, layer=name, kept=kept, k=layer.active_k,
                                    stored=layer.K, sparsity=layer.sparsity,
                                    temperature=layer.T, **extra))
        return events

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict:
        """``sparsity`` (realised, all layers), ``temperature``, ``effective_k`` (summed over
        layers), ``effective_sparsity`` (of the function: ``1 - sum effective_k * L / sum
        m n``) and ``itop`` (diagonals ever stored / all diagonals). Reads the device."""
        eff = [layer.effective_k() for layer in self.layers.values()]
        ever = sum(int(layer.ever_active.data.sum()) for layer in self.layers.values())
        total_p = sum(layer.P for layer in self.layers.values())
        dense = sum(layer.out_features * layer.in_features for layer in self.layers.values())
        eff_nnz = sum(k * layer.L for k, layer in zip(eff, self.layers.values()))
        T = self.temperature
        if T is None:
            T = next(iter(self.layers.values())).T
        return {"sparsity": self.sparsity(), "temperature": T, "effective_k": sum(eff),
                "effective_sparsity": 1.0 - eff_nnz / dense, "itop": ever / total_p}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-able: temperature, counters, the layers' frozen flags, the generator state."""
        return {"temperature": self.temperature, "epoch": self.epoch,
                "next_step": self.next_step, "swaps": self.swaps,
                "layers": list(self.layers),
                "frozen": [layer.frozen for layer in self.layers.values()],
                "rng": self.rng.bit_generator.state}

    def check_state_dict(self, state: dict) -> None:
        """ValueError if ``state`` does not fit this controller; changes nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"DynaDiag state must be a dict; got {type(state).__name__}")
        keys = {"temperature", "epoch", "next_step", "swaps", "layers", "frozen", "rng"}
        if set(state) != keys:
            raise ValueError(f"DynaDiag state must have the keys {sorted(keys)}; got "
                             f"{sorted(map(str, state))}")
        if list(state["layers"]) != list(self.layers):
            raise ValueError(f"DynaDiag state is for layers {list(state['layers'])}; this "
                             f"controller manages {list(self.layers)}")
        if state["temperature"] is not None:
            _positive_temperature(state["temperature"])
        if state["epoch"] is not None:
            self._optional_int("epoch", state["epoch"], 0)
        self._optional_int("next_step", state["next_step"], 0)
        self._optional_int("swaps", state["swaps"], 0)
        frozen = state["frozen"]
        if not isinstance(frozen, (list, tuple)) or len(frozen) != len(self.layers) \
                or not all(isinstance(f, (bool, np.bool_)) for f in frozen):
            raise ValueError(f"DynaDiag state 'frozen' must be {len(self.layers)} bools; got "
                             f"{frozen!r:.80}")
        self._checked_rng(state["rng"])

    def _checked_rng(self, saved):
        """The saved generator state as this controller's generator will hold it."""
        return _random.check_generator_state(saved, type(self.rng.bit_generator),
                                             "DynaDiag state 'rng'")

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (the layers' own state comes with the model's)."""
        self.check_state_dict(state)
        self.temperature = None if state["temperature"] is None else float(state["temperature"])
        if self.temperature is not None:
            for layer in self.layers.values():
                layer.T = self.temperature
        self.epoch = None if state["epoch"] is None else int(state["epoch"])
        self.next_step, self.swaps = int(state["next_step"]), int(state["swaps"])
        self.rng.bit_generator.state = self._checked_rng(state["rng"])
        self.tap.disarm()
        self.tap.clear()
