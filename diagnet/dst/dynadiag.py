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
  stored ones would start at an eighth of the reference's total scale, and that variant
  trained to a lower accuracy; see docs/benchmarks.md.) A diagonal that is not stored
  contributes zero.

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

This module holds the layer and `dynadiag_layers`; the `DynaDiag` controller, which decides
when the layers swap and freeze, is in `diagnet.dst.dynadiag_controller`, and the rules
that pick the diagonals (shared with SET/RigL) in `diagnet.dst.select`.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import random as _random
from ..autograd import Tensor
from ..checks import number_in, positive_int
from ..config import no_grad
from ..diag import layout, validate
from ..nn.linear import DiagLinear
from ..nn.module import Module
from ..nn.parameter import Parameter
from ..ops import activation as _act
from ..ops import basic as _basic
from ..ops import inplace as _inplace
from ..ops import shape as _shape
from ..ops.diagonal import DiagLinearFunction
from .base import ever_active
from .select import random_subset, ranking, swap_pairs

__all__ = ["DynaDiagLinear", "dynadiag_layers", "check_temperature", "MODES",
           "EFFECTIVE_THRESHOLD"]

#: the values of ``DynaDiagLinear(mode=...)``
MODES = ("sparse", "reference")
#: a stored diagonal with scale above this counts as effective (`effective_k`)
EFFECTIVE_THRESHOLD = 1e-3


def check_temperature(value) -> float:
    """``value`` as a float; ValueError unless it is a positive finite real number."""
    return number_in("temperature", value, 0, math.inf, include_low=False, include_high=False)


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
        number_in("pool", pool, 0, math.inf, include_high=False)
        T = check_temperature(temperature)
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
        host = np.arange(P, dtype=np.int64) if S == P else random_subset(P, S, gen)
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
        self.register_buffer("temperature", Tensor.from_array(xp.asarray(T, dtype=dt)))
        self.register_buffer("is_frozen", Tensor.from_array(xp.zeros((), dtype=bool)))
        self.register_buffer("ever_active",
                             Tensor.from_array(backend.to_device(ever_active(P, host), dev)))
        self._T, self._frozen = T, False

    # ------------------------------------------------------------------ temperature, freeze
    @property
    def T(self) -> float:
        """The softmax temperature (a Python float; the buffer ``temperature`` mirrors it)."""
        return self._T

    @T.setter
    def T(self, value):
        self._T = check_temperature(value)
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
            return Tensor.from_array(xp.ones(self.K, dtype=self.alpha.dtype))
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
        return Tensor.from_array(full)

    def forward(self, x, add_bias=True, relu=False):
        """``x`` ``(..., in_features)`` -> ``(..., out_features)``; ``add_bias=False`` leaves
        the bias out and ``relu=True`` applies a ReLU in the same node (as
        `DiagLinear.forward`).

        While soft: ``y = x @ W.T + b`` with stored diagonal ``k`` scaled by
        ``s[offsets[k]]``; gradients reach ``values``, ``alpha``, ``bias`` and ``x``. Frozen:
        `DiagLinear.forward` exactly.
        """
        if self._frozen:
            return super().forward(x, add_bias, relu)
        if not isinstance(x, Tensor):
            raise TypeError(f"DynaDiagLinear expects a Tensor; got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"DynaDiagLinear: x's last dim must be in_features="
                             f"{self.in_features}; got x of shape {x.shape}")
        if type(relu) is not bool:
            raise TypeError(f"DynaDiagLinear: relu must be a bool; got {type(relu).__name__}")
        scaled = self.values * _shape.reshape(self.stored_scale(), self.K, 1)
        fn = DiagLinearFunction(self._kernel_offsets(), self.shape, relu)
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
        # 1.-3. who leaves and who enters
        dropped, grown, pool = swap_pairs(offsets, s, host_scores, self.active_k, n, noise)
        if grown.size == 0:
            return [], []
        # 4. restructure; the new diagonals start at zero with fresh optimizer state
        median = np.median(alpha[pool])
        new = np.union1d(np.setdiff1d(offsets, dropped), grown)
        self._restructure(new, keep=True, init="zeros")
        xp = backend.get_array_module(self.alpha.data)
        rows = xp.asarray(grown)
        with no_grad():  # bumps alpha's version: a graph that read alpha must not backward now
            _inplace.setitem(self.alpha, rows, median)
        for opt in self.alpha.optimizers():
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
        best = ranking(-alpha[offsets].astype(np.float64), offsets)[:self.active_k]
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
                  for opt in values.optimizers() if values in opt.state]

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
            check_temperature(float(backend.to_numpy(local["temperature"])))
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
