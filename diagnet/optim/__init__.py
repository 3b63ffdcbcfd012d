"""Optimizers, learning-rate schedules and gradient clipping: diagnet's ``torch.optim``.

* `Optimizer`: the base class (parameter groups, lazy per-parameter state, state dicts,
  per-row state remapping for dynamic sparse training); `optimizer_params` lists an
  optimizer's parameters group by group.
* `SGD` (momentum, dampening, Nesterov, weight decay), `Adam` (AMSGrad, L2 weight decay) and
  `AdamW` (decoupled weight decay): PyTorch's update formulas, applied in place on the
  NumPy/CuPy arrays of the parameters.
* `lr_scheduler`: `StepLR`, `CosineAnnealingLR`, `LinearWarmup`, `WarmupCosine`, each a
  closed-form function of the step count.
* `clip_grad_norm_`, `clip_grad_value_`: gradient clipping without a host synchronisation
  (from `diagnet.clip`, below both ``optim`` and ``nn``).
"""

from ..clip import clip_grad_norm_, clip_grad_value_
from . import lr_scheduler
from .adam import Adam, AdamW
from .lr_scheduler import CosineAnnealingLR, LinearWarmup, LRScheduler, StepLR, WarmupCosine
from .optimizer import Optimizer, optimizer_params
from .sgd import SGD

__all__ = ["Optimizer", "optimizer_params", "SGD", "Adam", "AdamW", "lr_scheduler",
           "LRScheduler", "StepLR", "CosineAnnealingLR", "LinearWarmup", "WarmupCosine",
           "clip_grad_norm_", "clip_grad_value_"]
