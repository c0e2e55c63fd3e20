import pytest
import torch

from defbound import exact
from defbound.bound import elbo, fm_bound, fm_bound_explicit, optimal_auxiliary
from defbound.cavi import cavi_sweep, exact_variances, jacobi_spectral_radius, jacobi_sweep
from defbound.state import Moments, prior_moments
from defbound.update import (
    exact_precision_diagonal,
    fm_curvature,
    fm_sweep,
    layer_order,
    layer_update,
    mean_gradient,
)
from tests.conftest import random_data, random_moments, random_params, star_params


def _layer_precision(params, layer):
    W = params.weights[layer - 1]
    return torch.diag(1 / params.noise_vars[layer]) + W.T @ (
        W / params.noise_vars[layer - 1][:, None]
    )


@pytest.mark.parametrize(("rule", "omega"), [("fm", 1.0), ("exact", 1.0), ("exact", 1.7)])
def test_no_sub_step_lowers_the_fm_bound_and_exact_rule_keeps_elbo_monotone(rule, omega):
    params = random_params([7, 5, 4, 2], seed=10)
    x = random_data(params, 6)
    q = random_moments(params, x, seed=3)
    if rule == "exact":
        q = exact_variances(params, q)
    bound, value = fm_bound(params, q).sum(), elbo(params, q).sum()
    for _ in range(30):
        for layer in layer_order(params.depth, "odd-even"):
            q = layer_update(params, q, layer, rule, omega)
            new_bound, new_value = fm_bound(params, q).sum(), elbo(params, q).sum()
            if omega == 1.0:
                assert new_bound >= bound - 1e-8 * abs(bound)
            if rule == "exact":
                assert new_value >= value - 1e-8 * abs(value)
            bound, value = new_bound, new_value


def test_exact_rule_with_overrelaxation_never_lowers_the_elbo():
    params = random_params([7, 5, 4], seed=11)
    x = random_data(params, 4)
    q = exact_variances(params, random_moments(params, x))
    value = elbo(params, q).sum()
    for _ in range(50):
        q, info = fm_sweep(params, q, "exact", omega=1.9)
        assert info.elbo >= value - 1e-9 * abs(value)
        value = info.elbo


@pytest.mark.parametrize("rule", ["fm", "exact"])
@pytest.mark.parametrize("schedule", ["layerwise", "odd-even"])
def test_means_converge_to_exact_posterior_mean(rule, schedule):
    params = random_params([8, 6, 3], seed=12)
    x = random_data(params, 5)
    q = prior_moments(params, x)
    for _ in range(3000):
        q, info = fm_sweep(params, q, rule, 1.0, schedule)
        if info.max_change < 1e-13:
            break
    for mine, ref in zip(q.means[1:], exact.posterior_mean(params, x), strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-9)
    if rule == "exact":
        torch.testing.assert_close(
            elbo(params, q), exact.optimal_elbo(params, x), rtol=0, atol=1e-9
        )


def test_fast_form_equals_explicit_update_with_optimal_auxiliary():
    """m + g/D and v = 1/D equal the explicit maximiser of FM(q, pi*, beta*) over q(z_l)."""
    params = random_params([6, 4, 3], seed=13, density=0.7)
    x = random_data(params, 3)
    q = random_moments(params, x)
    layer = 1
    pi, beta = optimal_auxiliary(params, q, layer - 1)
    W, s2c, s2 = params.weights[0], params.noise_vars[0], params.noise_vars[1]
    safe = torch.where(pi > 0, pi, 1.0)
    precision = 1 / s2 + torch.where(pi > 0, W**2 / safe, 0.0).div(s2c[:, None]).sum(-2)
    a = q.means[2] @ params.weights[1].T + params.biases[1]
    centred = torch.where(pi > 0, q.means[0][:, :, None] - beta / safe, 0.0)
    linear = a / s2 + (W * centred / s2c[:, None]).sum(-2)
    new = layer_update(params, q, layer, "fm")
    torch.testing.assert_close(new.variances[1], 1 / precision, rtol=1e-13, atol=0)
    torch.testing.assert_close(new.means[1], linear / precision, rtol=1e-12, atol=1e-12)


def test_fm_curvature_dominates_the_layer_precision():
    params = random_params([9, 6, 2], seed=14)
    x = random_data(params, 4)
    q = random_moments(params, x)
    for layer in (1, 2):
        lam = _layer_precision(params, layer)
        D = fm_curvature(params, q, layer)
        for row in range(4):
            assert torch.linalg.eigvalsh(torch.diag(D[row]) - lam).min() >= -1e-10
        torch.testing.assert_close(torch.diagonal(lam), exact_precision_diagonal(params, layer))


def test_gradient_of_fixed_auxiliary_bound_vanishes_at_the_update():
    params = random_params([6, 5, 3], seed=15)
    x = random_data(params, 2)
    q = random_moments(params, x)
    layer = 1
    pis, betas = zip(*(optimal_auxiliary(params, q, l) for l in range(params.depth)), strict=True)
    new = layer_update(params, q, layer, "fm")
    m = new.means[layer].clone().requires_grad_(True)
    v = new.variances[layer].clone().requires_grad_(True)
    moved = new.replace_layer(layer, m, v)
    value = fm_bound_explicit(params, moved, list(pis), list(betas)).sum()
    gm, gv = torch.autograd.grad(value, (m, v))
    assert gm.abs().max() < 1e-10
    assert gv.abs().max() < 1e-10


def test_mean_gradient_matches_autograd():
    params = random_params([5, 4, 3], seed=16)
    x = random_data(params, 3)
    q = random_moments(params, x)
    for layer in (1, 2):
        m = q.means[layer].clone().requires_grad_(True)
        value = elbo(params, q.replace_layer(layer, m, q.variances[layer])).sum()
        (grad,) = torch.autograd.grad(value, m)
        torch.testing.assert_close(mean_gradient(params, q, layer), grad)


