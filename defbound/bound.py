"""Closed-form ELBO and forest-mixture (FM) bound of a Gaussian DEF under a mean-field q.

All functions return one value per data row (shape ``(N,)``); sum them for the total. They are
differentiable in every argument, so the same code serves monitoring, gradient learning (through
:class:`defbound.elbo.FMBound`) and the tests.

Notation (layer 0 observed, ``L`` the top): ``m_l, v_l`` the means and variances of q,
``eta_l = m_{l+1} W_l^T + b_l`` the predicted child mean, ``sigma^2_l`` the noise variances.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from defbound.state import DEFParameters, Moments


def expected_log_likelihood_terms(params: DEFParameters, moments: Moments) -> list[Tensor]:
    r"""Expected log densities ``E_q[log p(z_l | z_{l+1})]`` per row, one per layer.

    .. math::
        E_q[\log p(z_l \mid z_{l+1})] = \sum_k -\tfrac12 \log(2\pi\sigma^2_{l,k})
        - \frac{(m_{l,k} - \bar\eta_{l,k})^2 + v_{l,k} + \sum_j W_{kj}^2 v_{l+1,j}}
        {2\sigma^2_{l,k}}

    and for the top layer ``E = (m_L - b_L)^2 + v_L``.

    Args:
        params: DEF parameters.
        moments: q's moments, ``means[0]`` the data.

    Returns:
        ``L + 1`` tensors of shape ``(N,)``; entry ``l`` is the term of layer ``l``.
    """
    L = params.depth
    m, v = moments.means, moments.variances
    terms = []
    for l in range(L + 1):
        s2 = params.noise_vars[l]
        if l < L:
            W = params.weights[l]
            eta = m[l + 1] @ W.T + params.biases[l]
            e2 = (m[l] - eta) ** 2 + v[l] + v[l + 1] @ (W**2).T
        else:
            e2 = (m[l] - params.biases[l]) ** 2 + v[l]
        log_norm = -0.5 * torch.log(2 * math.pi * s2).sum()
        terms.append(log_norm - (e2 / (2 * s2)).sum(-1))
    return terms


def entropy(moments: Moments) -> Tensor:
    """Entropy of the mean-field Gaussian, ``sum_{l>=1,k} 0.5 log(2 pi e v_{l,k})``, per row."""
    return sum(0.5 * torch.log(2 * math.pi * math.e * v).sum(-1) for v in moments.variances[1:])


def elbo(params: DEFParameters, moments: Moments) -> Tensor:
    r"""Exact evidence lower bound of the mean-field Gaussian q, per row.

    .. math:: \mathrm{ELBO}(q) = E_q[\log p(x, z)] + H[q] \le \log p(x).

    Args:
        params: DEF parameters.
        moments: q's moments.

    Returns:
        Tensor of shape ``(N,)``.
    """
    return sum(expected_log_likelihood_terms(params, moments)) + entropy(moments)


def fm_gap(params: DEFParameters, moments: Moments) -> Tensor:
    r"""Gap ``ELBO(q) - FM*(q)`` of the collapsed forest-mixture bound, per row.

    .. math::
        \mathrm{ELBO} - \mathrm{FM}^* = \sum_{l<L} \sum_k
        \frac{(\sum_j |W_{kj}| \sqrt{v_{l+1,j}})^2 - \sum_j W_{kj}^2 v_{l+1,j}}
        {2\sigma^2_{l,k}} \;\ge 0,

    zero exactly when every child has at most one parent with ``W_kj v_j != 0`` (a forest).

    Args:
        params: DEF parameters.
        moments: q's moments.

    Returns:
        Tensor of shape ``(N,)``.
    """
    gap = 0.0
    for l in range(params.depth):
        W = params.weights[l]
        v_parent = moments.variances[l + 1]
        spread = (v_parent.sqrt() @ W.abs().T) ** 2 - v_parent @ (W**2).T
        gap = gap + (spread / (2 * params.noise_vars[l])).sum(-1)
    return gap


def fm_bound(params: DEFParameters, moments: Moments) -> Tensor:
    """Collapsed forest-mixture bound ``FM*(q) = ELBO(q) - fm_gap(q)``, per row.

    This is the FM bound at the optimal auxiliary parameters (see
    :func:`optimal_auxiliary`), a function of q alone; ``FM*(q) <= ELBO(q) <= log p(x)``.

    Args:
        params: DEF parameters.
        moments: q's moments.

    Returns:
        Tensor of shape ``(N,)``.
    """
    return elbo(params, moments) - fm_gap(params, moments)


def optimal_auxiliary(
    params: DEFParameters, moments: Moments, layer: int
) -> tuple[Tensor, Tensor]:
    r"""Optimal mixture weights and bias split on the edges from ``layer`` to its parents.

    .. math::
        \pi^*_{kj} = \frac{|W_{kj}| \sqrt{v_j}}{\sum_{j'} |W_{kj'}| \sqrt{v_{j'}}}, \qquad
        \beta^*_{kj} = \pi^*_{kj} \bar\eta_k - W_{kj} m_j,

    with ``0/0`` read as 0 (a child with no effective parent has a zero row).

    Args:
        params: DEF parameters.
        moments: q's moments.
        layer: child layer ``l`` in ``0..L-1``; the parents are layer ``l + 1``.

    Returns:
        ``(pi, beta)``, each of shape ``(N, K_l, K_{l+1})``.
    """
    W = params.weights[layer]
    m_parent = moments.means[layer + 1]
    a = W.abs() * moments.variances[layer + 1].sqrt()[:, None, :]
    total = a.sum(-1, keepdim=True)
    pi = torch.where(total > 0, a / torch.where(total > 0, total, 1.0), 0.0)
    eta = m_parent @ W.T + params.biases[layer]
    beta = pi * eta[:, :, None] - W * m_parent[:, None, :]
    return pi, beta


def fm_bound_explicit(
    params: DEFParameters,
    moments: Moments,
    pis: list[Tensor],
    betas: list[Tensor],
) -> Tensor:
    r"""Forest-mixture bound ``FM(q, pi, beta)`` for given auxiliary parameters, per row.

    Jensen's inequality on the log-partition of every child gives

    .. math::
        \mathrm{FM} = \mathrm{ELBO} - \sum_{l<L}\sum_k \frac{G_{l,k}}{2\sigma^2_{l,k}},\quad
        G_{l,k} = \sum_j \pi_{kj}(\bar u_{kj} - \bar\eta_k)^2
        + \sum_j W_{kj}^2 v_j (1/\pi_{kj} - 1),\quad
        \bar u_{kj} = (W_{kj} m_j + \beta_{kj}) / \pi_{kj}.

    Entries with ``pi_kj = 0`` must have ``W_kj = 0`` and ``beta_kj = 0`` and contribute 0.

    Args:
        params: DEF parameters.
        moments: q's moments.
        pis: ``L`` tensors of shape ``(N, K_l, K_{l+1})`` (or broadcastable), rows summing to 1
            over the parents of each child that has any.
        betas: ``L`` tensors like ``pis`` with ``sum_j beta_kj = b_k``.

    Returns:
        Tensor of shape ``(N,)``.
    """
    total = elbo(params, moments)
    for l in range(params.depth):
        W = params.weights[l]
        m_parent, v_parent = moments.means[l + 1], moments.variances[l + 1]
        pi, beta = pis[l], betas[l]
        safe_pi = torch.where(pi > 0, pi, 1.0)
        wm = W * m_parent[:, None, :]
        eta = wm.sum(-1) + params.biases[l]
        u_bar = (wm + beta) / safe_pi
        spread = torch.where(pi > 0, pi * (u_bar - eta[:, :, None]) ** 2, 0.0).sum(-1)
        penalty = torch.where(pi > 0, W**2 * v_parent[:, None, :] * (1 / safe_pi - 1), 0.0)
        total = total - ((spread + penalty.sum(-1)) / (2 * params.noise_vars[l])).sum(-1)
    return total


def forest_likeness(weights: Tensor) -> Tensor:
    """Effective number of parents per child, ``n_eff,k = (sum_j |W_kj|)^2 / sum_j W_kj^2``.

    Equals 1 for a child with a single parent (a forest) and ``|pa(k)|`` for equal weights.
    Children with no parent get ``n_eff = 0``.

    Args:
        weights: ``(K_child, K_parent)``.

    Returns:
        Tensor of shape ``(K_child,)``.
    """
    sq = (weights**2).sum(-1)
    return torch.where(sq > 0, weights.abs().sum(-1) ** 2 / torch.where(sq > 0, sq, 1.0), 0.0)
