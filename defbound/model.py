"""A ready-made Gaussian DEF Pyro model for the common case of a dense or masked layer chain."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import torch
from torch import Tensor
from torch.distributions import constraints

from defbound.layer import def_layer
from defbound.state import DEFParameters, check_parameters


class GaussianDEF:
    r"""All-Gaussian deep exponential family as a Pyro model, ``model(x)``.

    .. math::
        z_L \sim N(b_L, \mathrm{diag}\,\sigma_L^2),\quad
        z_l \mid z_{l+1} \sim N((W^{(l)} \odot M^{(l)}) z_{l+1} + b_l,
        \mathrm{diag}\,\sigma_l^2),\quad x = z_0.

    Sites are ``"x"`` (observed) and ``"z1"``..``"zL"`` inside ``pyro.plate("data", N)``.
    With ``learnable=True`` weights, biases and noise scales are Pyro params
    ``"{prefix}.weights.{l}"``, ``"{prefix}.bias.{l}"``, ``"{prefix}.noise_scale.{l}"`` (noise
    scales constrained positive), learned by :func:`defbound.fit` or by SVI; otherwise they are
    fixed tensors.

    Args:
        widths: ``(K_0, K_1, ..., K_L)``, data dimension first, at least two entries.
        weights: optional initial/fixed weights, ``weights[l]`` of shape ``(K_l, K_{l+1})``;
            default ``N(0, 1/K_{l+1})`` entries drawn from ``seed``.
        biases: optional initial/fixed biases (default zeros).
        noise_scales: optional initial/fixed noise standard deviations (default ones).
        masks: optional 0/1 masks shaped like the weights (``None`` entries mean dense).
        learnable: store the parameters as Pyro params.
        prefix: param-name prefix.
        seed: seed of the default weight initialisation.
        dtype: floating dtype of the parameters.
        device: device of the parameters.

    Raises:
        ValueError: for fewer than two widths, non-positive widths, or parameters that do not
            match the widths.
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        weights: Sequence[Tensor] | None = None,
        biases: Sequence[Tensor] | None = None,
        noise_scales: Sequence[Tensor] | None = None,
        masks: Sequence[Tensor | None] | None = None,
        learnable: bool = True,
        prefix: str = "def",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(widths, str | bytes):
            raise ValueError(f"widths must be a sequence of integers, got the string {widths!r}")
        widths = list(widths)
        bad = [k for k in widths if isinstance(k, bool) or int(k) != k]
        if bad:
            raise ValueError(f"widths must be whole numbers, got {bad} in {widths}")
        widths = [int(k) for k in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(
                f"widths must list the data dimension and at least one hidden width, all "
                f"positive, got {widths}"
            )
        self.widths = tuple(widths)
        self.depth = len(widths) - 1
        self.learnable = learnable
        self.prefix = prefix
        self.dtype = dtype
        factory = {"dtype": dtype, "device": device}
        if weights is None:
            gen = torch.Generator().manual_seed(seed)
            weights = [
                (torch.randn(widths[l], widths[l + 1], generator=gen, dtype=dtype)
                 / math.sqrt(widths[l + 1])).to(device)
                for l in range(self.depth)
            ]
        if biases is None:
            biases = [torch.zeros(k, **factory) for k in widths]
        if noise_scales is None:
            noise_scales = [torch.ones(k, **factory) for k in widths]
        if masks is None:
            masks = [None] * self.depth
        if len(masks) != self.depth:
            raise ValueError(f"expected {self.depth} masks (or None), got {len(masks)}")
        self._init_weights = [torch.as_tensor(w, **factory) for w in weights]
        self._init_biases = [torch.as_tensor(b, **factory) for b in biases]
        self._init_scales = [torch.as_tensor(s, **factory) for s in noise_scales]
        self.masks = [None if m is None else torch.as_tensor(m, **factory) for m in masks]
        check_parameters(
            DEFParameters(
                tuple(self._init_weights),
                tuple(self._init_biases),
                tuple(s**2 for s in self._init_scales),
            )
        )
        for l, m in enumerate(self.masks):
            if m is not None and m.shape != self._init_weights[l].shape:
                raise ValueError(
                    f"masks[{l}] has shape {tuple(m.shape)}, expected "
                    f"{tuple(self._init_weights[l].shape)}"
                )

    def site_name(self, layer: int) -> str:
        """Sample site name of layer ``l``: ``"x"`` for 0, ``"z{l}"`` above."""
        return "x" if layer == 0 else f"z{layer}"

    def _weight(self, l: int) -> Tensor:
        if not self.learnable:
            return self._init_weights[l]
        return pyro.param(f"{self.prefix}.weights.{l}", lambda: self._init_weights[l].clone())

    def _bias(self, l: int) -> Tensor:
        if not self.learnable:
            return self._init_biases[l]
        return pyro.param(f"{self.prefix}.bias.{l}", lambda: self._init_biases[l].clone())

    def _scale(self, l: int) -> Tensor:
        if not self.learnable:
            return self._init_scales[l]
        return pyro.param(
            f"{self.prefix}.noise_scale.{l}",
            lambda: self._init_scales[l].clone(),
            constraint=constraints.positive,
        )

    def __call__(self, x: Tensor) -> Tensor:
        """Run the generative model with ``x`` observed, shape ``(N, K_0)``."""
        if x.dim() != 2 or x.shape[-1] != self.widths[0]:
            raise ValueError(
                f"data must have shape (N, {self.widths[0]}), got {tuple(x.shape)}"
            )
        if x.dtype != self.dtype:
            raise ValueError(
                f"data has dtype {x.dtype} but the model's parameters are {self.dtype}; "
                f"convert it with x.to({self.dtype})"
            )
        L = self.depth
        with pyro.plate("data", x.shape[0], dim=-1):
            z = def_layer(self.site_name(L), bias=self._bias(L), noise_scale=self._scale(L))
            for l in range(L - 1, -1, -1):
                z = def_layer(
                    self.site_name(l),
                    parent=z,
                    parent_name=self.site_name(l + 1),
                    weights=self._weight(l),
                    mask=self.masks[l],
                    bias=self._bias(l),
                    noise_scale=self._scale(l),
                    obs=x if l == 0 else None,
                )
        return z

    def parameters(self) -> DEFParameters:
        """Current parameters (masks applied), detached."""
        weights = []
        for l in range(self.depth):
            w = self._weight(l).detach()
            weights.append(w if self.masks[l] is None else w * self.masks[l])
        return DEFParameters(
            tuple(weights),
            tuple(self._bias(l).detach() for l in range(self.depth + 1)),
            tuple(self._scale(l).detach() ** 2 for l in range(self.depth + 1)),
        )
