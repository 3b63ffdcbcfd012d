"""`VersionCounter`: when a tensor's data was last changed in place.

The engine reads it at backward (`engine`) to refuse a node whose inputs or outputs
changed after it ran; `Tensor` makes one on first use and shares it with its views.
"""

from __future__ import annotations


class VersionCounter:
    """When the data of a tensor was last changed in place (shared by views of one array).

    Every in-place change (an in-place op, an optimizer step, a change of a layer's
    structure) calls `bump`, which advances the class-wide ``clock`` and stamps the counter
    with it. A `Function` notes the clock when it runs; at backward, an input or output
    whose stamp is later than that note was changed after the node saw it, and the node
    refuses to run (PyTorch's version counter, after which this is modelled).

    Keeping one clock for all tensors makes the common case one comparison per node: if the
    clock has not moved since the node ran, nothing anywhere was changed in place.

    Attributes:
        value: the clock reading of the last change, 0 if the data never changed in place.
        clock: (class attribute) the number of in-place changes made so far.
    """

    __slots__ = ("value",)
    clock = 0

    def __init__(self):
        self.value = 0

    def bump(self) -> None:
        """Record an in-place change of the data this counter belongs to."""
        VersionCounter.clock += 1
        self.value = VersionCounter.clock
