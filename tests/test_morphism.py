"""Tests for nas.morphism: function preservation, gradients, optimizer state, removal."""

import copy

import pytest
import torch
from torch import nn

from nas.morphism import (
    add_batch_norm_units,
    add_inputs,
    add_units,
    narrow,
    remove_units,
    transfer_optimizer_state,
    widen,
)
from nas.networks import ResidualBlock

DTYPE = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-12}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Layers followed by a batch norm have no bias: its true gradient is zero, and Adam divides the
# round-off left in it (~1e-17) by sqrt(v) + eps, which turns 1e-16 relative noise into 1e-11
# absolute differences between otherwise identical runs.


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4, bias=False),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Linear(4, 3),
        nn.Tanh(),
        nn.Linear(3, 2),
    ).to(DTYPE)


def convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    ).to(DTYPE)


def resnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        ResidualBlock(3, hidden_channels=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    ).to(DTYPE)


def inputs(kind: str, n: int = 6, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 5) if kind == "mlp" else (n, 2, 6, 6)
    return torch.randn(shape, generator=gen, dtype=DTYPE)


def randomize_norms(model: nn.Module) -> None:
    """Give batch norms non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(11)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            c = module.num_features
            with torch.no_grad():
                module.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen, dtype=DTYPE))
                module.bias.copy_(0.3 * torch.randn(c, generator=gen, dtype=DTYPE))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen, dtype=DTYPE))
                module.running_var.copy_(1 + torch.rand(c, generator=gen, dtype=DTYPE))


CASES = [
    ("mlp", mlp, 0, 3),  # Linear -> BN1d -> ReLU -> Linear
    ("mlp", mlp, 3, 2),  # Linear -> Tanh -> Linear (no norm)
    ("conv", convnet, 0, 2),  # Conv -> BN2d -> ReLU -> Conv
    ("conv", convnet, 3, 2),  # Conv -> BN2d -> ReLU -> MaxPool -> Flatten -> Linear
    ("conv", resnet, 3, 2),  # inner conv of a ResidualBlock
]
IDS = ["linear-bn", "linear", "conv-bn", "conv-flatten-linear", "residual"]


def labelled(label: str):
    """Prefix assert_close's message with ``label`` (a plain ``msg`` would replace it)."""
    return lambda message: f"{label}: {message}"


def grown_copy(model, index, k, **kwargs):
    grown = copy.deepcopy(model)
    change = widen(grown, index, k, generator=torch.Generator().manual_seed(5), **kwargs)
    return grown, change


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("kind", "build", "index", "k"), CASES, ids=IDS)
def test_zero_fan_out_preserves_function_and_old_gradients(kind, build, index, k, mode):
    model = build()
    randomize_norms(model)
    grown, _ = grown_copy(model, index, k)
    model.train(mode == "train")
    grown.train(mode == "train")
    x = inputs(kind)

    out, out_grown = model(x), grown(x)
    torch.testing.assert_close(out_grown, out, **TOL)

    out.pow(2).sum().backward()
    out_grown.pow(2).sum().backward()
    for (name, old), (_, new) in zip(
        model.named_parameters(), grown.named_parameters(), strict=True
    ):
        block = tuple(slice(0, s) for s in old.shape)
        torch.testing.assert_close(new.data[block], old.data, rtol=0, atol=0, msg=labelled(name))
        torch.testing.assert_close(new.grad[block], old.grad, **TOL, msg=labelled(name))
    # running statistics of the old channels evolve identically in training mode
    for (name, old), (_, new) in zip(model.named_buffers(), grown.named_buffers(), strict=True):
        if old.ndim == 1:
            torch.testing.assert_close(new[: len(old)], old, **TOL, msg=labelled(name))
        else:
            assert torch.equal(new, old)


