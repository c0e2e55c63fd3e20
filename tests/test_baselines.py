import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from defbound import GaussianDEF, MeanFieldGuide, exact, fit
from defbound.bench import RunLimits, run_coordinate
from defbound.bound import elbo
from defbound.cavi import (
    DivergenceMonitor,
    cavi_sweep,
    cavi_sweep_loop,
    cavi_system,
    exact_variances,
    jacobi_spectral_radius,
    jacobi_sweep,
    layer_precision,
)
from defbound.state import prior_moments
from defbound.svi_baseline import SVIBaseline, make_loss, model_from_parameters
from defbound.update import SweepInfo
from tests.conftest import random_data, random_moments, random_params, star_params


@pytest.mark.parametrize("widths,density", [([9, 7, 5, 3], 1.0), ([12, 10, 4], 0.4)])
def test_fast_cavi_equals_the_reference_loop(widths, density):
    params = random_params(widths, seed=20, density=density)
    x = random_data(params, 6)
    q = random_moments(params, x)
    system = cavi_system(params)
    fast, slow = q, q
    for _ in range(3):
        fast, info_fast = cavi_sweep(params, fast, system)
        slow, info_slow = cavi_sweep_loop(params, slow)
        for a, b in zip(fast.means + fast.variances, slow.means + slow.variances, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
        assert info_fast.elbo == pytest.approx(info_slow.elbo, rel=1e-12)
        assert info_fast.max_change == pytest.approx(info_slow.max_change, rel=1e-9)


def test_layer_precision_is_the_diagonal_block_of_the_joint_precision():
    params = random_params([5, 4, 3], seed=21)
    full = exact.joint_system(params, random_data(params, 1)).precision
    torch.testing.assert_close(layer_precision(params, 1), full[:4, :4], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer_precision(params, 2), full[4:, 4:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["cavi", "block", "fm", "jacobi"])
def test_sweep_baselines_reach_the_exact_optimum_on_a_small_model(method):
    params = random_params([8, 5, 3], seed=22, density=0.35)
    assert max(jacobi_spectral_radius(params, l) for l in (1, 2)) < 1  # Jacobi can converge
    x = random_data(params, 3)
    star = exact.optimal_elbo(params, x).sum().item()
    limits = RunLimits(max_sweeps=3000, max_time=60.0, rel_change=0.0)
    run = run_coordinate(method, params, x, limits)
    assert run.outcome in ("converged", "max_sweeps")  # stalled at the optimum, no divergence
    assert run.final_elbo == pytest.approx(star, abs=1e-8)
    assert run.to_reach(star - 1e-6 * abs(star))[0] is not None


def test_jacobi_divergence_is_detected_and_reported():
    params = star_params(6)
    x = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    limits = RunLimits(max_sweeps=5000, rel_change=0.0)
    run = run_coordinate("jacobi", params, x, limits)
    assert run.outcome == "diverged"
    assert run.sweeps < 200  # caught long before the iterates overflow
    for method in ("fm", "cavi", "block"):
        assert run_coordinate(method, params, x, RunLimits(max_sweeps=300)).outcome != "diverged"


def test_divergence_monitor_reports_non_finite_and_growth_but_not_ascent():
    monitor = DivergenceMonitor(patience=3)
    for k in range(50):
        assert not monitor.update(SweepInfo(elbo=-1.0 / (k + 1), bound=0.0, max_change=0.5**k))
    monitor = DivergenceMonitor(patience=3)
    assert monitor.update(SweepInfo(elbo=math.nan, bound=0.0, max_change=1.0))
    monitor = DivergenceMonitor(patience=3)
    flags = [monitor.update(SweepInfo(-(2.0**k), 0.0, 2.0**k)) for k in range(6)]
    assert flags == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="patience"):
        DivergenceMonitor(patience=0)


def test_star_jacobi_with_nan_does_not_crash_the_record():
    params = star_params(8)
    x = torch.tensor([[2.0]], dtype=torch.float64)
    q = exact_variances(params, prior_moments(params, x))
    for _ in range(1000):
        q, info = jacobi_sweep(params, q)
    assert not math.isfinite(info.elbo) or abs(info.elbo) > 1e100
    assert info.max_change == math.inf or info.max_change > 1e100


def test_autonormal_moments_give_the_pyro_elbo_in_closed_form():
    """The closed-form ELBO at the guide's loc/scale equals Pyro's Monte-Carlo ELBO."""
    params = random_params([4, 3, 2], seed=23)
    x = random_data(params, 3)
    run = SVIBaseline(params, x, lr=0.05, seed=1)
    run.step(30)
    moments = run.moments()
    assert torch.equal(moments.means[1], run.guide.locs.z1.detach())
    torch.testing.assert_close(moments.variances[2], run.guide.scales.z2.detach() ** 2)
    closed = elbo(params, moments).sum().item()
    assert run.info().elbo == pytest.approx(closed, rel=1e-12)
    pyro.set_rng_seed(2)
    mc = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    estimate = -mc.loss(run.model, run.guide, x)
    assert estimate == pytest.approx(closed, abs=0.1)


@pytest.mark.parametrize("loss", ["meanfield", "trace"])
def test_svi_baseline_approaches_the_exact_optimum(loss):
    params = random_params([3, 2, 1], seed=3)
    x = random_data(params, 2)
    star = exact.optimal_elbo(params, x).sum().item()
    run = SVIBaseline(params, x, lr=0.01, loss=loss, seed=0)
    start = run.info().elbo
    run.step(800)
    final = run.info().elbo
    assert final <= star + 1e-9
    assert (star - final) < 0.05 * (star - start)
    mean_error = (run.moments().means[1] - exact.posterior_mean(params, x)[0]).abs().max()
    assert mean_error < 0.25


def test_svi_options_are_checked():
    params = random_params([3, 2], seed=4)
    x = random_data(params, 2)
    with pytest.raises(ValueError, match="lr must be positive"):
        SVIBaseline(params, x, lr=0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("bogus")
    model = model_from_parameters(params)
    assert model.widths == params.widths and not model.learnable


@pytest.mark.parametrize("method", ["block", "svi"])
def test_fit_accepts_the_new_methods(method):
    params = random_params([6, 4, 2], seed=24)
    x = random_data(params, 20)
    model = GaussianDEF(
        params.widths, weights=params.weights, biases=params.biases,
        noise_scales=[v.sqrt() for v in params.noise_vars], learnable=False,
    )
    guide = MeanFieldGuide(model)
    sweeps = 200 if method == "block" else 15
    result = fit(model, x, guide, method=method, mstep="none", max_sweeps=sweeps, tol=0)
    star = exact.optimal_elbo(params, x).sum().item()
    assert result.stop_reason in ("converged", "max_sweeps")
    if method == "block":
        assert result.elbo[-1] == pytest.approx(star, abs=1e-8)
    else:
        assert result.elbo[-1] > result.elbo[0] and result.elbo[-1] <= star
    with pytest.raises(ValueError, match="estep_svi_steps"):
        fit(model, x, guide, method="svi", estep_svi_steps=0)
