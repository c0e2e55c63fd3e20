r"""Coordinate-ascent baselines on the same mean-field Gaussian q: sequential and layer-parallel.

Sequential CAVI updates one variable at a time (Gauss-Seidel on ``Lambda m = h``); it always
converges and never lowers the ELBO, but its ``sum_l K_l`` updates per sweep are dependent.
Layer-parallel CAVI (Jacobi) updates a whole layer with the single-variable formulas at once,

.. math:: m_l \leftarrow m_l + g / \mathrm{diag}(\Lambda_{ll}),

which diverges when many co-parents share children (spectral radius of
``I - D^{-1} Lambda`` above 1): the instability the forest-mixture bound removes.
"""

from __future__ import annotations

import math

import torch

from defbound.bound import elbo, fm_bound
from defbound.state import DEFParameters, Moments
from defbound.update import (
    SweepInfo,
    exact_precision_diagonal,
    mean_gradient,
    prior_mean,
)


def exact_variances(params: DEFParameters, moments: Moments) -> Moments:
    """Set every hidden variance to its CAVI optimum ``1/Lambda_jj`` (means unchanged)."""
    for layer in range(1, params.depth + 1):
        v = (1 / exact_precision_diagonal(params, layer)).expand_as(moments.means[layer])
        moments = moments.replace_layer(layer, moments.means[layer], v.clone())
    return moments


@torch.no_grad()
def cavi_sweep(params: DEFParameters, moments: Moments) -> tuple[Moments, SweepInfo]:
    """One sweep of sequential single-variable CAVI, layers bottom-up, all rows at once.

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
            change = max(change, step.abs().max().item())
    moments = Moments(tuple(means), moments.variances)
    return moments, _info(params, moments, change)


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
        change = max(change, step.abs().max().item())
    return moments, _info(params, moments, change)


def _info(params: DEFParameters, moments: Moments, change: float) -> SweepInfo:
    value = elbo(params, moments).sum().item()
    bound = fm_bound(params, moments).sum().item()
    if not math.isfinite(change):
        change = math.inf
    return SweepInfo(elbo=value, bound=bound, max_change=change)


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