@pytest.mark.parametrize(("kind", "build", "index", "k"), CASES, ids=IDS)
def test_new_parameters_get_the_expected_gradients(kind, build, index, k):
    model = build()
    grown, change = grown_copy(model, index, k)
    grown.train()
    x = inputs(kind)
    grown(x).pow(2).sum().backward()
    container = change.container
    producer, consumer = container[change.producer_index], container[change.consumer_index]
    # B = 0 blocks the gradient of the fan-in, but the fan-out itself is learnable
    assert torch.count_nonzero(producer.weight.grad[-k:]) == 0
    new_columns = consumer.weight.grad[:, -k * change.positions :]
    assert new_columns.abs().max() > 1e-6


def test_conv_to_linear_through_flatten_grows_by_k_times_positions():
    model = convnet()
    grown, change = grown_copy(model, 3, 2)
    assert change.positions == 9
    assert grown[8].in_features == (4 + 2) * 9
    assert grown[3].out_channels == 6 and grown[4].num_features == 6


def test_residual_block_inner_width_grows():
    model = resnet()
    grown, change = grown_copy(model, 3, 2)
    block = grown[3]
    assert block.hidden_channels == 4 and block.channels == 3
    assert change.container is block.body
    # a block can also be widened directly, with index into its body
    direct = ResidualBlock(3, 1).to(DTYPE)
    randomize_norms(direct)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    before = direct.eval()(x)
    widen(direct, 0, 3)
    torch.testing.assert_close(direct(x), before, **TOL)
    assert direct.hidden_channels == 4


def test_zero_fan_in_with_random_fan_out_preserves_function():
    # tanh(0) = 0 keeps the function; tanh'(0) = 1 gives the fan-in a gradient (with ReLU,
    # PyTorch's relu'(0) = 0 would make it vanish).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    grown = copy.deepcopy(model)
    fan_out = torch.randn(2, 3, dtype=DTYPE)
    widen(grown, 0, 3, fan_in=torch.zeros(3, 5, dtype=DTYPE), fan_out=fan_out)
    x = inputs("mlp")
    out, out_grown = model(x), grown(x)
    torch.testing.assert_close(out_grown, out, **TOL)
    out.sum().backward()
    out_grown.sum().backward()
    torch.testing.assert_close(grown[0].weight.grad[:4], model[0].weight.grad, **TOL)
    assert grown[0].weight.grad[4:].abs().max() > 1e-6  # the GradMax direction is nonzero


def test_nonzero_fan_in_and_fan_out_change_the_function():
    model = mlp()
    grown, _ = grown_copy(model, 3, 2, fan_out=torch.ones(2, 2, dtype=DTYPE))
    x = inputs("mlp")
    assert (grown.eval()(x) - model.eval()(x)).abs().max() > 1e-3


def test_batch_norm_entries():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3).to(DTYPE)
    randomize_norms(norm)
    norm.num_batches_tracked.fill_(7)
    fresh = add_batch_norm_units(norm, 2)
    assert torch.equal(fresh.weight[3:], torch.ones(2, dtype=DTYPE))
    assert torch.equal(fresh.bias[3:], torch.zeros(2, dtype=DTYPE))
    assert torch.equal(fresh.running_mean[3:], torch.zeros(2, dtype=DTYPE))
    assert torch.equal(fresh.running_var[3:], torch.ones(2, dtype=DTYPE))
    assert torch.equal(fresh.running_var[:3], norm.running_var)
    assert fresh.num_batches_tracked.item() == 7 and fresh.eps == norm.eps
    copied = add_batch_norm_units(norm, 2, copy_from=[2, 0])
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(copied, name)[3:], getattr(norm, name)[[2, 0]])
    with pytest.raises(ValueError, match="copy_from"):
        add_batch_norm_units(norm, 2, copy_from=[5, 0])


