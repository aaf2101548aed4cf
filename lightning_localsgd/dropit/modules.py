"""``nn.Linear`` and ``nn.Conv2d`` with DropIT's backward (see :mod:`lightning_localsgd.dropit.functional`).

They are subclasses with the same parameters, buffers and ``state_dict`` keys; :func:`~lightning_localsgd.dropit.
apply_dropit` turns existing layers into them by changing their class in place, and back.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_localsgd.dropit.functional import dropit_conv2d, dropit_linear
from lightning_localsgd.dropit.validation import check_gamma

__all__ = ["DropITConv2d", "DropITLinear"]


class DropITLinear(nn.Linear):
    """``nn.Linear`` that keeps only the top ``1 - gamma`` of its input (by magnitude) for the weight gradient.

    Built directly (``DropITLinear(in_features, out_features, gamma=0.9)``) or from an ``nn.Linear`` by
    :func:`~lightning_localsgd.dropit.apply_dropit`.
    """

    dropit_gamma: float

    def __init__(self, *args: Any, gamma: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropit_gamma = check_gamma(gamma)

    def forward(self, input: Tensor) -> Tensor:
        return dropit_linear(input, self.weight, self.bias, self.dropit_gamma)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.dropit_gamma}"


class DropITConv2d(nn.Conv2d):
    """``nn.Conv2d`` that keeps only the top ``1 - gamma`` of its (padded) input for the weight gradient.

    Every ``nn.Conv2d`` option works: stride, dilation, groups, no bias, numeric or ``"valid"`` / ``"same"``
    padding (asymmetric for even kernels), and every ``padding_mode``.
    """

    dropit_gamma: float

    def __init__(self, *args: Any, gamma: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropit_gamma = check_gamma(gamma)

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The input padded as far as needed to run the convolution with the symmetric numeric padding returned
        (the backward kernel takes numbers only), as ``nn.Conv2d`` and ``F.conv2d`` pad it themselves."""
        pads = self._reversed_padding_repeated_twice  # [left W, right W, top H, bottom H]
        if self.padding_mode != "zeros":
            return F.pad(x, pads, mode=self.padding_mode), (0, 0)
        if not isinstance(self.padding, str):
            return x, self.padding  # type: ignore[return-value]
        extra = (0, pads[1] - pads[0], 0, pads[3] - pads[2])  # "same" with an even kernel: the odd pixel right/below
        if any(extra):
            x = F.pad(x, extra)
        return x, (pads[2], pads[0])

    def forward(self, input: Tensor) -> Tensor:
        x, padding = self._padded(input)
        return dropit_conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,  # type: ignore[arg-type]
            padding,
            self.dilation,  # type: ignore[arg-type]
            self.groups,
            self.dropit_gamma,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.dropit_gamma}"
