"""Tests for defbound.curvature: every product against dense matrices built by autograd."""

import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

from defbound.curvature import (
    LayerStatistics,
    QuadraticModel,
    StatisticsCollector,
    collect_statistics,
    conjugate_gradient,
    damped_solve,
    diagonal_fisher,
    diagonal_ggn,
    empirical_fisher_vector_product,
    flatten_tensors,
    generalized_eigh,
    ggn_vector_product,
    loss_hessian,
    loss_hessian_sqrt,
    loss_hessian_vector_product,
    per_example_gradients,
    per_example_jacobians,
    per_example_loss,
    trainable_parameters,
    true_fisher_vector_product,
    unflatten_vector,
)

DTYPE = torch.float64
LOSSES = ["mse", "cross_entropy"]


def make_mlp(seed: int = 0, hidden: int = 4, out: int = 3, scale: float = 1.0) -> nn.Sequential:
    """Tiny tanh MLP; ``scale`` multiplies the last layer (softmax far from uniform)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(DTYPE)
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    return model


def make_data(loss: str, n: int = 5, out: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    if loss == "mse":
        y = torch.randn(n, out, generator=gen, dtype=DTYPE)
    else:
        y = torch.randint(0, out, (n,), generator=gen)
    return x, y


def flat_function(model: nn.Module, x: torch.Tensor):
    """theta_flat -> model outputs (n, o), for torch.autograd.functional."""
    params = trainable_parameters(model)

    def forward(theta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, unflatten_vector(theta, params), (x,))

    return forward, flatten_tensors(params).clone()


def reference_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example losses written independently of the library code."""
    if loss == "mse":
        return 0.5 * ((outputs - targets) ** 2).sum(1)
    log_probs = outputs - torch.logsumexp(outputs, dim=1, keepdim=True)
    return -log_probs.gather(1, targets[:, None]).squeeze(1)


def dense_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    forward, theta = flat_function(model, x)
    jac = jacobian(forward, theta)  # (n, o, P)
    outputs = forward(theta).detach()
    blocks = []
    for i in range(len(x)):
        lam = hessian(lambda f, i=i: reference_loss(f[None], y[i : i + 1], loss).sum(), outputs[i])
        blocks.append(jac[i].T @ lam @ jac[i])
    return torch.stack(blocks).mean(0)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    forward, theta = flat_function(model, x)
    return hessian(lambda t: reference_loss(forward(t), y, loss).mean(), theta)


def loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example gradients by a Python loop, shape (n, P)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        reference_loss(model(x[i : i + 1]), y[i : i + 1], loss).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def random_vector(num: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(num, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_hessian_matches_autograd(loss):
    x, y = make_data(loss)
    outputs = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    lam = loss_hessian(outputs, loss)
    for i in range(5):
        expected = hessian(
            lambda f, i=i: reference_loss(f[None], y[i : i + 1], loss).sum(), outputs[i]
        )
        torch.testing.assert_close(lam[i], expected, rtol=1e-12, atol=1e-12)
    root = loss_hessian_sqrt(outputs, loss)
    torch.testing.assert_close(root @ root.transpose(1, 2), lam, rtol=1e-12, atol=1e-12)
    u = torch.randn(5, 3, dtype=DTYPE)
    product = loss_hessian_vector_product(outputs, u, loss)
    torch.testing.assert_close(product, torch.einsum("nij,nj->ni", lam, u), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_example_loss(outputs, y, loss), reference_loss(outputs, y, loss))


def test_loss_input_validation():
    outputs = torch.zeros(4, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="loss must be one of"):
        per_example_loss(outputs, torch.zeros(4, 3), "hinge")
    with pytest.raises(ValueError, match="mse targets"):
        per_example_loss(outputs, torch.zeros(4, 2, dtype=DTYPE), "mse")
    with pytest.raises(ValueError, match="integer class indices"):
        per_example_loss(outputs, torch.zeros(4, dtype=DTYPE), "cross_entropy")
    with pytest.raises(ValueError, match=r"shape \(n, o\)"):
        loss_hessian(torch.zeros(4, 3, 2), "mse")


# ------------------------------------------------------------------------------------------------
# Per-example quantities


@pytest.mark.parametrize("loss", LOSSES)
def test_per_example_gradients_match_loop(loss):
    model = make_mlp()
    x, y = make_data(loss)
    grads = per_example_gradients(model, x, y, loss)
    assert list(grads) == [name for name, _ in model.named_parameters()]
    flat = torch.cat([g.flatten(start_dim=1) for g in grads.values()], dim=1)
    torch.testing.assert_close(flat, loop_gradients(model, x, y, loss), rtol=1e-12, atol=1e-12)


def test_per_example_jacobians_match_autograd():
    model = make_mlp()
    x, _ = make_data("mse")
    jac = per_example_jacobians(model, x)
    flat = torch.cat([j.flatten(start_dim=2) for j in jac.values()], dim=2)
    forward, theta = flat_function(model, x)
    expected = jacobian(forward, theta)
    torch.testing.assert_close(flat, expected, rtol=1e-12, atol=1e-12)


def test_subset_of_parameters():
    model = make_mlp()
    x, y = make_data("mse")
    params = {"2.weight": model[2].weight.detach()}
    grads = per_example_gradients(model, x, y, "mse", params)
    assert list(grads) == ["2.weight"]
    full = loop_gradients(model, x, y, "mse")
    torch.testing.assert_close(grads["2.weight"].flatten(1), full[:, 16:28])
    with pytest.raises(ValueError, match="not parameters of the model"):
        per_example_gradients(model, x, y, "mse", {"nope": torch.zeros(1)})


def test_training_mode_batch_norm_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DTYPE)
    x, _ = make_data("mse")
    with pytest.raises(ValueError, match="model.eval"):
        ggn_vector_product(model, x, torch.zeros(16 + 8 + 10, dtype=DTYPE), "mse")
    model.eval()
    ggn_vector_product(model, x, torch.zeros(16 + 8 + 10, dtype=DTYPE), "mse")


# ------------------------------------------------------------------------------------------------
# Matrix-free products against dense matrices


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_vector_product_matches_dense_ggn(loss):
    model = make_mlp()
    x, y = make_data(loss)
    dense = dense_ggn(model, x, y, loss)
    num = dense.shape[0]
    for seed in range(3):
        v = random_vector(num, seed)
        product = ggn_vector_product(model, x, v, loss)
        torch.testing.assert_close(product, dense @ v, rtol=1e-10, atol=1e-12)
    summed = ggn_vector_product(model, x, v, loss, reduction="sum")
    torch.testing.assert_close(summed, len(x) * (dense @ v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_equals_hessian_for_linear_model_but_not_for_mlp(loss):
    x, y = make_data(loss)
    torch.manual_seed(0)
    linear = nn.Linear(3, 3).to(DTYPE)
    v = random_vector(12)
    torch.testing.assert_close(
        ggn_vector_product(linear, x, v, loss),
        dense_hessian(linear, x, y, loss) @ v,
        rtol=1e-10,
        atol=1e-12,
    )
    model = make_mlp()
    w = random_vector(31)
    gap = ggn_vector_product(model, x, w, loss) - dense_hessian(model, x, y, loss) @ w
    assert gap.abs().max() > 1e-4  # the GGN drops the output-curvature term of the Hessian


@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_fisher_vector_product_matches_dense(loss):
    model = make_mlp()
    x, y = make_data(loss)
    grads = loop_gradients(model, x, y, loss)
    dense = grads.T @ grads / len(x)
    v = random_vector(grads.shape[1])
    product = empirical_fisher_vector_product(model, x, y, v, loss)
    torch.testing.assert_close(product, dense @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_true_fisher_exact_equals_ggn_and_sampled_converges(loss):
    model = make_mlp(scale=6.0)
    x, y = make_data(loss)
    dense = dense_ggn(model, x, y, loss)
    v = random_vector(dense.shape[0])
    exact = true_fisher_vector_product(model, x, v, loss)
    torch.testing.assert_close(exact, dense @ v, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(5)
    sampled = true_fisher_vector_product(model, x, v, loss, num_samples=4000, generator=gen)
    rel = (sampled - dense @ v).norm() / (dense @ v).norm()
    assert rel < 0.1
    # The empirical Fisher is a different matrix; the sampled estimate must not match it.
    grads = loop_gradients(model, x, y, loss)
    empirical = grads.T @ grads / len(x) @ v
    assert (empirical - dense @ v).norm() / (dense @ v).norm() > 0.2


@pytest.mark.parametrize("loss", LOSSES)
def test_diagonal_estimates(loss):
    model = make_mlp(scale=6.0)
    x, y = make_data(loss)
    dense = dense_ggn(model, x, y, loss)
    torch.testing.assert_close(
        diagonal_ggn(model, x, loss), dense.diagonal(), rtol=1e-10, atol=1e-12
    )

    grads = loop_gradients(model, x, y, loss)
    empirical = diagonal_fisher(model, x, y, loss, kind="empirical")
    torch.testing.assert_close(empirical, (grads**2).mean(0), rtol=1e-10, atol=1e-12)

    gen = torch.Generator().manual_seed(6)
    sampled = diagonal_fisher(model, x, None, loss, kind="true", num_samples=3000, generator=gen)
    assert (sampled - dense.diagonal()).norm() / dense.diagonal().norm() < 0.1
    with pytest.raises(ValueError, match="kind"):
        diagonal_fisher(model, x, y, loss, kind="fisher")


def test_product_input_validation():
    model = make_mlp()
    x, _ = make_data("mse")
    with pytest.raises(ValueError, match=r"shape \(31,\)"):
        ggn_vector_product(model, x, torch.zeros(30, dtype=DTYPE), "mse")
    with pytest.raises(ValueError, match="reduction"):
        ggn_vector_product(model, x, torch.zeros(31, dtype=DTYPE), "mse", reduction="max")


# ------------------------------------------------------------------------------------------------
# Layer statistics


def linear_layer_reference(model, x, y, loss):
    """h, per-example g for the two Linear layers of make_mlp, by hand."""
    h0 = x
    u0 = model[0](h0)
    h1 = torch.tanh(u0)
    u1 = model[2](h1)
    losses = reference_loss(u1, y, loss)
    g0, g1 = torch.autograd.grad(losses.sum(), [u0, u1])
    return (h0, g0.detach()), (h1.detach(), g1.detach())


@pytest.mark.parametrize("loss", LOSSES)
def test_linear_statistics_match_direct_computation(loss):
    model = make_mlp()
    x, y = make_data(loss, n=8)
    stats = collect_statistics(model, {"a": model[0], "b": model[2]}, [(x, y)], loss)
    for name, (h, g) in zip(["a", "b"], linear_layer_reference(model, x, y, loss), strict=True):
        s = stats[name]
        assert isinstance(s, LayerStatistics) and s.num_examples == 8 and s.num_positions == 1
        torch.testing.assert_close(s.input_covariance, h.T @ h / 8, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.gradient_covariance, g.T @ g / 8, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.cross_covariance, h.T @ g / 8, rtol=1e-12, atol=1e-12)

    # C^T is the gradient of the mean loss with respect to the weight matrix.
    model.zero_grad()
    reference_loss(model(x), y, loss).mean().backward()
    torch.testing.assert_close(stats["b"].cross_covariance.T, model[2].weight.grad)


def test_minibatch_statistics_equal_full_batch_in_any_order():
    model = make_mlp()
    x, y = make_data("cross_entropy", n=11)
    modules = {"a": model[0], "b": model[2]}
    full = collect_statistics(model, modules, [(x, y)], "cross_entropy", homogeneous=True)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(2))
    chunks = [order[:2], order[2:7], order[7:]]
    batches = [(x[i], y[i]) for i in chunks]
    mini = collect_statistics(model, modules, batches, "cross_entropy", homogeneous=True)
    for name in modules:
        assert mini[name].num_examples == 11
        for attr in ("input_covariance", "gradient_covariance", "cross_covariance"):
            torch.testing.assert_close(
                getattr(mini[name], attr), getattr(full[name], attr), rtol=1e-12, atol=1e-14
            )
    assert full["a"].input_covariance.shape == (4, 4)  # 3 inputs plus the constant 1


def test_homogeneous_statistics_cover_the_bias():
    model = make_mlp()
    x, y = make_data("mse", n=6)
    stats = collect_statistics(model, {"b": model[2]}, [(x, y)], "mse", homogeneous=True)
    model.zero_grad()
    reference_loss(model(x), y, "mse").mean().backward()
    torch.testing.assert_close(stats["b"].cross_covariance[-1], model[2].bias.grad)
    assert stats["b"].input_covariance[-1, -1].item() == pytest.approx(1.0)


def test_kronecker_factors_exact_for_single_example():
    model = make_mlp()
    x, y = make_data("mse", n=1)
    stats = collect_statistics(model, {"b": model[2]}, [(x, y)], "mse")
    a, g = stats["b"].kronecker_factors()
    grad = loop_gradients(model, x, y, "mse")[0, 16:28].reshape(3, 4)  # weight of layer 2
    row_major = grad.reshape(-1)
    column_major = grad.T.reshape(-1)
    torch.testing.assert_close(torch.kron(g, a), torch.outer(row_major, row_major))
    torch.testing.assert_close(torch.kron(a, g), torch.outer(column_major, column_major))


def test_conv_statistics_match_conv2d_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=1).to(DTYPE)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 5, 5, generator=gen, dtype=DTYPE)
    y = torch.randn(4, 2, generator=gen, dtype=DTYPE)
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    with StatisticsCollector({"conv": conv}, keep_samples=True) as collector:
        for xb, yb in batches:
            reference_loss(model(xb), yb, "mse").sum().backward()
    stats = collector.statistics()["conv"]
    assert stats.num_positions == 9 and stats.num_examples == 4
    assert stats.cross_covariance.shape == (2 * 3 * 3, 3)

    model.zero_grad()
    reference_loss(model(x), y, "mse").mean().backward()
    torch.testing.assert_close(stats.cross_covariance.T, conv.weight.grad.reshape(3, -1))

    # per-example output gradients summed over positions, from autograd directly
    u = conv(x)
    (g,) = torch.autograd.grad(reference_loss(model[1:](u), y, "mse").sum(), u)
    rows = g.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(stats.gradient_covariance, rows.T @ rows / 4)
    # h reproduces the convolution: h W^T = conv output without bias
    h, g_kept = collector.samples("conv")
    recon = h @ conv.weight.reshape(3, -1).T.to(DTYPE) + conv.bias
    torch.testing.assert_close(recon, u.detach().flatten(2).transpose(1, 2))
    assert g_kept.shape == (4, 9, 3)


def test_collector_validation():
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d"):
        StatisticsCollector({"r": nn.ReLU()})
    with pytest.raises(ValueError, match="groups=1"):
        StatisticsCollector({"c": nn.Conv2d(2, 2, 3, groups=2)})
    collector = StatisticsCollector({"l": nn.Linear(2, 2)})
    with pytest.raises(RuntimeError, match="no statistics"):
        collector.statistics()
    with pytest.raises(ValueError, match="keep_samples"):
        collector.samples("l")


# ------------------------------------------------------------------------------------------------
# Solves


def random_spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(d, rank or d, generator=gen, dtype=DTYPE)
    return factor @ factor.T


def test_damped_solve_matches_numpy():
    c = random_spd(6, 0)
    b = torch.randn(6, 2, dtype=DTYPE)
    for damping in (0.0, 0.3):
        x = damped_solve(c, b, damping)
        expected = np.linalg.solve(c.numpy() + damping * np.eye(6), b.numpy())
        np.testing.assert_allclose(x.numpy(), expected, rtol=1e-10, atol=1e-12)
    d = random_spd(6, 1)
    x = damped_solve(c, b[:, 0], 0.5, damping_matrix=d)
    np.testing.assert_allclose(
        x.numpy(), np.linalg.solve(c.numpy() + 0.5 * d.numpy(), b[:, 0].numpy()), rtol=1e-10
    )
    x32 = damped_solve(c.float(), b[:, 0].float(), 0.1)
    assert x32.dtype == torch.float32


def test_damped_solve_pseudo_inverse_fallback_on_singular_matrix(caplog):
    c = random_spd(5, 2, rank=2)
    b = torch.randn(5, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING, logger="defbound.curvature"):
        x = damped_solve(c, b, 0.0)
    assert "pseudo-inverse" in caplog.text
    assert torch.isfinite(x).all()
    np.testing.assert_allclose(x.numpy(), np.linalg.pinv(c.numpy()) @ b.numpy(), atol=1e-8)


def test_damped_solve_validation():
    c = random_spd(3, 0)
    with pytest.raises(ValueError, match="damping must be"):
        damped_solve(c, torch.ones(3, dtype=DTYPE), -1.0)
    with pytest.raises(ValueError, match="square"):
        damped_solve(c[:2], torch.ones(3, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"rhs must have shape \(3,\)"):
        damped_solve(c, torch.ones(4, dtype=DTYPE))
    bad = c.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        damped_solve(bad, torch.ones(3, dtype=DTYPE))


def test_generalized_eigh_matches_scipy():
    a = random_spd(5, 0) - 3 * torch.eye(5, dtype=DTYPE)
    b = random_spd(5, 1)
    mu, v = generalized_eigh(a, b)
    expected = scipy.linalg.eigh(a.numpy(), b.numpy(), eigvals_only=True)[::-1]
    np.testing.assert_allclose(mu.numpy(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a @ v, b @ v * mu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(v.T @ b @ v, torch.eye(5, dtype=DTYPE), rtol=1e-9, atol=1e-9)

    mu_damped, v_damped = generalized_eigh(a, b, damping=0.7)
    b_damped = b + 0.7 * torch.eye(5, dtype=DTYPE)
    torch.testing.assert_close(a @ v_damped, b_damped @ v_damped * mu_damped, rtol=1e-9, atol=1e-9)


def test_generalized_eigh_singular_b_restricts_to_range():
    a = random_spd(5, 0)
    b = random_spd(5, 1, rank=3)
    mu, v = generalized_eigh(a, b)
    assert mu.shape == (3,) and v.shape == (5, 3)
    assert torch.isfinite(mu).all() and torch.isfinite(v).all()
    torch.testing.assert_close(v.T @ b @ v, torch.eye(3, dtype=DTYPE), rtol=1e-8, atol=1e-8)
    residual = v.T @ (a @ v - b @ v * mu)
    assert residual.abs().max() < 1e-8
    assert torch.all(mu[:-1] >= mu[1:])


def test_conjugate_gradient():
    c = random_spd(8, 4) + 0.1 * torch.eye(8, dtype=DTYPE)
    b = torch.randn(8, dtype=DTYPE)
    x, iterations = conjugate_gradient(lambda v: c @ v, b, tol=1e-12)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(c.numpy(), b.numpy()), rtol=1e-8)
    assert 0 < iterations <= 16
    with pytest.raises(RuntimeError, match="non-positive curvature"):
        conjugate_gradient(lambda v: -v, b)
    with pytest.warns(UserWarning, match="stopped after 1 iterations"):
        conjugate_gradient(lambda v: c @ v, b, max_iter=1)


# ------------------------------------------------------------------------------------------------
# Quadratic model


def test_quadratic_model_dense_against_numpy():
    c = random_spd(6, 5)
    g = torch.randn(6, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    model = QuadraticModel(g, c, damping=0.2)
    expected = -np.linalg.solve(c.numpy() + 0.2 * np.eye(6), g.numpy())
    np.testing.assert_allclose(model.minimiser().numpy(), expected, rtol=1e-10)
    decrease = 0.5 * g.numpy() @ np.linalg.solve(c.numpy() + 0.2 * np.eye(6), g.numpy())
    assert model.predicted_decrease().item() == pytest.approx(decrease, rel=1e-12)
    assert model.value(model.minimiser()).item() == pytest.approx(-decrease, rel=1e-12)
    step = torch.randn(6, dtype=DTYPE)
    direct = g @ step + 0.5 * step @ (c + 0.2 * torch.eye(6, dtype=DTYPE)) @ step
    assert model.value(step).item() == pytest.approx(direct.item(), rel=1e-12)
    assert model.value(model.minimiser() + 1e-3 * step) > model.value(model.minimiser())


def test_quadratic_model_matvec_uses_ggn_and_matches_dense():
    net = make_mlp()
    x, y = make_data("cross_entropy")
    dense = dense_ggn(net, x, y, "cross_entropy")
    g = random_vector(dense.shape[0], 9)
    damping = 0.05
    matvec = QuadraticModel(g, lambda v: ggn_vector_product(net, x, v, "cross_entropy"), damping)
    dense_model = QuadraticModel(g, dense, damping)
    expected = -torch.linalg.solve(dense + damping * torch.eye(len(g), dtype=DTYPE), g)
    torch.testing.assert_close(matvec.minimiser(), expected, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(dense_model.minimiser(), expected, rtol=1e-10, atol=1e-12)
    assert matvec.predicted_decrease().item() == pytest.approx(
        dense_model.predicted_decrease().item(), rel=1e-8
    )


def test_quadratic_model_singular_curvature_without_damping():
    c = random_spd(4, 3, rank=1)
    g = torch.ones(4, dtype=DTYPE)
    step = QuadraticModel(g, c).minimiser()
    assert torch.isfinite(step).all()
    np.testing.assert_allclose(step.numpy(), -np.linalg.pinv(c.numpy()) @ g.numpy(), atol=1e-8)


def test_quadratic_model_validation():
    g = torch.ones(3, dtype=DTYPE)
    with pytest.raises(ValueError, match="damping"):
        QuadraticModel(g, torch.eye(3, dtype=DTYPE), damping=-0.1)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        QuadraticModel(g, torch.eye(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="gradient must be a vector"):
        QuadraticModel(torch.ones(3, 1), torch.eye(3))
    with pytest.raises(ValueError, match="callable"):
        QuadraticModel(g, 3.0)


def test_statistics_with_in_place_activation_after_the_layer():
    torch.manual_seed(0)
    in_place = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(DTYPE)
    plain = nn.Sequential(in_place[0], nn.ReLU(), in_place[2])
    x, y = make_data("mse", n=7, out=2)
    first = collect_statistics(in_place, {"l": in_place[0]}, [(x, y)], "mse")["l"]
    second = collect_statistics(plain, {"l": plain[0]}, [(x, y)], "mse")["l"]
    torch.testing.assert_close(first.gradient_covariance, second.gradient_covariance)
    torch.testing.assert_close(first.cross_covariance, second.cross_covariance)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    model.zero_grad()
    reference_loss(model(x), y, "mse").mean().backward()
    stats = collect_statistics(model, {"l": model[0]}, [(x, y)], "mse")["l"]
    torch.testing.assert_close(stats.cross_covariance.T, model[0].weight.grad)


def test_conv_statistics_refuse_mixed_spatial_sizes():
    conv = nn.Conv2d(1, 2, 3).to(DTYPE)
    with StatisticsCollector({"c": conv}):
        conv(torch.randn(2, 1, 5, 5, dtype=DTYPE)).sum().backward()
        with pytest.raises(RuntimeError, match="output positions"):
            conv(torch.randn(2, 1, 6, 6, dtype=DTYPE)).sum().backward()
