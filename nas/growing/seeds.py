"""Seed networks for growth (MLPs and small CNNs) described by a rebuildable `NetworkSpec`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from nas.growing.sites import growth_sites


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a growable network; `build` makes it, `widths_of` reads grown widths.

    ``"mlp"``: ``Linear(d, w1) [BN] ReLU ... Linear(wL, o)`` on flattened inputs.
    ``"cnn"``: per width ``Conv3x3(pad 1) [BN] ReLU MaxPool2``, then ``Flatten`` and
    ``Linear(., o)``; input ``(C, H, W)``.

    Attributes:
        kind: ``"mlp"`` or ``"cnn"``.
        input_shape: ``(d,)`` for an MLP (inputs are flattened), ``(C, H, W)`` for a CNN.
        widths: Hidden widths (units or channels), one per growable layer.
        num_outputs: Output size ``o``.
        batch_norm: Insert batch norms after the hidden layers.
    """

    kind: Literal["mlp", "cnn"]
    input_shape: tuple[int, ...]
    widths: tuple[int, ...]
    num_outputs: int
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "cnn"):
            raise ValueError(f"kind must be 'mlp' or 'cnn', got {self.kind!r}")
        if not self.widths or min(self.widths) < 1 or self.num_outputs < 1:
            raise ValueError(f"widths and num_outputs must be positive, got {self.widths}, "
                             f"{self.num_outputs}")
        if self.kind == "cnn" and len(self.input_shape) != 3:
            raise ValueError(f"a cnn needs input_shape (C, H, W), got {self.input_shape}")

    def with_widths(self, widths: tuple[int, ...] | list[int]) -> NetworkSpec:
        """The same architecture with other hidden widths."""
        return replace(self, widths=tuple(int(w) for w in widths))

    def build(
        self,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Sequential:
        """Build the network with PyTorch's default initialisation drawn from ``seed``.

        The global random state is left untouched.
        """
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.kind == "mlp":
                size = 1
                for dim in self.input_shape:
                    size *= dim
                layers.append(nn.Flatten())
                for width in self.widths:
                    layers.append(nn.Linear(size, width, **factory))
                    if self.batch_norm:
                        layers.append(nn.BatchNorm1d(width, **factory))
                    layers.append(nn.ReLU())
                    size = width
                layers.append(nn.Linear(size, self.num_outputs, **factory))
            else:
                channels, height, width_px = self.input_shape
                for width in self.widths:
                    layers.append(nn.Conv2d(channels, width, 3, padding=1, **factory))
                    if self.batch_norm:
                        layers.append(nn.BatchNorm2d(width, **factory))
                    layers += [nn.ReLU(), nn.MaxPool2d(2)]
                    channels, height, width_px = width, height // 2, width_px // 2
                layers.append(nn.Flatten())
                layers.append(nn.Linear(channels * height * width_px, self.num_outputs,
                                        **factory))
        return nn.Sequential(*layers)


def widths_of(model: nn.Module) -> tuple[int, ...]:
    """Current widths of every growth site of ``model``, in order."""
    return tuple(site.width for site in growth_sites(model))
