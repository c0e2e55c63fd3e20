r"""Coordinate-ascent baselines on the same mean-field Gaussian q: sequential and layer-parallel.

Sequential CAVI updates one variable at a time (Gauss-Seidel on ``Lambda m = h``); it always
converges and never lowers the ELBO, but its ``sum_l K_l`` updates per sweep are dependent.
Layer-parallel CAVI (Jacobi) updates a whole layer with the single-variable formulas at once,

.. math:: m_l \leftarrow m_l + g / \mathrm{diag}(\Lambda_{ll}),

which diverges when many co-parents share children (spectral radius of
``I - D^{-1} Lambda`` above 1): the instability the forest-mixture bound removes.

Sequential CAVI is computed without a Python loop over units: one Gauss-Seidel pass over the
variables of layer ``l`` (in index order, the other layers fixed) is exactly the triangular solve

.. math::
    m_l \leftarrow m_l + g_l\, T_l^{-T}, \qquad T_l = \mathrm{tril}(\Lambda_{ll}),

with ``g_l`` the ELBO gradient at the start of the pass, because the gradient seen by unit ``j``
after units ``1..j-1`` moved is ``g_j - sum_{i<j} (Lambda_ll)_{ji} Delta m_i``.
:func:`cavi_sweep_loop` keeps the unit-by-unit loop as the reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from defbound.state import DEFParameters, Moments
from defbound.update import (
    SweepInfo,
    exact_precision_diagonal,
    mean_gradient,
    prior_mean,
    sweep_info,
)


def exact_variances(params: DEFParameters, moments: Moments) -> Moments:
    """Set every hidden variance to its CAVI optimum ``1/Lambda_jj`` (means unchanged)."""
    for layer in range(1, params.depth + 1):
        v = (1 / exact_precision_diagonal(params, layer)).expand_as(moments.means[layer])
        moments = moments.replace_layer(layer, moments.means[layer], v.clone())
    return moments


def layer_precision(params: DEFParameters, layer: int) -> Tensor:
    r"""Dense exact precision block of hidden layer ``l`` given its neighbours.

    .. math::
        \Lambda_{ll} = \mathrm{diag}(1/\sigma^2_l)
        + W^{(l-1)T} \mathrm{diag}(1/\sigma^2_{l-1}) W^{(l-1)}.

    Args:
        params: DEF parameters.
        layer: hidden layer in ``1..L``.

    Returns:
        Tensor of shape ``(K_l, K_l)``.
    """
    W = params.weights[layer - 1]
    lam = W.T @ (W / params.noise_vars[layer - 1][:, None])
    lam.diagonal().add_(1 / params.noise_vars[layer])
    return lam


class CaviSystem(NamedTuple):
    """What sequential CAVI needs per layer and reuses across sweeps while the weights are fixed.

    Attributes:
        lower: ``L`` tensors ``tril(Lambda_ll)``, entry ``l - 1`` of shape ``(K_l, K_l)``.
        variances: ``L`` tensors ``1/diag(Lambda_ll)`` of shape ``(K_l,)``.
    """

    lower: tuple[Tensor, ...]
    variances: tuple[Tensor, ...]


def cavi_system(params: DEFParameters) -> CaviSystem:
    """Precompute the lower triangles of every layer's precision (``O(sum K_{l-1} K_l^2)``).

    Args:
        params: DEF parameters.

    Returns:
        The :class:`CaviSystem`.
    """
    lower, variances = [], []
    for layer in range(1, params.depth + 1):
        lam = layer_precision(params, layer)
        variances.append(1 / lam.diagonal().clone())
        lower.append(torch.tril(lam))
    return CaviSystem(tuple(lower), tuple(variances))


@torch.no_grad()
def cavi_sweep(
    params: DEFParameters, moments: Moments, system: CaviSystem | None = None
) -> tuple[Moments, SweepInfo]:
    r"""One sweep of sequential single-variable CAVI (Gauss-Seidel), layers bottom-up.

    Units are visited in index order inside each layer, and every unit sees the moves of the
    units before it, exactly as in :func:`cavi_sweep_loop`; the pass over a layer is done in one
    triangular solve per layer for all rows:

    .. math::
        v_{l,j} = 1/\Lambda_{jj}, \qquad
        \Delta m_l = g_l\, T_l^{-T},\quad T_l = \mathrm{tril}(\Lambda_{ll}),

    ``g_l`` being :func:`defbound.update.mean_gradient` before the pass. Cost per layer
    ``O(N K_{l-1} K_l + N K_l^2)``.

    Args:
        params: DEF parameters.
        moments: current moments.
        system: precomputed :func:`cavi_system` for these parameters (built when omitted).

    Returns:
        ``(new_moments, info)``.
    """
    if system is None:
        system = cavi_system(params)
    change = 0.0
    for layer in range(1, params.depth + 1):
        g = mean_gradient(params, moments, layer)
        step = torch.linalg.solve_triangular(
            system.lower[layer - 1].T, g, upper=True, left=False
        )
        mean = moments.means[layer] + step
        variance = system.variances[layer - 1].expand_as(mean).clone()
        moments = moments.replace_layer(layer, mean, variance)
        change = largest_change(change, step)
    return moments, sweep_info(params, moments, change)


@torch.no_grad()
def cavi_sweep_loop(params: DEFParameters, moments: Moments) -> tuple[Moments, SweepInfo]:
    """Reference sequential CAVI: a Python loop over units, layers bottom-up, rows at once.

    Each variable ``z_{l,j}`` gets ``v = 1/Lambda_jj`` and
    ``m_j <- m_j + g_j / Lambda_jj`` with ``g`` the ELBO gradient at the current means,
    the residuals being updated after every variable so later variables see the change.

    Args:
        params: DEF parameters.
        moments: current moments.

    Returns:
        ``(new_moments, info)``.
    """
    moments = exact_variances(params, moments)
    means = [m.clone() for m in moments.means]
    change = 0.0
    for layer in range(1, params.depth + 1):
        W = params.weights[layer - 1]
        lam = exact_precision_diagonal(params, layer)
        s2_own, s2_child = params.noise_vars[layer], params.noise_vars[layer - 1]
        # residual of this layer as a child (m_l - a_l) and of the child layer (m_c - eta_c)
        own = means[layer] - prior_mean(params, Moments(tuple(means), moments.variances), layer)
        child = means[layer - 1] - means[layer] @ W.T - params.biases[layer - 1]
        weighted_child = child / s2_child
        for j in range(W.shape[1]):
            g = -own[:, j] / s2_own[j] + weighted_child @ W[:, j]
            step = g / lam[j]
            means[layer][:, j] += step
            own[:, j] += step
            weighted_child -= step[:, None] * (W[:, j] / s2_child)[None, :]
            change = largest_change(change, step)
    moments = Moments(tuple(means), moments.variances)
    return moments, sweep_info(params, moments, change)


@torch.no_grad()
def jacobi_sweep(params: DEFParameters, moments: Moments) -> tuple[Moments, SweepInfo]:
    """One sweep of layer-parallel CAVI: every variable of a layer from the same old state.

    Args:
        params: DEF parameters.
        moments: current moments.

    Returns:
        ``(new_moments, info)``. The ELBO may decrease and the means may diverge; the info then
        carries non-finite or falling values, which callers must check.
    """
    moments = exact_variances(params, moments)
    change = 0.0
    for layer in range(1, params.depth + 1):
        g = mean_gradient(params, moments, layer)
        step = g / exact_precision_diagonal(params, layer)
        mean = moments.means[layer] + step
        moments = moments.replace_layer(layer, mean, moments.variances[layer])
        change = largest_change(change, step)
    return moments, sweep_info(params, moments, change)


def largest_change(change: float, step: Tensor) -> float:
    """``max(change, max|step|)``, or ``inf`` once a step is not finite (NaN must not vanish)."""
    value = step.abs().max().item()
    return max(change, value) if math.isfinite(value) else math.inf


def jacobi_spectral_radius(params: DEFParameters, layer: int) -> float:
    """Spectral radius of the layer-Jacobi iteration matrix ``I - D^{-1} Lambda_ll``.

    The layer's means converge under layer-parallel CAVI (with its neighbours fixed) iff the
    radius is below 1.

    Args:
        params: DEF parameters.
        layer: hidden layer in ``1..L``.

    Returns:
        The spectral radius as a float.
    """
    W = params.weights[layer - 1]
    child_precision = 1 / params.noise_vars[layer - 1]
    lam = torch.diag(1 / params.noise_vars[layer]) + W.T @ (W * child_precision[:, None])
    d = torch.diagonal(lam)
    iteration = torch.eye(len(d), dtype=lam.dtype, device=lam.device) - lam / d[:, None]
    return torch.linalg.eigvals(iteration).abs().max().item()



class DivergenceMonitor:
    """Decide from sweep records whether an iteration has diverged.

    A run is declared divergent when the ELBO or the mean change is not finite, or when the
    largest mean change grew in ``patience`` consecutive sweeps while the ELBO stayed below the
    best value seen (a geometric blow-up, as layer-parallel CAVI shows when the spectral radius
    of its iteration exceeds 1). A monotone ascent (CAVI, FM, blocks) never trips it.

    Args:
        patience: consecutive growing sweeps needed.
    """

    def __init__(self, patience: int = 10) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.best = -math.inf
        self._last_change = math.inf
        self._growing = 0
        self.diverged = False

    def update(self, info: SweepInfo) -> bool:
        """Record one sweep; return ``True`` once the run counts as divergent."""
        if not (math.isfinite(info.elbo) and math.isfinite(info.max_change)):
            self.diverged = True
            return True
        grew = info.max_change > self._last_change and info.elbo < self.best
        self._growing = self._growing + 1 if grew else 0
        self._last_change = info.max_change
        self.best = max(self.best, info.elbo)
        self.diverged = self._growing >= self.patience
        return self.diverged
