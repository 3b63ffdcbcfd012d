"""Training utilities re-exported under ``diagnet.nn.utils``, as PyTorch users expect them."""

from ..clip import clip_grad_norm_, clip_grad_value_  # noqa: F401

__all__ = ["clip_grad_norm_", "clip_grad_value_"]
