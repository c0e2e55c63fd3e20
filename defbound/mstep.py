"""Closed-form M-step: weights, biases and noise variances from expected sufficient statistics."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from defbound.state import DEFParameters, Moments


class Learnable(NamedTuple):
    """Which parameters of each layer the M-step may change.

    Attributes:
        weights: ``L`` flags.
        biases: ``L + 1`` flags.
        noise: ``L + 1`` flags.
    """

    weights: tuple[bool, ...]
    biases: tuple[bool, ...]
    noise: tuple[bool, ...]


def closed_form_mstep(
    params: DEFParameters,
    moments: Moments,
    learnable: Learnable,
    masks: tuple[Tensor | None, ...],
    min_noise_var: float = 1e-6,
    ridge: float = 1e-10,
) -> DEFParameters:
    r"""Maximise the mean-field ELBO over the generative parameters with q fixed.

    For child layer ``c`` with parents ``p = c + 1`` and augmented parents ``zh = (z_p, 1)``,
    summing over rows ``n`` under the mean-field q (so ``E[z_c zh^T] = m_c mh^T``):

    .. math::
        A = \sum_n \big(\hat m_n \hat m_n^T + \mathrm{diag}(v_{p,n}, 0)\big), \quad
        R = \sum_n m_{c,n} \hat m_n^T, \quad
        (w_k, b_k) = A_{S_k S_k}^{-1} R_{k, S_k},

    where ``S_k`` are child ``k``'s unmasked parents (plus the bias when it is learned). Then

    .. math::
        \sigma^2_{c,k} = \frac1N \sum_n (m_{c,nk} - \bar\eta_{nk})^2 + v_{c,nk}
        + \sum_j W_{kj}^2 v_{p,nj},

    floored at ``min_noise_var``; the top layer gets ``b_L = mean(m_L)`` and
    ``sigma^2_L = mean((m_L - b_L)^2 + v_L)``. Each block is an exact maximiser, so the ELBO
    does not decrease.

    Args:
        params: current parameters (masks applied).
        moments: q's moments, ``means[0]`` the data.
        learnable: which parameters may change.
        masks: ``L`` 0/1 masks or ``None``.
        min_noise_var: floor on noise variances (keeps the likelihood bounded).
        ridge: relative Tikhonov term on ``A`` for singular statistics.

    Returns:
        New :class:`DEFParameters` (masks applied).
    """
    L = params.depth
    weights, biases, noise = list(params.weights), list(params.biases), list(params.noise_vars)
    with torch.no_grad():
        for c in range(L):
            weights[c], biases[c] = _regress(
                moments.means[c],
                moments.means[c + 1],
                moments.variances[c + 1],
                weights[c],
                biases[c],
                masks[c],
                learnable.weights[c],
                learnable.biases[c],
                ridge,
            )
            if learnable.noise[c]:
                eta = moments.means[c + 1] @ weights[c].T + biases[c]
                e2 = (
                    (moments.means[c] - eta) ** 2
                    + moments.variances[c]
                    + moments.variances[c + 1] @ (weights[c] ** 2).T
                )
                noise[c] = e2.mean(0).clamp_min(min_noise_var)
        if learnable.biases[L]:
            biases[L] = moments.means[L].mean(0)
        if learnable.noise[L]:
            e2 = (moments.means[L] - biases[L]) ** 2 + moments.variances[L]
            noise[L] = e2.mean(0).clamp_min(min_noise_var)
    return DEFParameters(tuple(weights), tuple(biases), tuple(noise))


def _regress(
    m_child: Tensor,
    m_parent: Tensor,
    v_parent: Tensor,
    weights: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    learn_weights: bool,
    learn_bias: bool,
    ridge: float,
) -> tuple[Tensor, Tensor]:
    """Expected least squares of one child layer on its parents; returns ``(W, b)``."""
    if not learn_weights:
        if learn_bias:
            bias = (m_child - m_parent @ weights.T).mean(0)
        return weights, bias
    N, K_parent = m_parent.shape
    ones = torch.ones(N, 1, dtype=m_parent.dtype, device=m_parent.device)
    if learn_bias:
        design = torch.cat([m_parent, ones], dim=1)
        extra = torch.cat([v_parent.sum(0), ones.new_zeros(1)])
        target = m_child
    else:
        design = m_parent
        extra = v_parent.sum(0)
        target = m_child - bias
    A = design.T @ design + torch.diag(extra)
    A = A + ridge * A.diagonal().mean().clamp_min(1e-300) * torch.eye(
        A.shape[0], dtype=A.dtype, device=A.device
    )
    R = target.T @ design  # (K_child, P)
    if mask is None:
        solution = torch.linalg.solve(A, R.T).T
    else:
        keep = mask.to(A.dtype)
        if learn_bias:
            keep = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1)
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        A_batch = keep[:, :, None] * A[None] * keep[:, None, :] + torch.diag_embed(1 - keep) * eye
        solution = torch.linalg.solve(A_batch, (R * keep)[..., None])[..., 0] * keep
    new_weights = solution[:, :K_parent]
    new_bias = solution[:, K_parent] if learn_bias else bias
    return new_weights, new_bias
