"""Exact answers for linear-Gaussian DEFs: posterior, evidence and the mean-field optimum.

A Gaussian DEF is a linear-Gaussian model, so ``p(z | x)`` and ``p(x)`` are Gaussian. Two routes
are provided: a dense one over all layers at once (the brute-force reference for small models)
and a layer-recursive one for the marginal of ``x`` that never forms the joint covariance and uses
the Woodbury identity when the first hidden layer is narrower than the data.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from defbound.state import DEFParameters, Moments


class JointSystem(NamedTuple):
    """Dense exact posterior of all hidden variables, stacked ``z_1, ..., z_L``.

    Attributes:
        precision: ``Lambda``, shape ``(n, n)`` with ``n = sum_{l>=1} K_l``.
        linear: ``h``, shape ``(N, n)``; the posterior mean is ``Lambda^{-1} h``.
        log_evidence: ``log p(x)`` per row, shape ``(N,)``.
    """

    precision: Tensor
    linear: Tensor
    log_evidence: Tensor


def _joint_form(params: DEFParameters) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Write the DEF as ``y = B y + c + e``, ``e ~ N(0, diag s2)``, with ``y = (z_0..z_L)``."""
    widths = params.widths
    offsets = [0]
    for k in widths:
        offsets.append(offsets[-1] + k)
    n = offsets[-1]
    ref = params.biases[0]
    B = torch.zeros(n, n, dtype=ref.dtype, device=ref.device)
    for l, W in enumerate(params.weights):
        B[offsets[l] : offsets[l + 1], offsets[l + 1] : offsets[l + 2]] = W
    c = torch.cat(params.biases)
    s2 = torch.cat(params.noise_vars)
    return B, c, s2, offsets


def joint_system(params: DEFParameters, x: Tensor) -> JointSystem:
    r"""Exact posterior precision, linear term and evidence by dense algebra over all layers.

    With ``y = B y + c + e`` the joint precision is ``J = (I-B)^T diag(1/s2) (I-B)`` and the
    joint linear term ``j = (I-B)^T (c / s2)``. Conditioning on ``z_0 = x``:

    .. math::
        \Lambda = J_{hh}, \qquad h = j_h - J_{ho} x,

    and ``log p(x)`` is the log density of ``N(mu_o, Sigma_oo)`` with
    ``mu = (I-B)^{-1} c`` and ``Sigma = (I-B)^{-1} diag(s2) (I-B)^{-T}``.
    Cost is cubic in the total width: for tests and small models.

    Args:
        params: DEF parameters.
        x: data, shape ``(N, K_0)``.

    Returns:
        The :class:`JointSystem`.
    """
    B, c, s2, offsets = _joint_form(params)
    n = B.shape[0]
    K0 = offsets[1]
    eye = torch.eye(n, dtype=B.dtype, device=B.device)
    IB = eye - B
    J = IB.T @ (IB / s2[:, None])
    j = IB.T @ (c / s2)
    precision = J[K0:, K0:]
    linear = j[K0:] - x @ J[K0:, :K0].T
    inv = torch.linalg.solve_triangular(IB, eye, upper=True)  # B is strictly upper triangular
    mu = inv @ c
    cov = inv @ (inv.T * s2[:, None])
    dist = torch.distributions.MultivariateNormal(mu[:K0], covariance_matrix=cov[:K0, :K0])
    return JointSystem(precision, linear, dist.log_prob(x))


def split_layers(params: DEFParameters, stacked: Tensor) -> tuple[Tensor, ...]:
    """Split ``(N, sum_{l>=1} K_l)`` into per-layer blocks ``(N, K_l)``, ``l = 1..L``."""
    return tuple(torch.split(stacked, list(params.widths[1:]), dim=-1))


def posterior_mean(params: DEFParameters, x: Tensor) -> tuple[Tensor, ...]:
    """Exact posterior mean ``m* = Lambda^{-1} h`` of every hidden layer.

    This is also the mean of the best mean-field Gaussian, since the mean-field optimum of a
    Gaussian posterior shares its mean.

    Returns:
        ``L`` tensors, entry ``l - 1`` of shape ``(N, K_l)``.
    """
    system = joint_system(params, x)
    chol = torch.linalg.cholesky(system.precision)
    stacked = torch.cholesky_solve(system.linear.T, chol).T
    return split_layers(params, stacked)


def optimal_mean_field(params: DEFParameters, x: Tensor) -> Moments:
    """The mean-field optimum ``q*``: means ``Lambda^{-1} h`` and variances ``1/Lambda_ii``."""
    system = joint_system(params, x)
    means = posterior_mean(params, x)
    var = split_layers(params, (1 / torch.diagonal(system.precision)).expand(x.shape[0], -1))
    return Moments((x, *means), (torch.zeros_like(x), *(v.clone() for v in var)))


