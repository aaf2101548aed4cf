"""Weight-averaging callbacks (EMA, SWA) keep a copy of the model that they update from this rank's replica.

Under local updates each rank's copy averages its own drifting replica, so the ranks would evaluate, save and
end ``fit`` with different averaged models (and checkpoints would hold rank 0's). These averages are linear in
the replicas (an EMA or a running mean is a weighted sum of iterates), so averaging the copies over ranks before
each use gives exactly the average of the consensus iterates. The strategy hands the copies to the algorithm,
which averages them at every consensus (validation, checkpoint weights) and at the end of ``fit``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel

try:  # Lightning >= 2.6
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - older Lightning has SWA only
    WeightAveraging = None  # type: ignore[assignment,misc]


def weight_averaging_copies(trainer: pl.Trainer) -> list[nn.Module]:
    """The averaged-model copies kept by the trainer's callbacks, as lazily resolved modules."""
    return [_LazyCopy(callback) for callback in trainer.callbacks if _keeps_a_copy(callback)]


def _keeps_a_copy(callback: object) -> bool:
    if isinstance(callback, StochasticWeightAveraging):
        return True
    if WeightAveraging is not None and isinstance(callback, WeightAveraging):
        return True
    return any(isinstance(value, AveragedModel) for value in vars(callback).values())


class _LazyCopy(nn.Module):
    """The callback's current averaged model; its parameters and buffers are those of that model, or none yet."""

    def __init__(self, callback: object) -> None:
        super().__init__()
        object.__setattr__(self, "_callback", callback)  # not a submodule: it is not ours to move or save

    def _target(self) -> nn.Module | None:
        callback = self._callback
        model = getattr(callback, "_average_model", None)
        if isinstance(model, nn.Module):
            return model
        return next((v for v in vars(callback).values() if isinstance(v, AveragedModel)), None)

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        target = self._target()
        return iter(()) if target is None else target.parameters(recurse)

    def buffers(self, recurse: bool = True):  # type: ignore[override]
        target = self._target()
        return iter(()) if target is None else target.buffers(recurse)