def test_single_module_operations_keep_configuration_and_dtype():
    conv = nn.Conv2d(2, 3, (3, 1), stride=2, padding=(1, 0), dilation=1, bias=True)
    grown = add_units(conv, 2, bias=torch.ones(2))
    assert (grown.out_channels, grown.kernel_size, grown.stride, grown.padding) == (
        5,
        (3, 1),
        (2, 2),
        (1, 0),
    )
    assert grown.weight.dtype == torch.float32 and torch.equal(grown.bias[3:], torch.ones(2))
    back = remove_units(grown, [3, 4])
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    frozen = nn.Linear(3, 2)
    frozen.weight.requires_grad_(False)
    assert not add_inputs(frozen, 1).weight.requires_grad


def test_default_fan_in_is_reproducible_and_does_not_touch_global_rng():
    layer = nn.Linear(4, 2).to(DTYPE)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    a = add_units(layer, 3, generator=torch.Generator().manual_seed(1))
    b = add_units(layer, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.weight, b.weight)
    assert a.weight[2:].abs().max() <= 0.5 and a.weight[2:].abs().min() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_are_kept(device):
    model = convnet().to(device=device, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 2, 6, 6, device=device)).sum().backward()
    optimizer.step()
    widen(model, 3, 2, optimizer=optimizer)
    for tensor in [*model.parameters(), *model.buffers()]:
        assert tensor.device.type == device
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32
    for state in optimizer.state.values():
        assert state["exp_avg"].device.type == device
    model(torch.randn(2, 2, 6, 6, device=device)).sum().backward()
    optimizer.step()


# ------------------------------------------------------------------------------------------------
# Optimizer state


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(
        params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=1e-3),
    "adamw-amsgrad": lambda params: torch.optim.AdamW(params, lr=0.01, amsgrad=True),
}


