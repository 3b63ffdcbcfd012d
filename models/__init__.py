"""Model definitions built only on diagnet's public API (``diagnet.models``).

* `MLP`: multilayer perceptron, dense or diagonal hidden layers;
* `ViT`: Vision Transformer, dense or diagonal attention and MLP layers;
* `MLPMixer`: MLP-Mixer, dense or diagonal token- and channel-mixing layers.

Every model takes ``linear="dense"|"diag"`` and ``sparsity``, ``dtype``, ``device`` and
``rng`` (the same seed gives the same parameters), and returns logits.
"""

from .mixer import MixerBlock, MLPMixer
from .mlp import MLP
from .vit import TransformerBlock, ViT

__all__ = ["MLP", "ViT", "MLPMixer", "TransformerBlock", "MixerBlock"]
