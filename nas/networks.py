"""Small network building blocks whose inner width can be grown by `nas.morphism`."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    r"""Convolutional residual block with a growable inner width.

    .. math::
        y = \mathrm{relu}(x + \mathrm{body}(x)),\qquad
        \mathrm{body} = \mathrm{BN} \circ \mathrm{conv}_{H \to C} \circ \mathrm{relu}
        \circ \mathrm{BN} \circ \mathrm{conv}_{C \to H}

    The block's input and output have ``C`` channels (fixed by the skip connection); the hidden
    width ``H`` (the output channels of ``body[0]``) is what `nas.morphism.widen` grows. Both
    convolutions use ``kernel_size`` with "same" zero padding and no bias (the batch norms
    carry the shifts).

    Example:
        >>> block = ResidualBlock(channels=3, hidden_channels=2)
        >>> block(torch.zeros(1, 3, 5, 5)).shape
        torch.Size([1, 3, 5, 5])

    Args:
        channels: ``C``, input and output channels.
        hidden_channels: ``H``, the inner width (default ``C``).
        kernel_size: Odd kernel size of both convolutions.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int | None = None,
        kernel_size: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden = channels if hidden_channels is None else hidden_channels
        if channels < 1 or hidden < 1:
            raise ValueError(
                f"channels and hidden_channels must be >= 1, got {channels} and {hidden}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        factory = {"device": device, "dtype": dtype}
        padding = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size, padding=padding, bias=False, **factory),
            nn.BatchNorm2d(hidden, **factory),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size, padding=padding, bias=False, **factory),
            nn.BatchNorm2d(channels, **factory),
        )

    @property
    def channels(self) -> int:
        """Input and output channels ``C``."""
        return self.body[0].in_channels

    @property
    def hidden_channels(self) -> int:
        """Current inner width ``H``."""
        return self.body[0].out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Shape ``(n, C, height, width)``.

        Returns:
            Shape ``(n, C, height, width)``.
        """
        return torch.relu(x + self.body(x))
