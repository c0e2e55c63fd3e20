import torch

from defbound import exact
from tests.conftest import random_data, random_params


def test_woodbury_and_dense_marginals_equal_the_joint_reference():
    for widths in ([9, 3, 2], [4, 6, 2], [5, 5]):
        params = random_params(widths, seed=sum(widths))
        x = random_data(params, 6)
        reference = exact.joint_system(params, x).log_evidence
        torch.testing.assert_close(exact.log_likelihood(params, x), reference, rtol=0, atol=1e-10)


def test_log_evidence_matches_direct_covariance_construction():
    params = random_params([4, 3, 2], seed=1)
    x = random_data(params, 3)
    W0, W1 = params.weights
    s0, s1, s2 = params.noise_vars
    cov1 = W1 @ torch.diag(s2) @ W1.T + torch.diag(s1)
    cov0 = W0 @ cov1 @ W0.T + torch.diag(s0)
    mean0 = W0 @ (W1 @ params.biases[2] + params.biases[1]) + params.biases[0]
    direct = torch.distributions.MultivariateNormal(mean0, cov0).log_prob(x)
    torch.testing.assert_close(exact.joint_system(params, x).log_evidence, direct)


def test_posterior_mean_equals_gaussian_conditioning():
    """m* = mu_h + Sigma_hx Sigma_xx^-1 (x - mu_x) from the joint covariance."""
    params = random_params([5, 3, 2], seed=2)
    x = random_data(params, 4)
    W0, W1 = params.weights
    s0, s1, s2 = params.noise_vars
    # joint covariance of (z1, z2, x) built by hand
    c22 = torch.diag(s2)
    c12 = W1 @ c22
    c11 = W1 @ c22 @ W1.T + torch.diag(s1)
    cx1 = W0 @ c11
    cx2 = W0 @ c12
    cxx = W0 @ c11 @ W0.T + torch.diag(s0)
    mu2 = params.biases[2]
    mu1 = W1 @ mu2 + params.biases[1]
    mux = W0 @ mu1 + params.biases[0]
    gain = torch.linalg.solve(cxx, (x - mux).T)
    m1 = mu1 + (cx1.T @ gain).T
    m2 = mu2 + (cx2.T @ gain).T
    mine = exact.posterior_mean(params, x)
    torch.testing.assert_close(mine[0], m1, rtol=0, atol=1e-10)
    torch.testing.assert_close(mine[1], m2, rtol=0, atol=1e-10)


def test_optimal_elbo_gap_is_hadamard_gap():
    params = random_params([6, 4, 3], seed=3)
    x = random_data(params, 2)
    system = exact.joint_system(params, x)
    gap = system.log_evidence - exact.optimal_elbo(params, x)
    assert torch.all(gap > 0)
    forest = random_params([6, 1], seed=3)
    xf = random_data(forest, 2)
    torch.testing.assert_close(
        exact.optimal_elbo(forest, xf), exact.joint_system(forest, xf).log_evidence
    )


def test_marginal_mean_and_covariance_recursion():
    params = random_params([3, 2, 2], seed=4)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    z2 = params.biases[2] + params.noise_vars[2].sqrt() * torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )
    z1 = (
        z2 @ params.weights[1].T
        + params.biases[1]
        + params.noise_vars[1].sqrt() * torch.randn(n, 2, generator=g, dtype=torch.float64)
    )
    torch.testing.assert_close(z1.mean(0), exact.marginal_mean(params, 1), atol=0.02, rtol=0)
    torch.testing.assert_close(
        torch.cov(z1.T), exact.marginal_covariance(params, 1), atol=0.05, rtol=0.02
    )
