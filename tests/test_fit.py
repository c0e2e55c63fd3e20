import json
import math

import arviz as az
import pyro
import pytest
import torch
from sklearn.decomposition import FactorAnalysis

from defbound import GaussianDEF, MeanFieldGuide, fit
from defbound.bound import elbo
from defbound.data import load_split
from defbound.exact import log_likelihood
from defbound.fit import CHECKPOINT_FILE, HISTORY_FILE
from defbound.inference_data import to_inference_data
from defbound.mstep import Learnable, closed_form_mstep
from defbound.state import DEFParameters
from tests.conftest import random_moments, random_params


def _synthetic(n=60, widths=(6, 3, 2), seed=0):
    """Rows drawn from a random DEF by ancestral sampling."""
    truth = GaussianDEF(
        widths,
        seed=seed + 10,
        learnable=False,
        noise_scales=[torch.full((k,), 0.5, dtype=torch.float64) for k in widths],
    )
    g = torch.Generator().manual_seed(seed)
    params = truth.parameters()
    z = params.biases[-1] + params.noise_vars[-1].sqrt() * torch.randn(
        n, widths[-1], generator=g, dtype=torch.float64
    )
    for l in range(len(widths) - 2, -1, -1):
        z = (
            z @ params.weights[l].T
            + params.biases[l]
            + params.noise_vars[l].sqrt()
            * torch.randn(n, widths[l], generator=g, dtype=torch.float64)
        )
    return z


def test_closed_form_mstep_zeroes_the_elbo_gradient_and_respects_masks():
    params = random_params([6, 4, 3], seed=30)
    mask = (torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) < 0.6).double()
    params = params._replace(weights=(params.weights[0] * mask, params.weights[1]))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = random_moments(params, x)
    learn = Learnable((True, True), (True, True, True), (True, True, True))
    new = closed_form_mstep(params, q, learn, (mask, None), min_noise_var=1e-12)
    assert torch.all(new.weights[0][mask == 0] == 0)
    leaves = [t.clone().requires_grad_(True) for t in (*new.weights, *new.biases, *new.noise_vars)]
    p = DEFParameters(tuple(leaves[:2]), tuple(leaves[2:5]), tuple(leaves[5:]))
    grads = torch.autograd.grad(elbo(p, q).sum(), leaves)
    assert (grads[0] * mask).abs().max() < 1e-8
    for grad in grads[1:]:
        assert grad.abs().max() < 1e-8
    assert elbo(new, q).sum() >= elbo(params, q).sum()


def test_em_never_lowers_the_elbo_and_masks_and_fixed_tensors_hold():
    x = _synthetic()
    mask = torch.ones(6, 3, dtype=torch.float64)
    mask[0, 1] = mask[3, 0] = 0
    model = GaussianDEF([6, 3, 2], masks=[mask, None], seed=1)
    result = fit(model, x, max_sweeps=150, tol=0)
    diffs = torch.diff(torch.tensor(result.elbo))
    assert diffs.min() >= -1e-9 * abs(result.elbo[-1])
    w = pyro.param("def.weights.0").detach()
    assert w[0, 1] == 0 and w[3, 0] == 0
    pyro.clear_param_store()
    fixed = GaussianDEF([6, 3, 2], seed=1, learnable=False)
    before = fixed.parameters()
    fit(fixed, x, max_sweeps=20)
    for a, b in zip(before.weights, fixed.parameters().weights, strict=True):
        assert torch.equal(a, b)


