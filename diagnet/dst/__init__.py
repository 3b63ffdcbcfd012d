"""Dynamic sparse training: algorithms that change which weights a sparse layer stores.

* `SparsityController` (``base``): the protocol between an algorithm and the training loop;
* `GradientTap` (``capture``): a layer's input and output gradient at mask-update steps.
"""

from .base import SparsityController, event
from .capture import GradientTap