def optimal_elbo(params: DEFParameters, x: Tensor) -> Tensor:
    r"""Mean-field optimum ``ELBO*`` per row, in closed form.

    .. math::
        \mathrm{ELBO}^* = \log p(x) - \tfrac12\Big(\sum_i \log\Lambda_{ii}
        - \log\det\Lambda\Big),

    the gap being non-negative by Hadamard's inequality and zero iff ``Lambda`` is diagonal.

    Returns:
        Tensor of shape ``(N,)``.
    """
    system = joint_system(params, x)
    lam = system.precision
    gap = 0.5 * (torch.log(torch.diagonal(lam)).sum() - torch.linalg.slogdet(lam)[1])
    return system.log_evidence - gap


def marginal_covariance(params: DEFParameters, layer: int) -> Tensor:
    r"""Marginal covariance of layer ``l`` by the top-down recursion.

    .. math::
        \Sigma_L = \mathrm{diag}\,\sigma^2_L, \qquad
        \Sigma_l = W^{(l)} \Sigma_{l+1} W^{(l)T} + \mathrm{diag}\,\sigma^2_l.

    Returns:
        Tensor of shape ``(K_l, K_l)``.
    """
    cov = torch.diag(params.noise_vars[params.depth])
    for l in range(params.depth - 1, layer - 1, -1):
        W = params.weights[l]
        cov = W @ cov @ W.T + torch.diag(params.noise_vars[l])
    return cov


def marginal_mean(params: DEFParameters, layer: int = 0) -> Tensor:
    """Marginal mean of layer ``l``: ``mu_L = b_L``, ``mu_l = W^{(l)} mu_{l+1} + b_l``."""
    mu = params.biases[params.depth]
    for l in range(params.depth - 1, layer - 1, -1):
        mu = params.weights[l] @ mu + params.biases[l]
    return mu


def log_likelihood(params: DEFParameters, x: Tensor) -> Tensor:
    r"""Exact ``log p(x)`` per row from the Gaussian marginal of ``x``.

    ``Sigma_x = Psi + W_0 Sigma_1 W_0^T`` with ``Psi = diag sigma^2_0``. When ``K_1 < K_0`` the
    Woodbury identity keeps every factorisation at size ``K_1``:

    .. math::
        \log\det\Sigma_x = \log\det\Psi + \log\det\Sigma_1 + \log\det C,\quad
        C = \Sigma_1^{-1} + W_0^T \Psi^{-1} W_0,

        r^T \Sigma_x^{-1} r = r^T\Psi^{-1}r - (W_0^T\Psi^{-1}r)^T C^{-1} (W_0^T\Psi^{-1}r).

    Cost ``O(N K_0 K_1 + K_1^3 + sum_l K_l K_{l+1}^2)``; no joint covariance is formed.

    Args:
        params: DEF parameters.
        x: data, shape ``(N, K_0)``.

    Returns:
        Tensor of shape ``(N,)``.

    Raises:
        ValueError: if ``x`` is not ``(N, K_0)`` or its dtype differs from the parameters'.
    """
    W0 = params.weights[0]
    if x.dim() != 2 or x.shape[-1] != W0.shape[0]:
        raise ValueError(f"x must have shape (N, {W0.shape[0]}), got {tuple(x.shape)}")
    if x.dtype != W0.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the parameters are {W0.dtype}; "
                         f"convert it with x.to({W0.dtype})")
    r = x - marginal_mean(params, 0)
    D = x.shape[-1]
    psi = params.noise_vars[0]
    sigma1 = marginal_covariance(params, 1)
    K1 = sigma1.shape[0]
    const = -0.5 * D * math.log(2 * math.pi)
    if K1 >= D:
        cov = W0 @ sigma1 @ W0.T + torch.diag(psi)
        chol = torch.linalg.cholesky(cov)
        white = torch.linalg.solve_triangular(chol, r.T, upper=False)
        logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        return const - 0.5 * logdet - 0.5 * (white**2).sum(0)
    chol1 = torch.linalg.cholesky(sigma1)
    eye = torch.eye(K1, dtype=x.dtype, device=x.device)
    sigma1_inv = torch.cholesky_solve(eye, chol1)
    capacity = sigma1_inv + W0.T @ (W0 / psi[:, None])
    chol_c = torch.linalg.cholesky(capacity)
    proj = (r / psi) @ W0
    white = torch.linalg.solve_triangular(chol_c, proj.T, upper=False)
    quad = (r**2 / psi).sum(-1) - (white**2).sum(0)
    logdet = (
        torch.log(psi).sum()
        + 2 * torch.log(torch.diagonal(chol1)).sum()
        + 2 * torch.log(torch.diagonal(chol_c)).sum()
    )
    return const - 0.5 * logdet - 0.5 * quad