def test_svi_mstep_improves_the_bound():
    x = _synthetic()
    model = GaussianDEF([6, 3, 2], seed=2)
    result = fit(model, x, mstep="svi", max_sweeps=20, svi_steps=5, svi_lr=0.02, tol=0)
    assert result.bound[-1] > result.bound[0]


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    x = _synthetic()
    straight = fit(GaussianDEF([6, 3, 2], seed=3), x, max_sweeps=12, tol=0)
    w_straight = pyro.param("def.weights.0").detach().clone()
    pyro.clear_param_store()

    def interrupt(sweep, result):
        if sweep == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            GaussianDEF([6, 3, 2], seed=3),
            x,
            max_sweeps=12,
            tol=0,
            checkpoint_dir=tmp_path,
            checkpoint_every=5,
            callback=interrupt,
        )
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert history["sweeps"] == 7
    assert (tmp_path / CHECKPOINT_FILE).exists()
    pyro.clear_param_store()
    pyro.param("another_model.weights", torch.zeros(3))  # unrelated params do not block resume
    resumed = fit(
        GaussianDEF([6, 3, 2], seed=3),
        x,
        max_sweeps=12,
        tol=0,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert resumed.sweeps == 12
    assert resumed.elbo == pytest.approx(straight.elbo, rel=1e-12)
    torch.testing.assert_close(pyro.param("def.weights.0").detach(), w_straight, rtol=0, atol=1e-12)


def test_jacobi_divergence_is_reported_not_crashed():
    k = 6
    model = GaussianDEF([1, k], weights=[torch.ones(1, k, dtype=torch.float64)], learnable=False)
    x = torch.tensor([[3.0]], dtype=torch.float64)
    guide = MeanFieldGuide(model)
    result = fit(model, x, guide, method="jacobi", mstep="none", max_sweeps=2000, tol=0)
    assert result.stop_reason == "diverged"
    assert not result.converged
    assert torch.isfinite(pyro.param("q.loc.z1")).all()
    pyro.clear_param_store()
    fm = fit(
        GaussianDEF([1, k], weights=[torch.ones(1, k, dtype=torch.float64)], learnable=False),
        x,
        mstep="none",
        max_sweeps=2000,
        tol=1e-12,
    )
    assert fm.converged and math.isfinite(fm.elbo[-1])


def test_float32_fit_runs_on_the_data_dtype():
    x = _synthetic().float()
    model = GaussianDEF([6, 3, 2], dtype=torch.float32)
    result = fit(model, x, max_sweeps=30)
    assert pyro.param("q.loc.z1").dtype == torch.float32
    assert math.isfinite(result.elbo[-1])


def test_inference_data_supports_arviz_summary():
    x = _synthetic(n=10)
    model = GaussianDEF([6, 3, 2])
    guide = MeanFieldGuide(model)
    result = fit(model, x, guide, max_sweeps=20)
    idata = to_inference_data(guide, x, result, num_draws=100)
    assert idata.posterior["z1"].shape == (1, 100, 10, 3)
    assert idata.fit_trace["elbo"].shape == (20,)
    summary = az.summary(idata, var_names=["z2"], kind="stats")
    loc = pyro.param("q.loc.z2").detach().numpy().ravel()
    assert abs(summary["mean"].to_numpy() - loc).max() < 0.6  # 100 draws of unit-ish scale


def test_one_hidden_layer_reaches_factor_analysis_on_digits():
    split = load_split("digits", test_fraction=0.2, seed=0)
    x = torch.tensor(split.train)
    model = GaussianDEF([x.shape[1], 10], seed=0)
    fit(model, x, max_sweeps=300, tol=1e-9)
    mine = log_likelihood(model.parameters(), torch.tensor(split.test)).mean().item()
    fa = FactorAnalysis(n_components=10, random_state=0).fit(split.train).score(split.test)
    assert mine >= fa - 0.01 * abs(fa), (mine, fa)


def test_bad_options_and_data_are_refused():
    model = GaussianDEF([3, 2])
    x = torch.zeros(4, 3, dtype=torch.float64)
    for kwargs, match in (
        ({"method": "gibbs"}, "method"),
        ({"mstep": "adam"}, "mstep"),
        ({"max_sweeps": 0}, "max_sweeps"),
        ({"omega": 2.5}, "omega"),
        ({"tol": -1.0}, "tol"),
    ):
        with pytest.raises(ValueError, match=match):
            fit(model, x, **kwargs)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit(model, bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit(model, bad)
    with pytest.raises(ValueError, match="empty"):
        fit(model, torch.zeros(0, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        fit(model, torch.zeros(4, 5, dtype=torch.float64))


def test_bad_model_parameters_are_refused():
    with pytest.raises(ValueError, match="noise variances must be positive"):
        GaussianDEF([3, 2], noise_scales=[torch.ones(3), torch.tensor([1.0, 0.0])])
    with pytest.raises(ValueError, match=r"masks\[0\] has shape"):
        GaussianDEF([3, 2], masks=[torch.ones(2, 3)])
    with pytest.raises(ValueError, match="weights\\[0\\] has shape"):
        GaussianDEF([3, 2], weights=[torch.ones(2, 2)])
    with pytest.raises(ValueError, match="widths"):
        GaussianDEF([3])


def test_degenerate_data_is_refused_or_warned():
    model = GaussianDEF([3, 2])
    with pytest.raises(ValueError, match="at least 2 data rows"):
        fit(model, torch.ones(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        fit(model, torch.ones(4, 3, dtype=torch.int64))
    x = torch.randn(10, 3, dtype=torch.float64)
    x[:, 1] = 2.0
    with pytest.warns(UserWarning, match="constant"):
        fit(model, x, max_sweeps=2)


def test_model_refuses_fractional_widths_and_data_of_another_dtype():
    with pytest.raises(ValueError, match="whole numbers"):
        GaussianDEF([6, 2.5])
    with pytest.raises(ValueError, match="the string '64'"):
        GaussianDEF("64")
    model = GaussianDEF([6, 3])
    with pytest.raises(ValueError, match="dtype torch.float32 but the model's parameters"):
        model(torch.zeros(4, 6, dtype=torch.float32))


def test_exact_log_likelihood_checks_shape_and_dtype():
    from defbound.exact import log_likelihood

    model = GaussianDEF([6, 3])
    params = model.parameters()
    with pytest.raises(ValueError, match=r"shape \(N, 6\)"):
        log_likelihood(params, torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype torch.float32 but the parameters"):
        log_likelihood(params, torch.zeros(4, 6, dtype=torch.float32))
