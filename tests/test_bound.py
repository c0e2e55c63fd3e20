import torch

from defbound import exact
from defbound.bound import (
    elbo,
    fm_bound,
    fm_bound_explicit,
    fm_gap,
    forest_likeness,
    optimal_auxiliary,
)
from tests.conftest import random_data, random_moments, random_params

WIDTHS = [6, 5, 3]


def _random_auxiliary(params, moments, seed):
    """Random feasible pi (positive where W != 0, rows sum to 1) and beta with sum_j beta = b."""
    g = torch.Generator().manual_seed(seed)
    pis, betas = [], []
    N = moments.means[0].shape[0]
    for l, W in enumerate(params.weights):
        raw = torch.rand(N, *W.shape, generator=g, dtype=W.dtype) * (W != 0)
        pi = raw / raw.sum(-1, keepdim=True)
        beta = torch.randn(N, *W.shape, generator=g, dtype=W.dtype) * (W != 0)
        n_par = (W != 0).sum(-1)
        beta = beta + ((params.biases[l] - beta.sum(-1)) / n_par)[..., None] * (W != 0)
        pis.append(pi)
        betas.append(beta)
    return pis, betas


def test_ordering_fm_le_fmstar_le_elbo_le_logp_for_random_guides():
    for seed in range(5):
        params = random_params(WIDTHS, seed=seed)
        x = random_data(params, 4, seed=seed)
        logp = exact.joint_system(params, x).log_evidence
        for qseed in range(5):
            q = random_moments(params, x, seed=100 + qseed)
            pis, betas = _random_auxiliary(params, q, seed=qseed)
            assert torch.allclose(pis[0].sum(-1), torch.ones(1, dtype=torch.float64))
            explicit = fm_bound_explicit(params, q, pis, betas)
            collapsed = fm_bound(params, q)
            value = elbo(params, q)
            assert torch.all(explicit <= collapsed + 1e-10)
            assert torch.all(collapsed <= value + 1e-10)
            assert torch.all(value <= logp + 1e-10)
            assert torch.all(fm_gap(params, q) >= -1e-12)


def test_explicit_bound_at_optimal_auxiliary_equals_collapsed_form():
    params = random_params(WIDTHS, seed=3, density=0.6)
    x = random_data(params, 5)
    q = random_moments(params, x)
    pis, betas = zip(*(optimal_auxiliary(params, q, l) for l in range(params.depth)), strict=True)
    explicit = fm_bound_explicit(params, q, list(pis), list(betas))
    torch.testing.assert_close(explicit, fm_bound(params, q), rtol=0, atol=1e-10)
    for l, pi in enumerate(pis):
        has_parent = (params.weights[l] != 0).any(-1)
        torch.testing.assert_close(
            pi.sum(-1)[:, has_parent], torch.ones_like(pi.sum(-1)[:, has_parent])
        )
        torch.testing.assert_close(betas[l].sum(-1), params.biases[l].expand(5, -1))


def test_fm_equals_elbo_on_a_forest_and_not_otherwise():
    params = random_params([8, 5, 2], seed=4, forest=True)
    x = random_data(params, 3)
    for qseed in range(3):
        q = random_moments(params, x, seed=qseed)
        torch.testing.assert_close(fm_bound(params, q), elbo(params, q), rtol=0, atol=1e-12)
    dense = random_params([8, 5, 2], seed=4)
    q = random_moments(dense, x)
    assert torch.all(elbo(dense, q) - fm_bound(dense, q) > 1e-3)


def test_elbo_at_mean_field_optimum_equals_closed_form_elbo_star():
    params = random_params(WIDTHS, seed=5)
    x = random_data(params, 4)
    q_star = exact.optimal_mean_field(params, x)
    torch.testing.assert_close(
        elbo(params, q_star), exact.optimal_elbo(params, x), rtol=0, atol=1e-10
    )


def test_fm_bound_is_invariant_to_permuting_parents():
    params = random_params(WIDTHS, seed=6)
    x = random_data(params, 3)
    q = random_moments(params, x)
    perm = torch.randperm(WIDTHS[1], generator=torch.Generator().manual_seed(0))
    W0 = params.weights[0][:, perm]
    W1 = params.weights[1][perm]
    permuted = params._replace(
        weights=(W0, W1),
        biases=(params.biases[0], params.biases[1][perm], params.biases[2]),
        noise_vars=(params.noise_vars[0], params.noise_vars[1][perm], params.noise_vars[2]),
    )
    q_perm = q._replace(
        means=(q.means[0], q.means[1][:, perm], q.means[2]),
        variances=(q.variances[0], q.variances[1][:, perm], q.variances[2]),
    )
    torch.testing.assert_close(fm_bound(permuted, q_perm), fm_bound(params, q))


def test_forest_likeness_measure():
    W = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [2.0, -2.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(
        forest_likeness(W), torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=torch.float64)
    )
