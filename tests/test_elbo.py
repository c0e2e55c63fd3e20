import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from defbound import FMBound, GaussianDEF, MeanFieldELBO, MeanFieldGuide, def_layer, exact
from defbound.bound import elbo, fm_bound
from defbound.elbo import model_and_guide_state


def _model_and_data(widths=(4, 3, 2), n=3, seed=0):
    model = GaussianDEF(widths, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    return model, x


def _randomise_guide(guide, x, seed=0):
    guide.ensure_setup(x)
    g = torch.Generator().manual_seed(seed)
    store = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for name in guide.site_names:
            loc = store[guide.loc_name(name)]
            loc.copy_(torch.randn(loc.shape, generator=g, dtype=loc.dtype))
            scale = store[guide.scale_name(name)]
            scale.copy_(torch.log(0.2 + torch.rand(scale.shape, generator=g, dtype=scale.dtype)))


def test_closed_form_elbo_agrees_with_monte_carlo_trace_elbo():
    model, x = _model_and_data()
    guide = MeanFieldGuide(model)
    _randomise_guide(guide, x)
    closed = -MeanFieldELBO().loss(model, guide, x)
    pyro.set_rng_seed(0)
    estimates = torch.tensor(
        [
            -Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1).loss(
                model, guide, x
            )
            for _ in range(10)
        ]
    )
    stderr = estimates.std() / len(estimates) ** 0.5
    assert abs(estimates.mean().item() - closed) < 5 * stderr.item() + 1e-6
    assert stderr.item() < 0.1  # the comparison is sharp enough to catch a wrong term
    mean_field = -TraceMeanField_ELBO(
        num_particles=2000, vectorize_particles=True, max_plate_nesting=1
    ).loss(model, guide, x)
    assert abs(mean_field - closed) < 1.0


def test_fm_bound_loss_methods_agree_in_sign_and_value():
    model, x = _model_and_data()
    guide = MeanFieldGuide(model)
    _randomise_guide(guide, x, seed=3)
    for objective in (FMBound(), MeanFieldELBO()):
        loss = objective.loss(model, guide, x)
        diff = objective.differentiable_loss(model, guide, x)
        both = objective.loss_and_grads(model, guide, x)
        assert loss == pytest.approx(diff.item(), rel=1e-14)
        assert loss == pytest.approx(both, rel=1e-14)
    structure, q = model_and_guide_state(model, guide, x)
    assert FMBound().loss(model, guide, x) == pytest.approx(
        -fm_bound(structure.params, q).sum().item()
    )
    assert MeanFieldELBO().loss(model, guide, x) == pytest.approx(
        -elbo(structure.params, q).sum().item()
    )
    assert FMBound().loss(model, guide, x) >= MeanFieldELBO().loss(model, guide, x)


def test_gradients_flow_to_model_and_guide_params():
    model, x = _model_and_data()
    guide = MeanFieldGuide(model)
    guide.ensure_setup(x)
    FMBound().loss_and_grads(model, guide, x)
    store = dict(pyro.get_param_store().named_parameters())
    for name in ("def.weights.0", "def.noise_scale.1", "q.loc.z1", "q.scale.z2"):
        assert store[name].grad is not None and store[name].grad.abs().sum() > 0


def test_svi_with_fm_bound_raises_the_bound_and_learns_weights():
    model, x = _model_and_data(widths=(5, 3), n=20)
    guide = MeanFieldGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=FMBound())
    first = svi.step(x)
    w0 = pyro.param("def.weights.0").detach().clone()
    for _ in range(200):
        last = svi.step(x)
    assert last < first
    assert not torch.equal(pyro.param("def.weights.0").detach(), w0)


def test_model_runs_under_predictive_and_pyro_traces():
    model, x = _model_and_data()
    samples = Predictive(model, num_samples=7)(x)
    assert samples["z2"].shape == (7, 3, 2)
    guide = MeanFieldGuide(model)
    post = Predictive(model, guide=guide, num_samples=5)(x)
    assert post["z1"].shape == (5, 3, 3)


def test_user_written_pyro_model_with_masks_and_fixed_weights():
    W1 = torch.tensor([[1.0, 0.5], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    M1 = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    W0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zeros = torch.zeros

    def model(x):
        with pyro.plate("rows", x.shape[0]):
            top = def_layer("top", bias=zeros(2, dtype=torch.float64), noise_scale=1.0)
            mid = def_layer(
                "mid",
                parent=top,
                parent_name="top",
                weights=W1,
                mask=M1,
                bias=zeros(3, dtype=torch.float64),
                noise_scale=0.7,
            )
            def_layer(
                "obs",
                parent=mid,
                parent_name="mid",
                weights=W0,
                bias=zeros(4, dtype=torch.float64),
                noise_scale=0.5,
                obs=x,
            )

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    guide = MeanFieldGuide(model)
    structure, q = model_and_guide_state(model, guide, x)
    assert structure.names == ("obs", "mid", "top")
    torch.testing.assert_close(structure.params.weights[1], W1 * M1)
    from defbound import fit

    result = fit(model, x, guide, mstep="none", max_sweeps=5000, tol=0, mean_tol=1e-13)
    assert result.converged
    ref = exact.posterior_mean(structure.params.detach(), x)
    torch.testing.assert_close(pyro.param("q.loc.mid"), ref[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(pyro.param("q.loc.top"), ref[1], rtol=0, atol=1e-9)


def _two_layer_model(parent_name="z", top_gamma=False):
    """A one-hidden-layer model; the hidden layer is Gamma or names ``parent_name``."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            if top_gamma:
                z = pyro.sample("z", dist.Gamma(torch.ones(2), 1.0).to_event(1))
            else:
                z = def_layer("z", bias=torch.zeros(2), noise_scale=1.0)
            def_layer("x", parent=z, parent_name=parent_name, weights=torch.ones(3, 2),
                      bias=torch.zeros(3), noise_scale=1.0, obs=x)

    return model


def test_bound_refuses_models_it_does_not_apply_to():
    def empty_guide(x):
        pass

    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="'z'.*not a Gaussian DEF layer"):
        FMBound().loss(_two_layer_model(top_gamma=True), empty_guide, x)
    with pytest.raises(ValueError, match="names parent 'zz'"):
        FMBound().loss(_two_layer_model(parent_name="zz"), empty_guide, x)
    with pytest.raises(ValueError, match="latent site 'z' has no guide site"):
        FMBound().loss(_two_layer_model(), empty_guide, x)

    def gamma_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(torch.ones(2, 2), 1.0).to_event(1))

    with pytest.raises(ValueError, match="mean-field Normal guide"):
        FMBound().loss(_two_layer_model(), gamma_guide, x)
