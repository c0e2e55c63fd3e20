"""Tests for nas.growing: the Gauss-Newton model of a candidate, baselines, loop and data."""

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jacrev

from defbound.curvature import loss_hessian, per_example_loss
from nas.growing.baselines import (
    FireflyGrowth,
    GradMaxGrowth,
    NashSearch,
    RandomGrowth,
    TinyGrowth,
)
from nas.growing.candidates import Candidate, apply_candidate, select_candidates
from nas.growing.data import Split, load_cifar, load_split, random_crop_flip
from nas.growing.gauss_newton import (
    GaussNewtonConfig,
    GaussNewtonGrowth,
    eigen_fan_in,
    fan_out_closed_form,
    fit_fan_out,
    learn_fan_in,
    learn_morphism,
    quadratic_terms,
    reduced_objective,
)
from nas.growing.loop import GrowthConfig, run_growth
from nas.growing.seeds import NetworkSpec, widths_of
from nas.growing.sites import Increment, IncrementHook, growth_sites
from nas.growing.statistics import collect_site_statistics
from nas.morphism import widen
from nas.networks import ResidualBlock

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(previous)


def mlp(seed=0, out=3, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), act(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, out))


def convnet(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, out),
    ).eval()


def resnet(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), ResidualBlock(3, 2),
        nn.Flatten(), nn.Linear(3 * 4 * 4, out),
    ).eval()


def randomize_norms(model):
    gen = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape,
                                                            generator=gen))
                module.running_var.copy_(1 + 0.5 * torch.rand(module.running_var.shape,
                                                              generator=gen))


def data(kind, n=30, out=3, loss="mse", seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 5) if kind == "mlp" else (n, 2, 4, 4)
    x = torch.randn(shape, generator=gen)
    y = torch.randn(n, out, generator=gen) if loss == "mse" else torch.randint(
        0, out, (n,), generator=gen)
    return x, y


def mean_loss(model, x, y, loss):
    with torch.no_grad():
        return float(per_example_loss(model(x), y, loss).mean())


def true_change(model, site, fan_in, bias, fan_out, norm, x, y, loss):
    """Loss change after really inserting the units with nas.morphism.widen (eval mode)."""
    grown = copy.deepcopy(model).eval()
    candidate = Candidate(site.index, site.name, fan_in.shape[0], fan_in, bias, fan_out, norm,
                          score=1.0, num_params=1)
    apply_candidate(grown, candidate)
    return mean_loss(grown, x, y, loss) - mean_loss(model.eval(), x, y, loss)


def random_fan_in(site, k, seed=3):
    gen = torch.Generator().manual_seed(seed)
    fan_in = torch.randn(site.fan_in_shape(k), generator=gen)
    bias = None if site.producer_layer.bias is None else 0.1 * torch.randn(k, generator=gen)
    return fan_in, bias


BUILDERS = {"mlp": mlp, "conv": convnet, "res": resnet}


def output_site(model):
    """The site whose consumer is the network's last layer (J = I)."""
    return [s for s in growth_sites(model) if s.consumer_layer is model[-1]][0]


# ------------------------------------------------------------------------------------------------
# T2: the Gauss-Newton model against the true loss change


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_gn_model_is_exact_for_squared_error_at_the_output_layer(kind):
    model = BUILDERS[kind]().eval()
    randomize_norms(model)
    x, y = data("mlp" if kind == "mlp" else "conv")
    site = output_site(model)
    stats = collect_site_statistics(model, [site], x, y, "mse", batch_size=7)[site.index]
    fan_in, bias = random_fan_in(site, 2)
    terms = quadratic_terms(site, stats, fan_in, bias)
    gen = torch.Generator().manual_seed(9)
    for b in (fan_out_closed_form(terms, 0.0), torch.randn(terms.gradient.shape, generator=gen)):
        predicted = float(terms.value(b))
        actual = true_change(model, site, fan_in, bias, b.reshape(site.fan_out_shape(2)),
                             terms.norm, x, y, "mse")
        assert predicted == pytest.approx(actual, rel=1e-10, abs=1e-12)


def test_gn_model_has_third_order_error_for_cross_entropy_at_the_output_layer():
    model = mlp(out=4).eval()
    x, y = data("mlp", n=60, out=4, loss="cross_entropy")
    site = output_site(model)
    stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
    fan_in, bias = random_fan_in(site, 2)
    terms = quadratic_terms(site, stats, fan_in, bias)
    b = fan_out_closed_form(terms, 0.1)
    eps = np.array([0.2, 0.1, 0.05, 0.025])
    errors = []
    for e in eps:
        actual = true_change(model, site, fan_in, bias, e * b.reshape(site.fan_out_shape(2)),
                             None, x, y, "cross_entropy")
        errors.append(abs(float(terms.value(e * b)) - actual))
    slope = np.polyfit(np.log(eps), np.log(errors), 1)[0]
    assert slope == pytest.approx(3.0, abs=0.2)