def train_steps(model, optimizer, x, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize(
    ("kind", "build", "index", "k"), CASES[:1] + CASES[3:4], ids=IDS[:1] + IDS[3:4]
)
def test_first_step_after_growth_moves_old_entries_exactly_as_without_growth(
    name, kind, build, index, k
):
    x = inputs(kind)
    reference = build()
    optimizer = OPTIMIZERS[name](reference.parameters())
    train_steps(reference, optimizer, x, 2)

    grown = copy.deepcopy(reference)
    grown_optimizer = OPTIMIZERS[name](grown.parameters())
    grown_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    change = widen(grown, index, k, optimizer=grown_optimizer)

    held = [id(p) for group in grown_optimizer.param_groups for p in group["params"]]
    assert held == [id(p) for p in grown.parameters()]
    assert set(map(id, grown_optimizer.state)) == set(held)
    for old, new in zip(reference.parameters(), grown.parameters(), strict=True):
        new_entries = torch.ones_like(new, dtype=torch.bool)
        new_entries[tuple(slice(0, s) for s in old.shape)] = False
        for key, value in grown_optimizer.state[new].items():
            if value.shape == new.shape:
                assert torch.count_nonzero(value[new_entries]) == 0, key
            else:
                assert torch.equal(value, optimizer.state[old][key]), key

    train_steps(reference, optimizer, x, 1)
    train_steps(grown, grown_optimizer, x, 1)
    for old, new in zip(reference.parameters(), grown.parameters(), strict=True):
        block = tuple(slice(0, s) for s in old.shape)
        torch.testing.assert_close(new.data[block], old.data, **TOL)
        old_state, new_state = optimizer.state[old], grown_optimizer.state[new]
        for key, value in old_state.items():
            if value.shape == old.shape:
                torch.testing.assert_close(new_state[key][block], value, **TOL, msg=labelled(key))
            else:
                torch.testing.assert_close(new_state[key], value, msg=labelled(key))

    # the new fan-out received a gradient, so the grown network now differs ...
    consumer = change.container[change.consumer_index]
    assert consumer.weight[:, -k * change.positions :].abs().max() > 0
    # ... while the fan-in had a zero loss gradient at B = 0 (it only feels weight decay)
    producer = change.container[change.producer_index]
    assert torch.count_nonzero(producer.weight.grad[-k:]) == 0


def test_second_step_after_growth_differs_for_old_entries():
    """Documented behaviour: only the first step is identical; B != 0 afterwards."""
    x = inputs("mlp")
    reference = mlp()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    train_steps(reference, optimizer, x, 1)
    grown = copy.deepcopy(reference)
    grown_optimizer = torch.optim.SGD(grown.parameters(), lr=0.5, momentum=0.9)
    grown_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    widen(grown, 0, 2, optimizer=grown_optimizer)
    train_steps(reference, optimizer, x, 2)
    train_steps(grown, grown_optimizer, x, 2)
    assert (grown[0].weight[:4] - reference[0].weight).abs().max() > 1e-8


def test_transfer_optimizer_state_ignores_foreign_parameters():
    layer = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    outsider = nn.Parameter(torch.zeros(3))
    assert not transfer_optimizer_state(optimizer, outsider, nn.Parameter(torch.zeros(4)), id)


# ------------------------------------------------------------------------------------------------
# Removal


@pytest.mark.parametrize(("kind", "build", "index", "k"), CASES, ids=IDS)
def test_widen_then_narrow_restores_state_dict_and_optimizer_state(kind, build, index, k):
    model = build()
    randomize_norms(model)
    x = inputs(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, optimizer, x, 2)
    original = copy.deepcopy(model.state_dict())
    original_state = copy.deepcopy(optimizer.state_dict())

    widen(model, index, k, fan_out=None, optimizer=optimizer)
    narrow(model, index, k, optimizer=optimizer)

    restored = model.state_dict()
    assert list(restored) == list(original)
    for key, value in original.items():
        assert torch.equal(restored[key], value), key
    state = optimizer.state_dict()
    for pid, entries in original_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(state["state"][pid][key], value), (pid, key)


def test_narrow_arbitrary_units_with_zero_fan_out_keeps_function():
    model = convnet()
    with torch.no_grad():
        model[8].weight.view(2, 4, 9)[:, 1] = 0.0  # channel 1 of conv 3 has zero fan-out
    x = inputs("conv")
    before = model.eval()(x)
    change = narrow(model, 3, [1])
    assert change.width == 3 and model[8].in_features == 27 and model[4].num_features == 3
    torch.testing.assert_close(model(x), before, **TOL)


# ------------------------------------------------------------------------------------------------
# Errors


def test_invalid_requests_raise_clear_errors():
    model = mlp()
    with pytest.raises(ValueError, match="no following Linear/Conv2d"):
        widen(model, 5, 1)
    with pytest.raises(ValueError, match="expected nn.Linear or nn.Conv2d"):
        widen(model, 2, 1)
    with pytest.raises(ValueError, match="integer >= 1"):
        widen(model, 0, 0)
    with pytest.raises(ValueError, match=r"fan_in must have shape \(2, 5\)"):
        widen(model, 0, 2, fan_in=torch.zeros(2, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"fan_out must have shape \(3, 2\)"):
        widen(model, 0, 2, fan_out=torch.zeros(2, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="no batch norm"):
        widen(model, 3, 1, copy_norm_from=[0])
    with pytest.raises(ValueError, match="LayerNorm"):
        widen(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1)), 0, 1)
    with pytest.raises(ValueError, match="groups"):
        widen(nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Conv2d(2, 1, 1)), 0, 1)
    with pytest.raises(ValueError, match="residual connection"):
        widen(ResidualBlock(2), 3, 1)
    with pytest.raises(ValueError, match="out of range"):
        widen(model, 9, 1)
    with pytest.raises(ValueError, match="distinct indices"):
        narrow(model, 0, [1, 1])
    with pytest.raises(ValueError, match="every unit"):
        narrow(model, 0, 4)
    # nothing was changed by the failed calls
    assert model[0].out_features == 4 and model[3].in_features == 4
