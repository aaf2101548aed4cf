"""DropIT: activation memory saved by keeping only the largest entries of each layer input for backward.

Chen et al., "DropIT: Dropping Intermediate Tensors for Memory-Efficient DNN Training", ICLR 2023,
arXiv 2202.13808. Per rank, so it composes with every strategy. Lightning: ``DropITCallback(gamma=0.9)``;
Fabric and plain PyTorch: ``apply_dropit(model, gamma=0.9)`` / ``remove_dropit(model)``. See docs/dropit.md.
"""

from lightning_localsgd.dropit.callback import DropITCallback
from lightning_localsgd.dropit.functional import dropit_conv2d, dropit_linear, keep_count, saves_memory
from lightning_localsgd.dropit.memory import SavedTensorBytes
from lightning_localsgd.dropit.modules import DropITConv2d, DropITLinear
from lightning_localsgd.dropit.swap import apply_dropit, dropit_layers, remove_dropit

__all__ = [
    "DropITCallback",
    "DropITConv2d",
    "DropITLinear",
    "SavedTensorBytes",
    "apply_dropit",
    "dropit_conv2d",
    "dropit_layers",
    "dropit_linear",
    "keep_count",
    "remove_dropit",
    "saves_memory",
]
