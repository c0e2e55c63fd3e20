"""Plain tensor values that describe a Gaussian DEF and a mean-field Gaussian posterior.

Layer 0 is observed, layers ``1..L`` are hidden, ``L`` is the top. Every algorithm in the package
(bound, sweeps, baselines, M-step, exact reference) is a pure function of these two values, so the
same maths serves the Pyro model, the fitting loop and the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DEFParameters(NamedTuple):
    r"""Generative parameters of an all-Gaussian DEF.

    .. math::
        z_L \sim N(b_L, \mathrm{diag}\,\sigma^2_L), \qquad
        z_l \mid z_{l+1} \sim N(W^{(l)} z_{l+1} + b_l, \mathrm{diag}\,\sigma^2_l),
        \quad l = 0..L-1,

    with the observed data ``x = z_0``.

    Attributes:
        weights: ``L`` tensors, ``weights[l]`` of shape ``(K_l, K_{l+1})`` (row = child,
            column = parent). Masks are already applied: a structural zero is a zero entry.
        biases: ``L + 1`` tensors, ``biases[l]`` of shape ``(K_l,)``; ``biases[L]`` is the top
            prior mean.
        noise_vars: ``L + 1`` tensors ``sigma^2_l`` of shape ``(K_l,)``, all positive.
    """

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    noise_vars: tuple[Tensor, ...]

    @property
    def depth(self) -> int:
        """Number of hidden layers ``L``."""
        return len(self.weights)

    @property
    def widths(self) -> tuple[int, ...]:
        """Layer widths ``(K_0, K_1, ..., K_L)``, observed layer first."""
        return tuple(int(b.shape[-1]) for b in self.biases)

    def detach(self) -> DEFParameters:
        """Return a copy cut from the autograd graph."""
        return DEFParameters(*(tuple(t.detach() for t in group) for group in self))

    def to(self, *args, **kwargs) -> DEFParameters:
        """Move every tensor, with the arguments of :meth:`torch.Tensor.to`."""
        return DEFParameters(*(tuple(t.to(*args, **kwargs) for t in group) for group in self))


class Moments(NamedTuple):
    """Means and variances of the mean-field posterior ``q(z) = prod N(z_{l,k}; m, v)``.

    Attributes:
        means: ``L + 1`` tensors of shape ``(N, K_l)``; ``means[0]`` is the data ``x``.
        variances: ``L + 1`` tensors of shape ``(N, K_l)``; ``variances[0]`` is zero.
    """

    means: tuple[Tensor, ...]
    variances: tuple[Tensor, ...]

    def replace_layer(self, layer: int, mean: Tensor, variance: Tensor) -> Moments:
        """Return new moments with layer ``layer`` replaced (the others are shared)."""
        means = list(self.means)
        variances = list(self.variances)
        means[layer] = mean
        variances[layer] = variance
        return Moments(tuple(means), tuple(variances))


def check_parameters(params: DEFParameters) -> None:
    """Validate shapes and values of DEF parameters.

    Args:
        params: the parameters to check.

    Raises:
        ValueError: on a shape mismatch between consecutive layers, a non-finite value or a
            non-positive noise variance, naming the offending layer.
    """
    L = len(params.weights)
    if L < 1:
        raise ValueError("a DEF needs at least one hidden layer (got 0 weight matrices)")
    if len(params.biases) != L + 1 or len(params.noise_vars) != L + 1:
        raise ValueError(
            f"expected {L + 1} biases and noise variances for {L} weight matrices, got "
            f"{len(params.biases)} and {len(params.noise_vars)}"
        )
    for l in range(L + 1):
        K = params.biases[l].shape
        if params.noise_vars[l].shape != K:
            raise ValueError(
                f"layer {l}: noise variance shape {tuple(params.noise_vars[l].shape)} does not "
                f"match bias shape {tuple(K)}"
            )
        if not torch.all(params.noise_vars[l] > 0):
            bad = params.noise_vars[l].min().item()
            raise ValueError(f"layer {l}: noise variances must be positive, found {bad:g}")
        if not torch.isfinite(params.biases[l]).all():
            raise ValueError(f"layer {l}: bias has non-finite entries")
    for l in range(L):
        expected = (params.biases[l].shape[0], params.biases[l + 1].shape[0])
        if tuple(params.weights[l].shape) != expected:
            raise ValueError(
                f"weights[{l}] has shape {tuple(params.weights[l].shape)}, expected {expected} "
                f"(child width K_{l}, parent width K_{l + 1})"
            )
        if not torch.isfinite(params.weights[l]).all():
            raise ValueError(f"weights[{l}] has non-finite entries")


def prior_moments(params: DEFParameters, x: Tensor) -> Moments:
    r"""Ancestral initialisation: means from the top down, variances equal to the noise.

    .. math:: m_L = b_L, \quad m_l = W^{(l)} m_{l+1} + b_l, \quad v_l = \sigma^2_l.

    Args:
        params: DEF parameters.
        x: data of shape ``(N, K_0)``.

    Returns:
        Moments with ``means[0] = x`` and zero variance there.
    """
    N = x.shape[0]
    L = params.depth
    means: list[Tensor] = [x] + [None] * L  # type: ignore[list-item]
    variances: list[Tensor] = [torch.zeros_like(x)] + [None] * L  # type: ignore[list-item]
    top = params.biases[L].expand(N, -1)
    means[L] = top.clone()
    for l in range(L - 1, 0, -1):
        means[l] = means[l + 1] @ params.weights[l].T + params.biases[l]
    for l in range(1, L + 1):
        variances[l] = params.noise_vars[l].expand(N, -1).clone()
    return Moments(tuple(means), tuple(variances))