def test_fm_step_equals_cavi_step_on_a_forest():
    params = random_params([9, 5, 2], seed=17, forest=True)
    x = random_data(params, 4)
    q = exact_variances(params, random_moments(params, x))
    fm, _ = fm_sweep(params, q, "exact")
    cavi, _ = cavi_sweep(params, q)
    for a, b in zip(fm.means, cavi.means, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    steps = {}
    for name, step in (("fm", lambda p, m: fm_sweep(p, m, "exact")), ("cavi", cavi_sweep)):
        m, count = q, 0
        while True:
            m, info = step(params, m)
            count += 1
            if info.max_change < 1e-10:
                break
        steps[name] = count
    assert steps["fm"] == steps["cavi"]


def test_cavi_sweep_matches_scalar_reference():
    """The vectorised sequential CAVI equals a plain one-variable-at-a-time loop."""
    params = random_params([5, 4, 3], seed=18)
    x = random_data(params, 2)
    q = exact_variances(params, random_moments(params, x))
    means = [m.clone() for m in q.means]
    for layer in (1, 2):
        for j in range(params.widths[layer]):
            cur = Moments(tuple(means), q.variances)
            g = mean_gradient(params, cur, layer)[:, j]
            means[layer][:, j] += g / exact_precision_diagonal(params, layer)[j]
    new, _ = cavi_sweep(params, q)
    for a, b in zip(new.means, means, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [4, 8])
def test_star_jacobi_diverges_while_fm_and_cavi_converge(k):
    params = star_params(k)
    x = torch.tensor([[2.0]], dtype=torch.float64)
    assert jacobi_spectral_radius(params, 1) == pytest.approx((k - 1) / 2, abs=1e-12)
    q0 = exact_variances(params, random_moments(params, x))
    q, info = q0, None
    for _ in range(60):
        q, info = jacobi_sweep(params, q)
    assert q.means[1].abs().max() > 1e6 or not torch.isfinite(q.means[1]).all()
    target = exact.posterior_mean(params, x)[0]
    for step in (lambda p, m: fm_sweep(p, m, "exact"), cavi_sweep):
        q = q0
        for _ in range(400):
            q, info = step(params, q)
        torch.testing.assert_close(q.means[1], target, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_star_fm_contraction_factor(k):
    """FM's iteration matrix on the star has spectral radius K/(K+1), Jacobi's (K-1)/2."""
    params = star_params(k)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    q = exact_variances(params, random_moments(params, x))
    D = fm_curvature(params, q, 1)[0]
    lam = _layer_precision(params, 1)
    radius = torch.linalg.eigvals(torch.eye(k, dtype=torch.float64) - lam / D[:, None]).abs().max()
    assert radius.item() == pytest.approx(k / (k + 1), abs=1e-12)
    assert jacobi_spectral_radius(params, 1) == pytest.approx((k - 1) / 2, abs=1e-12)


def test_batch_invariance():
    params = random_params([6, 4, 2], seed=19)
    x = random_data(params, 5)
    q = random_moments(params, x)
    batch, _ = fm_sweep(params, q, "fm", 1.3)
    for row in range(5):
        single = Moments(
            tuple(m[row : row + 1] for m in q.means), tuple(v[row : row + 1] for v in q.variances)
        )
        single, _ = fm_sweep(params, single, "fm", 1.3)
        for a, b in zip(single.means, batch.means, strict=True):
            torch.testing.assert_close(a[0], b[row], rtol=0, atol=1e-13)


def test_edge_cases_orphan_child_childless_parent_zero_column_width_one_top():
    params = random_params([5, 4, 1], seed=20)
    W0 = params.weights[0].clone()
    W0[2] = 0  # child with no parents
    W0[:, 1] = 0  # parent with no children (zero weight column)
    params = params._replace(weights=(W0, params.weights[1]))
    x = random_data(params, 3)
    q = prior_moments(params, x)
    for _ in range(2000):
        q, info = fm_sweep(params, q, "fm")
    assert all(torch.isfinite(m).all() for m in q.means)
    for mine, ref in zip(q.means[1:], exact.posterior_mean(params, x), strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-9)


def test_one_hidden_layer_matches_factor_analysis_posterior():
    """L = 1 is factor analysis: the fixed point is E[z|x] = (I/s2 + W^T Psi^-1 W)^-1 ..."""
    params = random_params([7, 3], seed=21)
    x = random_data(params, 4)
    W, psi = params.weights[0], params.noise_vars[0]
    prior_prec = torch.diag(1 / params.noise_vars[1])
    post_prec = prior_prec + W.T @ (W / psi[:, None])
    rhs = (x - params.biases[0]) / psi @ W + params.biases[1] / params.noise_vars[1]
    fa_mean = torch.linalg.solve(post_prec, rhs.T).T
    q = prior_moments(params, x)
    for _ in range(3000):
        q, info = fm_sweep(params, q, "exact")
        if info.max_change < 1e-14:
            break
    torch.testing.assert_close(q.means[1], fa_mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(q.variances[1][0], 1 / torch.diagonal(post_prec))


def test_bad_update_arguments_are_refused():
    params = random_params([3, 2], seed=0)
    q = prior_moments(params, random_data(params, 1))
    with pytest.raises(ValueError, match="hidden layer"):
        layer_update(params, q, 0)
    with pytest.raises(ValueError, match="omega"):
        layer_update(params, q, 1, omega=2.0)
    with pytest.raises(ValueError, match="variance_rule"):
        layer_update(params, q, 1, variance_rule="magic")
    with pytest.raises(ValueError, match="schedule"):
        layer_order(2, "random")