def test_gn_model_at_a_hidden_layer_is_exact_to_first_order_only():
    torch.manual_seed(0)
    # a tanh behind the consumer makes the downstream network curved (GGN != Hessian)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(),
                          nn.Linear(3, 3)).eval()
    x, y = data("mlp", n=40, out=3, loss="cross_entropy")
    site = growth_sites(model)[0]
    stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
    fan_in, bias = random_fan_in(site, 2)
    terms = quadratic_terms(site, stats, fan_in, bias)
    b = fan_out_closed_form(terms, 0.1)

    def change(e):
        return true_change(model, site, fan_in, bias, e * b.reshape(site.fan_out_shape(2)),
                           None, x, y, "cross_entropy")

    e = 1e-4
    slope_true = (change(e) - change(-e)) / (2 * e)
    assert slope_true == pytest.approx(float(terms.gradient @ b), rel=1e-6)
    eps = np.array([0.01, 0.005, 0.0025, 0.00125])
    errors = [abs(float(terms.value(s * b)) - change(s)) for s in eps]
    assert np.polyfit(np.log(eps), np.log(errors), 1)[0] == pytest.approx(2.0, abs=0.2)


@pytest.mark.parametrize("kind", ["conv", "res"])
def test_conv_statistics_match_autograd_jacobian_of_the_increment(kind):
    """c and M built from unfolded features equal J_b^T r and J_b^T Lambda J_b by autograd."""
    model = BUILDERS[kind]().eval()
    randomize_norms(model)
    x, y = data("conv", n=6, loss="cross_entropy")
    for site in growth_sites(model):
        stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
        fan_in, bias = random_fan_in(site, 2)
        terms = quadratic_terms(site, stats, fan_in, bias)
        shape = site.fan_out_shape(2)

        def outputs(b, site=site, fan_in=fan_in, bias=bias, terms=terms, shape=shape):
            with IncrementHook([Increment(site, fan_in, bias, b.reshape(shape), terms.norm)]):
                return model(x)

        b0 = torch.zeros(math.prod(shape))
        jac = jacrev(outputs)(b0)
        f = model(x).detach()
        residual = torch.softmax(f, 1) - nn.functional.one_hot(y, 3)
        c_ref = torch.einsum("nod,no->d", jac, residual) / len(x)
        m_ref = torch.einsum("nod,nok,nke->de", jac, loss_hessian(f, "cross_entropy"),
                             jac) / len(x)
        torch.testing.assert_close(terms.gradient, c_ref, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(terms.curvature, m_ref, rtol=1e-10, atol=1e-13)


def test_increment_hook_equals_inserted_units_with_batch_norm():
    model = convnet().eval()
    randomize_norms(model)
    x, y = data("conv", n=10, loss="cross_entropy")
    for site in growth_sites(model):
        stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
        fan_in, bias = random_fan_in(site, 2)
        terms = quadratic_terms(site, stats, fan_in, bias)
        fan_out = torch.randn(site.fan_out_shape(2))
        with IncrementHook([Increment(site, fan_in, bias, fan_out, terms.norm)]):
            hooked = model(x)
        grown = copy.deepcopy(model)
        apply_candidate(grown, Candidate(site.index, site.name, 2, fan_in, bias, fan_out,
                                         terms.norm, 1.0, 1))
        torch.testing.assert_close(grown(x), hooked, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# T3: closed forms against brute force


def test_closed_form_fan_out_equals_least_squares_for_squared_error():
    model = mlp().eval()
    x, y = data("mlp", n=50)
    site = output_site(model)
    stats = collect_site_statistics(model, [site], x, y, "mse")[site.index]
    fan_in, bias = random_fan_in(site, 2)
    terms = quadratic_terms(site, stats, fan_in, bias)
    b = fan_out_closed_form(terms, 0.0).reshape(site.fan_out_shape(2))
    h = model[:2](x)
    s = torch.relu(h @ fan_in.T + bias)
    g = stats.gradients[:, :, 0]
    reference = torch.linalg.lstsq(s, -g).solution.T
    torch.testing.assert_close(b, reference, rtol=1e-7, atol=1e-9)


def test_closed_form_is_the_minimiser_of_the_damped_model_and_the_decrease_formula():
    model = mlp(out=4).eval()
    x, y = data("mlp", n=40, out=4, loss="cross_entropy")
    site = growth_sites(model)[0]
    stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
    fan_in, bias = random_fan_in(site, 2)
    terms = quadratic_terms(site, stats, fan_in, bias)
    lam = 0.3
    b = fan_out_closed_form(terms, lam)
    damped = terms.curvature + lam * terms.damping_matrix

    var = torch.zeros_like(b, requires_grad=True)
    optimizer = torch.optim.LBFGS([var], max_iter=500, tolerance_grad=1e-14,
                                  tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = terms.gradient @ var + 0.5 * var @ (damped @ var)
        value.backward()
        return value

    optimizer.step(closure)
    assert torch.linalg.norm(var.detach() - b) / torch.linalg.norm(b) < 1e-6
    c, a = terms.gradient.numpy(), damped.numpy()
    assert float(reduced_objective(terms, lam)) == pytest.approx(
        0.5 * c @ np.linalg.solve(a, c), rel=1e-8)


def test_damping_limits():
    """T9: b* -> 0 and score -> 0 monotonically as damping grows; finite at zero damping."""
    model = mlp().eval()
    x, y = data("mlp", n=30)
    site = output_site(model)
    stats = collect_site_statistics(model, [site], x, y, "mse")[site.index]
    fan_in, bias = random_fan_in(site, 2)
    fan_in[1] = 0.0
    bias[1] = -1.0  # a dead ReLU unit: its rows of M and D are zero, so M is singular
    terms = quadratic_terms(site, stats, fan_in, bias)
    norms, scores = [], []
    for lam in (0.0, 0.1, 1.0, 10.0, 1e3, 1e6):
        b = fan_out_closed_form(terms, lam)
        assert torch.isfinite(b).all()
        norms.append(float(b.norm()))
        scores.append(float(reduced_objective(terms, lam)))
    assert all(a > b for a, b in zip(norms, norms[1:], strict=False))
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
    assert scores[-1] < 1e-5 * scores[0] and norms[-1] < 1e-5 * norms[0]
    s = torch.relu(model[:2](x) @ fan_in.T + bias)
    minimum_norm = torch.linalg.pinv(s) @ (-stats.gradients[:, :, 0])
    torch.testing.assert_close(fan_out_closed_form(terms, 0.0).reshape(3, 2), minimum_norm.T,
                               rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# T5: equivalences and invariances


def test_identity_curvature_eigen_solution_is_the_tiny_formula():
    model = mlp(out=3, act=nn.Identity).eval()
    x, y = data("mlp", n=60, out=3, loss="cross_entropy")
    site = growth_sites(model)[1]
    stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
    k = 2
    rows = eigen_fan_in(site, stats, k, curvature="identity")
    h = torch.cat([model[:2](x).detach(), torch.ones(len(x), 1)], dim=1)
    g = stats.gradients[:, :, 0]
    s_cov = h.T @ h / len(x)
    cross = h.T @ g / len(x)
    evals, evecs = torch.linalg.eigh(s_cov)
    inv_root = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    u, lam, _ = torch.linalg.svd(inv_root @ cross)
    tiny = (inv_root @ u[:, :k] * lam[:k].sqrt()).T
    q_ours = torch.linalg.qr(rows.T).Q
    q_tiny = torch.linalg.qr(tiny.T).Q
    # sine of the largest principal angle between the two row spaces
    sine = torch.linalg.matrix_norm(q_tiny - q_ours @ (q_ours.T @ q_tiny), ord=2)
    assert float(sine) < 1e-8


def test_ggn_eigen_solution_beats_random_directions_for_linear_activation():
    model = mlp(out=3, act=nn.Identity).eval()
    model[3] = nn.Identity()  # the new unit's activation is linear
    x, y = data("mlp", n=60, out=3, loss="mse")
    site = growth_sites(model)[1]
    stats = collect_site_statistics(model, [site], x, y, "mse")[site.index]
    rows = eigen_fan_in(site, stats, 1)
    inputs = torch.cat([model[:2](x).detach(), torch.ones(len(x), 1)], dim=1)
    grads = stats.gradients[:, :, 0]
    roots = stats.whitened_jacobians[..., 0]
    ggn = torch.einsum("nkq,nkr->nqr", roots, roots)

    def scores(directions):
        """F = c^T M^-1 c / 2 for one linear unit per direction, all directions at once."""
        s = inputs @ directions.T                                   # (n, D)
        c = torch.einsum("nq,nd->dq", grads, s) / len(x)
        m = torch.einsum("nd,nqr->dqr", s**2, ggn) / len(x)
        return 0.5 * (c * torch.linalg.solve(m, c)).sum(1)

    terms = quadratic_terms(site, stats, rows[:, :-1], rows[:, -1])
    best = float(scores(rows))
    assert best == pytest.approx(float(reduced_objective(terms, 0.0)), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    others = scores(torch.randn(10_000, 5, generator=gen))
    assert best >= float(others.max()) - 1e-12


def test_function_space_damping_makes_scores_scale_invariant():
    model = mlp().eval()
    x, y = data("mlp", n=40, loss="cross_entropy")
    site = output_site(model)
    stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
    fan_in, bias = random_fan_in(site, 2)
    scores = {}
    for kind in ("function", "parameter"):
        scores[kind] = [fit_fan_out(site, stats, stats, a * fan_in, a * bias, damping=0.5,
                                    damping_kind=kind).score for a in (0.1, 1.0, 10.0)]
    assert scores["function"] == pytest.approx([scores["function"][1]] * 3, rel=1e-9)
    assert max(scores["parameter"]) > 2 * min(scores["parameter"])


def test_gradmax_fan_out_maximises_the_new_fan_in_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = data("mlp", n=50, loss="cross_entropy")
    site = growth_sites(model)[0]
    context = make_context(model, x, y, units=2)
    fan_out, _ = GradMaxGrowth(fan_out_scale=1.0)._fan_out(context, site, x, y)

    def fan_in_gradient_norm(b):
        grown = copy.deepcopy(model)
        widen(grown, site.index, 2, torch.zeros(2, 5), b)
        value = per_example_loss(grown(x), y, "cross_entropy").mean()
        (grad,) = torch.autograd.grad(value, grown[1].weight)
        return float(grad[4:].norm())

    direction = fan_out / fan_out.norm(dim=0, keepdim=True)
    best = fan_in_gradient_norm(direction)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        q = torch.linalg.qr(torch.randn(3, 2, generator=gen)).Q
        assert fan_in_gradient_norm(q) <= best + 1e-12


# ------------------------------------------------------------------------------------------------
# T6: statistics bookkeeping


def test_minibatch_statistics_equal_full_batch_in_any_order():
    model = convnet().eval()
    x, y = data("conv", n=13, loss="cross_entropy")
    sites = growth_sites(model)
    full = collect_site_statistics(model, sites, x, y, "cross_entropy")
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(2))
    batched = collect_site_statistics(model, sites, x[perm], y[perm], "cross_entropy",
                                      batch_size=4)
    for site in sites:
        fan_in, bias = random_fan_in(site, 2)
        a = quadratic_terms(site, full[site.index], fan_in, bias)
        b = quadratic_terms(site, batched[site.index], fan_in, bias)
        torch.testing.assert_close(a.gradient, b.gradient, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.curvature, b.curvature, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.damping_matrix, b.damping_matrix, rtol=1e-12, atol=1e-14)


def test_sampled_curvature_is_unbiased():
    model = mlp(out=3).eval()
    x, y = data("mlp", n=4, loss="cross_entropy")
    site = output_site(model)
    exact = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
    sampled = collect_site_statistics(model, [site], x, y, "cross_entropy",
                                      curvature_samples=4000,
                                      generator=torch.Generator().manual_seed(0))[site.index]
    fan_in, bias = random_fan_in(site, 1)
    a = quadratic_terms(site, exact, fan_in, bias)
    b = quadratic_terms(site, sampled, fan_in, bias)
    torch.testing.assert_close(a.gradient, b.gradient, rtol=1e-12, atol=1e-14)
    assert float((a.curvature - b.curvature).norm() / a.curvature.norm()) < 0.06


# ------------------------------------------------------------------------------------------------
# Selection, strategies and the loop


def make_context(model, x, y, units=2, budget=None):
    from nas.growing.candidates import GrowthContext
    from nas.growing.compute import ComputeCounter

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return GrowthContext(model, optimizer, x, y, x, y, "cross_entropy", units, 1, budget,
                         torch.Generator().manual_seed(0), ComputeCounter(), 1, 16,
                         lambda net: torch.optim.Adam(net.parameters()),
                         lambda net, opt, epochs: 0.0)


def test_selection_by_score_per_parameter_within_budget():
    def cand(index, score, params):
        return Candidate(index, str(index), 1, torch.zeros(1, 1), None, None, None, score,
                         params)

    pool = [cand(0, 10.0, 100), cand(1, 3.0, 10), cand(2, 2.0, 5), cand(3, -1.0, 1)]
    assert [c.site_index for c in select_candidates(pool, count=2)] == [2, 1]
    assert [c.site_index for c in select_candidates(pool, count=2, rule="score")] == [0, 1]
    assert [c.site_index for c in select_candidates(pool, count=3, max_new_params=12)] == [2]
    assert select_candidates(pool, count=1, min_score=20.0) == []


def tiny_split(n=120, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=gen)
    w = torch.randn(16, 3, generator=gen)
    y = (x.flatten(1) @ w).argmax(1)
    cut = (n // 2, 3 * n // 4)
    return Split(x[: cut[0]], y[: cut[0]], x[cut[0]: cut[1]], y[cut[0]: cut[1]], x[cut[1]:],
                 y[cut[1]:], 3)


STRATEGIES = {
    "gn": lambda: GaussNewtonGrowth(stat_examples=40, config=GaussNewtonConfig(fan_in_steps=3)),
    "gn-exact": lambda: GaussNewtonGrowth(stat_examples=40, curvature_samples=None,
                                          config=GaussNewtonConfig(fan_in_steps=3)),
    "random": RandomGrowth,
    "nash": lambda: NashSearch(children=2),
    "gradmax": lambda: GradMaxGrowth(stat_examples=40),
    "tiny": lambda: TinyGrowth(stat_examples=40),
    "firefly": lambda: FireflyGrowth(steps=3, stat_examples=40),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_method_grows_within_budget(name, kind):
    data_split = tiny_split()
    spec = NetworkSpec(kind, (1, 4, 4), (3, 2), 3, batch_norm=kind == "cnn")
    model = spec.build(0, dtype=DTYPE)
    start = sum(p.numel() for p in model.parameters())
    config = GrowthConfig(rounds=2, units=2, initial_epochs=1, epochs_per_round=1,
                          final_epochs=1, batch_size=16, max_params=start + 120)
    result = run_growth(STRATEGIES[name](), model, data_split, config)
    assert result.final["params"] <= start + 120
    assert sum(result.final["widths"]) > sum(spec.widths) or result.stopped != "rounds"
    assert result.final["widths"] == list(widths_of(result.model))
    if name in ("random", "nash") and len(result.history) > 1:
        # zero fan-out: inserting never changes the training loss
        record = result.history[1]
        if name == "random":
            assert record["train_loss_after_growth"] == pytest.approx(
                result.history[0]["train_loss"], rel=1e-12)


def test_gn_growth_predicts_the_inserted_change():
    data_split = tiny_split(n=200)
    spec = NetworkSpec("mlp", (1, 4, 4), (3, 3), 3)
    config = GrowthConfig(rounds=2, units=2, initial_epochs=3, epochs_per_round=1,
                          final_epochs=0, batch_size=16, stop_without_gain=True)
    result = run_growth(GaussNewtonGrowth(stat_examples=100, curvature_samples=None),
                        spec.build(1, dtype=DTYPE), data_split, config)
    assert len(result.history) > 1
    for record in result.history[1:]:
        for c in record["applied"]:
            assert c["predicted_change"] < 0 and c["actual_change"] < 0
            assert 1 / 3 < c["actual_change"] / c["predicted_change"] < 3


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    data_split = tiny_split()
    spec = NetworkSpec("mlp", (1, 4, 4), (3, 2), 3)
    config = GrowthConfig(rounds=3, units=1, initial_epochs=1, epochs_per_round=1,
                          final_epochs=1, batch_size=16)

    def strategy():
        return GaussNewtonGrowth(stat_examples=40, config=GaussNewtonConfig(fan_in_steps=2))

    full = run_growth(strategy(), spec.build(0, dtype=DTYPE), data_split, config)

    class InterruptedRunError(Exception):
        pass

    def stop(record):
        if record["round"] == 2:
            raise InterruptedRunError

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(InterruptedRunError):
        run_growth(strategy(), spec.build(0, dtype=DTYPE), data_split, config, checkpoint=path,
                   on_round=stop)
    resumed = run_growth(strategy(), spec.build(0, dtype=DTYPE), data_split, config,
                         checkpoint=path, resume=True)
    assert resumed.final["widths"] == full.final["widths"]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    with pytest.raises(ValueError, match="another configuration"):
        run_growth(strategy(), spec.build(0), data_split, GrowthConfig(rounds=4),
                   checkpoint=path, resume=True)


# ------------------------------------------------------------------------------------------------
# Data


def write_cifar(root, which, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if which == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    expected = {"train": [], "test": []}

    def dump(name, n, part):
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10 if which == "cifar10" else 100, size=n).tolist()
        content = {b"data": images, b"batch_label": name.encode()}
        if which == "cifar10":
            content[b"labels"] = labels
        else:
            content[b"fine_labels"] = labels
            content[b"coarse_labels"] = [label // 5 for label in labels]
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle)
        expected[part].append((images.reshape(n, 3, 32, 32), np.asarray(labels)))

    if which == "cifar10":
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train, "train")
        dump("test_batch", n_test, "test")
    else:
        dump("train", 5 * n_train, "train")
        dump("test", n_test, "test")
    return expected


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_reader_on_a_generated_folder(tmp_path, which):
    expected = write_cifar(tmp_path, which)
    (train_x, train_y), (test_x, test_y) = load_cifar(tmp_path, which)
    np.testing.assert_array_equal(train_x, np.concatenate([e[0] for e in expected["train"]]))
    np.testing.assert_array_equal(train_y, np.concatenate([e[1] for e in expected["train"]]))
    np.testing.assert_array_equal(test_x, expected["test"][0][0])
    np.testing.assert_array_equal(test_y, expected["test"][0][1])
    assert train_x.dtype == np.uint8 and train_x.shape == (30, 3, 32, 32)
    if which == "cifar100":
        (_, coarse), _ = load_cifar(tmp_path, which, coarse=True)
        np.testing.assert_array_equal(coarse, train_y // 5)
    split = load_split(which, root=tmp_path, val_fraction=0.2)
    assert split.train_inputs.shape[1:] == (3, 32, 32)
    assert len(split.train_inputs) + len(split.val_inputs) == 30
    assert float(split.train_inputs.max()) <= 1.0
    with pytest.raises(FileNotFoundError):
        load_cifar(tmp_path / "missing", which)


def test_digits_split_is_stratified_and_disjoint():
    split = load_split("digits", seed=0)
    sizes = (len(split.train_inputs), len(split.val_inputs), len(split.test_inputs))
    assert sum(sizes) == 1797 and split.input_shape == (1, 8, 8)
    counts = torch.bincount(split.test_targets, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38


def test_random_crop_flip_cuts_windows_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 5 * 6, dtype=DTYPE).reshape(2, 3, 5, 6)
    flipped = random_crop_flip(images, gen, padding=0, flip=True)
    for original, out in zip(images, flipped, strict=True):
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    cropped = random_crop_flip(images, gen, padding=2, flip=False)
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 5, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(cropped[i], w) for w in windows)
    assert cropped.shape == images.shape


def test_learn_morphism_improves_on_its_start():
    model = mlp(out=3).eval()
    x, y = data("mlp", n=80, out=3, loss="cross_entropy")
    site = growth_sites(model)[0]
    stats = collect_site_statistics(model, [site], x, y, "cross_entropy")[site.index]
    learned = learn_morphism(site, stats, stats, 2, GaussNewtonConfig(fan_in_steps=20))
    assert max(learned.objective) >= learned.objective[0]
    assert learned.score == pytest.approx(-learned.fit_change, rel=1e-9)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gn", "gradmax", "tiny", "firefly", "nash"])
def test_growth_keeps_device_and_dtype(device, name, dtype):
    """Statistics are float64 internally; the grown network keeps the model's dtype (a float32
    CNN with batch norm used to fail in the virtual insertion)."""
    split = tiny_split(n=80)
    tensors = (split.train_inputs, split.train_targets, split.val_inputs, split.val_targets,
               split.test_inputs, split.test_targets)
    split = Split(*(t.to(device, dtype) if t.is_floating_point() else t.to(device)
                    for t in tensors), 3)
    spec = NetworkSpec("cnn", (1, 4, 4), (2, 2), 3, batch_norm=True)
    config = GrowthConfig(rounds=1, units=1, initial_epochs=1, epochs_per_round=1,
                          final_epochs=0, batch_size=16, augment="crop_flip")
    result = run_growth(STRATEGIES[name](), spec.build(0, device=device, dtype=dtype), split,
                        config)
    assert len(result.history) == 2
    for tensor in result.model.state_dict().values():
        assert tensor.device.type == device
        assert not tensor.is_floating_point() or tensor.dtype == dtype


def test_without_gain_the_loop_stops_or_inserts_with_zero_fan_out():
    split = tiny_split()
    spec = NetworkSpec("mlp", (1, 4, 4), (3, 2), 3)
    settings = {"rounds": 2, "units": 1, "initial_epochs": 1, "epochs_per_round": 1,
                "final_epochs": 0, "batch_size": 16, "min_relative_score": 1e6}
    stopped = run_growth(STRATEGIES["gn"](), spec.build(0, dtype=DTYPE), split,
                         GrowthConfig(stop_without_gain=True, **settings))
    assert stopped.final["rounds"] == 0 and stopped.final["widths"] == [3, 2]
    assert stopped.stopped.startswith("no candidate")
    kept = run_growth(STRATEGIES["gn"](), spec.build(0, dtype=DTYPE), split,
                      GrowthConfig(stop_without_gain=False, **settings))
    assert kept.final["rounds"] == 2 and sum(kept.final["widths"]) == 7
    first = kept.history[1]
    assert first["applied"][0]["zero_fan_out"] is True
    assert first["train_loss_after_growth"] == pytest.approx(kept.history[0]["train_loss"],
                                                             rel=1e-12)


# ------------------------------------------------------------------------------------------------
# T4: the learned fan-in against the true optimum of a solvable problem


def fibonacci_sphere(count):
    """``count`` nearly uniform unit vectors in R^3."""
    i = torch.arange(count, dtype=DTYPE) + 0.5
    polar = torch.acos(1 - 2 * i / count)
    azimuth = math.pi * (1 + 5**0.5) * i
    return torch.stack([torch.sin(polar) * torch.cos(azimuth),
                        torch.sin(polar) * torch.sin(azimuth), torch.cos(polar)], dim=1)


def best_decrease_for_directions(rows, inputs, residuals):
    r"""Exact best loss decrease of one new ReLU unit per row, by least squares in its fan-out.

    Adding unit :math:`s_i = \mathrm{relu}(u^\top [x_i, 1])` with fan-out :math:`b` to the
    output changes :math:`\frac{1}{2n}\sum_i \lVert f_i - y_i \rVert^2` by
    :math:`\frac{1}{2n}\sum_i (\lVert b s_i - r_i \rVert^2 - \lVert r_i \rVert^2)`, minimised at
    :math:`b = \sum_i r_i s_i / \sum_i s_i^2` with decrease
    :math:`\lVert \sum_i r_i s_i \rVert^2 / (2n \sum_i s_i^2)`.
    """
    features = torch.relu(torch.cat([inputs, torch.ones(len(inputs), 1)], 1) @ rows.T)
    cross = residuals.T @ features                      # (q, directions)
    power = features.pow(2).sum(0)
    return cross.pow(2).sum(0) / (2 * len(inputs) * power.clamp_min(1e-300))


def one_unit_problem(problem):
    """Learned and true-optimal decrease of one ReLU unit added next to the output (MSE)."""
    torch.manual_seed(100 + problem)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = 2 * torch.rand(80, 2) - 1
    y = torch.stack([torch.sin(3 * x[:, 0]) * x[:, 1], (x**2).sum(1)], 1)
    y = y + 0.05 * torch.randn(y.shape)
    site = growth_sites(model)[0]
    stats = collect_site_statistics(model, [site], x, y, "mse")[site.index]
    with torch.no_grad():
        residuals = y - model(x)

    # the true optimum over directions: a fine grid on the sphere, polished by local search
    grid = fibonacci_sphere(40_000)
    values = best_decrease_for_directions(grid, x, residuals)
    best_direction = grid[values.argmax()].clone()
    best = float(values.max())
    step = 0.02
    for _ in range(200):
        trial = best_direction + step * torch.randn(64, 3)
        trial = trial / trial.norm(dim=1, keepdim=True)
        trial_values = best_decrease_for_directions(trial, x, residuals)
        if float(trial_values.max()) > best:
            best, best_direction = float(trial_values.max()), trial[trial_values.argmax()]
        else:
            step *= 0.8
    config = GaussNewtonConfig(damping=0.0, fan_in_steps=100)
    fan_in, bias, _, init = learn_fan_in(site, stats, 1, config)
    assert init == "eigen"
    learned_rows = torch.cat([fan_in, bias[:, None]], 1)
    learned = float(best_decrease_for_directions(learned_rows, x, residuals))
    # the library's reduced objective is this same exact decrease (squared error, output layer)
    terms = quadratic_terms(site, stats, fan_in, bias)
    assert float(reduced_objective(terms, 0.0)) == pytest.approx(learned, rel=1e-6)
    return learned, best


def test_learned_fan_in_reaches_the_true_optimum_of_one_unit_problems():
    """T4: variable projection from the eigen start reaches >= 99% of the optimum in >= 9/10."""
    ratios = []
    for problem in range(10):
        learned, best = one_unit_problem(problem)
        assert best > 0 and learned <= best * (1 + 1e-9)
        ratios.append(learned / best)
    assert sum(r >= 0.99 for r in ratios) >= 9, ratios


# ------------------------------------------------------------------------------------------------
# T8: growth beats random growth (real data: scikit-learn's digits)


def test_gn_growth_lowers_the_training_loss_more_than_random_growth_on_digits():
    """T8: same seed networks, data order and units per round, 8 seeds, paired one-sided tests.

    Random growth inserts with zero fan-out, so its insertion changes nothing; GN's insertion
    must lower the training loss, and the loss after the between-round training must be lower
    than random growth's too (p = 0.017 here; with the spec's minimum of 5 seeds it is 0.039,
    too close to the threshold for a test that must pass on other CPUs).
    """
    from scipy.stats import ttest_rel

    split = load_split("digits", dtype=DTYPE)
    spec = NetworkSpec("mlp", (64,), (4, 4), 10)
    config = dict(rounds=4, units=2, initial_epochs=10, epochs_per_round=2, final_epochs=0,
                  batch_size=64, lr=3e-3)
    insertion, after_training = {"gn": [], "random": []}, {"gn": [], "random": []}
    for seed in range(8):
        for name, strategy in (("gn", GaussNewtonGrowth(stat_examples=256, measure=False)),
                               ("random", RandomGrowth())):
            result = run_growth(strategy, spec.build(seed, dtype=DTYPE), split,
                                GrowthConfig(seed=seed, **config))
            history = result.history
            assert len(history) == config["rounds"] + 1
            changes = [r["train_loss_after_growth"] - p["train_loss"]
                       for p, r in zip(history, history[1:], strict=False)]
            insertion[name].append(float(np.mean(changes)))
            after_training[name].append(float(np.mean([r["train_loss"] for r in history[1:]])))
    assert max(abs(c) for c in insertion["random"]) < 1e-12
    assert max(insertion["gn"]) < 0
    assert ttest_rel(insertion["gn"], insertion["random"], alternative="less").pvalue < 0.05
    assert ttest_rel(after_training["gn"], after_training["random"],
                     alternative="less").pvalue < 0.05


# ------------------------------------------------------------------------------------------------
# The grow command


def test_grow_run_and_bench_on_digits_write_metrics_checkpoints_and_plots(tmp_path, capsys):
    from nas.cli import main

    small = ["--data", "digits", "--widths", "4", "4", "--rounds", "1", "--units", "2",
             "--initial-epochs", "1", "--epochs-per-round", "1", "--final-epochs", "1",
             "--stat-examples", "64", "--fan-in-steps", "2", "--quiet"]
    out = tmp_path / "run"
    assert main(["run", *small, "--methods", "gn", "random", "static", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"gn", "random", "static"}
    gn = metrics["methods"]["gn"]["final"]
    assert metrics["methods"]["static"]["final"]["widths"] == gn["widths"]
    assert sum(gn["widths"]) == 4 + 4 + 2
    for name in ("accuracy_vs_params.png", "predicted_vs_actual.png", "gn/checkpoint.pt",
                 "static/checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name

    bench = tmp_path / "bench"
    assert main(["bench", *small, "--methods", "gn", "static", "--seeds", "0", "1",
                 "--out", str(bench)]) == 0
    summary = json.loads((bench / "bench.json").read_text())
    assert summary["seeds"] == [0, 1] and "gn_spearman_rounds_at_least_0.8" in summary["targets"]
    assert (bench / "seed_1" / "metrics.json").exists() and (bench / "bench.png").exists()


@pytest.mark.parametrize(("option", "message"), [
    (["--damping", "-1"], "damping must be a finite number"),
    (["--lr", "0"], "lr must be > 0"),
    (["--fan-in-steps", "-2"], "fan_in_steps must be >= 0"),
    (["--units", "0"], "--units must be positive"),
])
def test_grow_refuses_bad_options_before_writing_anything(tmp_path, capsys, option, message):
    from nas.cli import main

    out = tmp_path / "never"
    assert main(["run", "--data", "digits", *option, "--quiet", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_grow_refuses_to_overwrite_a_run_and_to_resume_with_other_options(tmp_path, capsys):
    from nas.cli import main

    small = ["--data", "digits", "--widths", "3", "--rounds", "1", "--initial-epochs", "1",
             "--epochs-per-round", "1", "--final-epochs", "0", "--methods", "random", "--quiet"]
    out = tmp_path / "run"
    assert main(["run", *small, "--out", str(out)]) == 0
    before = (out / "metrics.json").read_bytes()
    assert main(["run", *small, "--out", str(out)]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err
    assert main(["run", *small, "--widths", "4", "--out", str(out), "--resume"]) == 2
    assert "--widths [3] -> [4]" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
    assert main(["run", *small, "--out", str(out), "--resume"]) == 0
    assert main(["run", *small, "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "holds no grow run" in capsys.readouterr().err
    assert main(["run", *small, "--stat-examples", "0", "--out", str(tmp_path / "s0")]) == 2
    assert "--stat-examples" in capsys.readouterr().err and not (tmp_path / "s0").exists()
