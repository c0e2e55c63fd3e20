r"""Width morphisms: add units (neurons or channels) to a layer, or remove them again.

A layer :math:`z = W h` (``nn.Linear``, or ``nn.Conv2d`` on unfolded patches) grows by ``k``
units with fan-in :math:`A` (``k`` new rows of :math:`W`, or ``k`` new output channels); the
new activations :math:`s = \sigma(A h)` enter the next layer through the fan-out :math:`B`
(``k`` new columns, or ``k`` new input channels), so the next pre-activation changes by

.. math::
    \delta(x) = B\, s(x).

With :math:`B = 0` (the default) the network computes exactly the same function for any
:math:`A`, in training and evaluation mode, and the gradients of all old parameters are
unchanged. With :math:`A = 0`, no new bias and :math:`\sigma(0) = 0` (ReLU, tanh) the function is
kept for any :math:`B` as well.

A batch norm between the two layers gets ``k`` new entries: weight 1, bias 0, running mean 0,
running variance 1 (the state of a freshly built ``nn.BatchNorm``), or copies of chosen existing
channels. New channels are normalized independently of the old ones, so this never changes the
old channels' outputs or running statistics.

`widen` and `narrow` edit an ``nn.Sequential`` (or a `nas.networks.ResidualBlock`) in place and
carry an optimizer along: the parameters are replaced in its ``param_groups`` and its per-element
state (SGD momentum, Adam moments) is resized, new entries zero, everything else (Adam's step
count) kept. Consequences, all exact:

* with :math:`B = 0`, the first optimizer step after growth moves every old entry exactly as it
  would have moved without growth (old gradients and old state are unchanged, and SGD and Adam
  act element-wise);
* that step gives :math:`B` a nonzero gradient, so from the second step on the grown network
  follows a different trajectory;
* the new entries inherit Adam's step count, so their bias correction is that of step
  :math:`t + 1` rather than 1: their first Adam updates are smaller than a fresh optimizer's.

Not supported: grouped or depthwise convolutions, layers used at several places of a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from nas.networks import ResidualBlock

logger = logging.getLogger(__name__)

# NOTE: in training mode, dropout between the widened layer and its consumer draws its random
# mask for the new units too, which shifts the random stream: the function is then preserved in
# distribution, not sample by sample.

Layer = nn.Linear | nn.Conv2d
Norm = nn.BatchNorm1d | nn.BatchNorm2d

_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


# ------------------------------------------------------------------------------------------------
# Checks


def _check_count(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of units) must be an integer >= 1, got {k!r}")


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        raise ValueError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(
            f"grouped or depthwise convolutions (groups={layer.groups}) are not supported"
        )


def _check_norm(norm: nn.Module) -> None:
    if not isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d):
        raise ValueError(f"expected nn.BatchNorm1d or nn.BatchNorm2d, got {type(norm).__name__}")


def _given(value: Tensor | None, shape: tuple[int, ...], like: Tensor, name: str) -> Tensor | None:
    if value is None:
        return None
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return value.detach().to(dtype=like.dtype, device=like.device)


def _width(layer: Layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _fan_in_size(layer: Layer) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


# ------------------------------------------------------------------------------------------------
# Rebuilding modules without touching the global random stream


def _rebuilt(layer: nn.Module, in_size: int, out_size: int) -> nn.Module:
    """An uninitialized copy of ``layer``'s configuration with new input and output sizes."""
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return skip_init(nn.Linear, in_size, out_size, bias=bias, **factory)
    return skip_init(
        nn.Conv2d,
        in_size,
        out_size,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=bias,
        padding_mode=layer.padding_mode,
        **factory,
    )


def _rebuilt_norm(norm: Norm, num_features: int) -> Norm:
    reference = norm.weight if norm.affine else norm.running_mean
    factory = (
        {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    )
    return skip_init(
        type(norm),
        num_features,
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
        **factory,
    )


def _filled(new: nn.Module, old: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    """Copy ``values`` into ``new``'s parameters and buffers; keep ``old``'s flags."""
    with torch.no_grad():
        for name, value in values.items():
            getattr(new, name).copy_(value)
    for name, parameter in new.named_parameters(recurse=False):
        parameter.requires_grad_(getattr(old, name).requires_grad)
    new.train(old.training)
    return new


# ------------------------------------------------------------------------------------------------
# Growth of single modules


def add_units(
    layer: Layer,
    k: int,
    fan_in: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Layer:
    r"""Return a copy of ``layer`` with ``k`` more output units (rows / output channels).

    .. math::
        W' = \begin{pmatrix} W \\ A \end{pmatrix},\qquad b' = \begin{pmatrix} b \\ b_A
        \end{pmatrix}

    Args:
        layer: ``nn.Linear`` (weight ``(q, p)``) or ``nn.Conv2d`` with ``groups=1`` (weight
            ``(C_out, C_in, kh, kw)``).
        k: Number of new units, >= 1.
        fan_in: ``A``, shape ``(k, p)`` or ``(k, C_in, kh, kw)``. Default: drawn like PyTorch's
            default initialization, uniform on :math:`\pm 1/\sqrt{\mathrm{fan\ in}}`, from
            ``generator``.
        bias: ``b_A``, shape ``(k,)``, for layers with a bias (default zeros).
        generator: Random generator for the default fan-in (CPU generator; the draw is moved to
            the layer's device).

    Returns:
        A new module of the same type, device and dtype; the old units keep their values.

    Raises:
        ValueError: On an unsupported layer, ``k < 1`` or wrongly shaped ``fan_in`` / ``bias``.
    """
    _check_layer(layer)
    _check_count(k)
    weight = layer.weight.detach()
    shape = (k, *weight.shape[1:])
    extra = _given(fan_in, shape, weight, "fan_in")
    if extra is None:
        bound = 1.0 / math.sqrt(math.prod(weight.shape[1:]))
        draw = torch.empty(shape, dtype=weight.dtype).uniform_(-bound, bound, generator=generator)
        extra = draw.to(weight.device)
    values = {"weight": torch.cat([weight, extra])}
    if layer.bias is not None:
        extra_bias = _given(bias, (k,), weight, "bias")
        if extra_bias is None:
            extra_bias = torch.zeros(k, dtype=weight.dtype, device=weight.device)
        values["bias"] = torch.cat([layer.bias.detach(), extra_bias])
    elif bias is not None:
        raise ValueError("bias was given but the layer has no bias")
    new = _rebuilt(layer, _fan_in_size(layer), _width(layer) + k)
    return _filled(new, layer, values)


def add_inputs(layer: Layer, k: int, fan_out: Tensor | None = None, *, positions: int = 1) -> Layer:
    r"""Return a copy of ``layer`` that accepts ``k`` more input units (the fan-out of new units).

    .. math::
        V' = \begin{pmatrix} V & B \end{pmatrix}

    For a linear layer behind ``nn.Flatten`` of a ``(C, H, W)`` feature map, each input channel
    occupies ``positions = H * W`` consecutive columns, so ``k`` new channels add ``k * H * W``
    columns at the end.

    Args:
        layer: ``nn.Linear`` (weight ``(q, m)``) or ``nn.Conv2d`` with ``groups=1`` (weight
            ``(C_next, C, kh, kw)``).
        k: Number of new input units, >= 1.
        fan_out: ``B``, shape ``(q, k * positions)`` or ``(C_next, k, kh, kw)``. Default zeros,
            which keeps the network's function.
        positions: Columns per input unit (linear layers behind a flattened feature map).

    Returns:
        A new module of the same type, device and dtype.

    Raises:
        ValueError: On an unsupported layer, ``k < 1``, ``positions < 1`` (or ``!= 1`` for a
            conv layer) or a wrongly shaped ``fan_out``.
    """
    _check_layer(layer)
    _check_count(k)
    if positions < 1 or (isinstance(layer, nn.Conv2d) and positions != 1):
        raise ValueError(f"positions must be >= 1 (and 1 for nn.Conv2d), got {positions}")
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        shape = (weight.shape[0], k * positions)
    else:
        shape = (weight.shape[0], k, *weight.shape[2:])
    extra = _given(fan_out, shape, weight, "fan_out")
    if extra is None:
        extra = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    values = {"weight": torch.cat([weight, extra], dim=1)}
    if layer.bias is not None:
        values["bias"] = layer.bias.detach()
    new = _rebuilt(layer, weight.shape[1] + shape[1], _width(layer))
    return _filled(new, layer, values)


def add_batch_norm_units(norm: Norm, k: int, copy_from: Sequence[int] | None = None) -> Norm:
    """Return a copy of ``norm`` with ``k`` more channels.

    New channels get weight 1, bias 0, running mean 0 and running variance 1 (a fresh batch
    norm), or, with ``copy_from``, the weight, bias and running statistics of the listed existing
    channels. ``num_batches_tracked`` is kept.

    Args:
        norm: ``nn.BatchNorm1d`` or ``nn.BatchNorm2d``.
        k: Number of new channels, >= 1.
        copy_from: ``k`` indices of existing channels to copy, or ``None``.

    Returns:
        A new batch norm of the same type, device and dtype.

    Raises:
        ValueError: On an unsupported module, ``k < 1`` or bad ``copy_from`` indices.
    """
    _check_norm(norm)
    _check_count(k)
    width = norm.num_features
    source = None
    if copy_from is not None:
        source = list(copy_from)
        if len(source) != k or any(not 0 <= i < width for i in source):
            raise ValueError(
                f"copy_from must hold {k} channel indices in [0, {width}), got {source}"
            )
    fresh = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    values = {}
    for name, fill in fresh.items():
        old = getattr(norm, name)
        if old is None:
            continue
        old = old.detach()
        extra = old[source] if source is not None else torch.full((k,), fill).to(old)
        values[name] = torch.cat([old, extra])
    if norm.num_batches_tracked is not None:
        values["num_batches_tracked"] = norm.num_batches_tracked
    return _filled(_rebuilt_norm(norm, width + k), norm, values)


# ------------------------------------------------------------------------------------------------
# Removal of single modules


def _kept(width: int, units: Sequence[int], device: torch.device) -> Tensor:
    removed = set(units)
    if len(removed) != len(units) or any(not 0 <= i < width for i in removed):
        raise ValueError(f"units must be distinct indices in [0, {width}), got {list(units)}")
    if len(removed) == width:
        raise ValueError("cannot remove every unit of a layer")
    return torch.tensor([i for i in range(width) if i not in removed], device=device)


def _expanded(keep: Tensor, positions: int) -> Tensor:
    """Column indices of the kept units when each unit spans ``positions`` columns."""
    offsets = torch.arange(positions, device=keep.device)
    return (keep[:, None] * positions + offsets).reshape(-1)


def remove_units(layer: Layer, units: Sequence[int]) -> Layer:
    """Return a copy of ``layer`` without the given output units (inverse of `add_units`).

    Args:
        layer: ``nn.Linear`` or ``nn.Conv2d`` with ``groups=1``.
        units: Distinct indices of output units to drop.

    Returns:
        A new module of the same type, device and dtype.
    """
    _check_layer(layer)
    keep = _kept(_width(layer), units, layer.weight.device)
    values = {"weight": layer.weight.detach()[keep]}
    if layer.bias is not None:
        values["bias"] = layer.bias.detach()[keep]
    new = _rebuilt(layer, _fan_in_size(layer), len(keep))
    return _filled(new, layer, values)


def remove_inputs(layer: Layer, units: Sequence[int], *, positions: int = 1) -> Layer:
    """Return a copy of ``layer`` without the inputs of the given units (inverse of `add_inputs`).

    Removing units changes the function unless their fan-out (the dropped columns) is zero.

    Args:
        layer: ``nn.Linear`` or ``nn.Conv2d`` with ``groups=1``.
        units: Distinct indices of input units to drop.
        positions: Columns per input unit (linear layers behind a flattened feature map).

    Returns:
        A new module of the same type, device and dtype.
    """
    _check_layer(layer)
    weight = layer.weight.detach()
    if weight.shape[1] % positions:
        raise ValueError(f"{weight.shape[1]} input columns are not a multiple of {positions}")
    keep = _kept(weight.shape[1] // positions, units, weight.device)
    columns = _expanded(keep, positions)
    values = {"weight": weight[:, columns]}
    if layer.bias is not None:
        values["bias"] = layer.bias.detach()
    new = _rebuilt(layer, len(columns), _width(layer))
    return _filled(new, layer, values)


def remove_batch_norm_units(norm: Norm, units: Sequence[int]) -> Norm:
    """Return a copy of ``norm`` without the given channels (inverse of `add_batch_norm_units`).

    Args:
        norm: ``nn.BatchNorm1d`` or ``nn.BatchNorm2d``.
        units: Distinct channel indices to drop.

    Returns:
        A new batch norm of the same type, device and dtype.
    """
    _check_norm(norm)
    reference = norm.weight if norm.affine else norm.running_mean
    device = reference.device if reference is not None else None
    keep = _kept(norm.num_features, units, device)
    values = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        old = getattr(norm, name)
        if old is not None:
            values[name] = old.detach()[keep]
    if norm.num_batches_tracked is not None:
        values["num_batches_tracked"] = norm.num_batches_tracked
    return _filled(_rebuilt_norm(norm, len(keep)), norm, values)


# ------------------------------------------------------------------------------------------------
# Optimizer state


def transfer_optimizer_state(
    optimizer: torch.optim.Optimizer,
    old: nn.Parameter,
    new: nn.Parameter,
    resize: Callable[[Tensor], Tensor],
) -> bool:
    """Put ``new`` in place of ``old`` in ``optimizer`` and resize its per-element state.

    Every state tensor with the shape of ``old`` (SGD ``momentum_buffer``, Adam ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``, ...) is treated as element-wise and mapped by
    ``resize``; other entries (Adam's ``step``) are copied unchanged. ``None`` entries stay
    ``None``.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.
        old: Parameter currently held by the optimizer.
        new: Its replacement.
        resize: Maps a tensor shaped like ``old`` to one shaped like ``new`` (same device and
            dtype).

    Returns:
        ``True`` if ``old`` was found in the optimizer, ``False`` otherwise (nothing changes).
    """
    found = False
    for group in optimizer.param_groups:
        for i, parameter in enumerate(group["params"]):
            if parameter is old:
                group["params"][i] = new
                found = True
    if not found:
        return False
    state = optimizer.state.pop(old, None)
    if state:
        moved = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == old.shape:
                moved[key] = resize(value.detach())
            elif isinstance(value, Tensor):
                moved[key] = value.clone()
            else:
                moved[key] = value
        optimizer.state[new] = moved
    return True


def _embedding(new_shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """Resize by zero padding: the old tensor fills the leading block of the new one."""

    def embed(value: Tensor) -> Tensor:
        out = torch.zeros(new_shape, dtype=value.dtype, device=value.device)
        out[tuple(slice(0, size) for size in value.shape)] = value
        return out

    return embed


def _selection(dim: int, index: Tensor) -> Callable[[Tensor], Tensor]:
    def select(value: Tensor) -> Tensor:
        return value.index_select(dim, index.to(value.device))

    return select


# ------------------------------------------------------------------------------------------------
# Editing containers


@dataclass(frozen=True)
class WidthChange:
    """Record of a `widen` or `narrow` edit.

    Attributes:
        container: The ``nn.Sequential`` that was edited.
        producer_index: Index of the layer whose units changed.
        norm_index: Index of its batch norm, or ``None``.
        consumer_index: Index of the layer reading the units.
        positions: Consumer columns per unit (``H * W`` behind ``nn.Flatten``, else 1).
        units: Indices of the added (`widen`) or removed (`narrow`) units in the old/new layer.
        width: The producer's width after the edit.
    """

    container: nn.Sequential
    producer_index: int
    norm_index: int | None
    consumer_index: int
    positions: int
    units: tuple[int, ...]
    width: int


@dataclass(frozen=True)
class _Chain:
    container: nn.Sequential
    producer: int
    norm: int | None
    consumer: int
    positions: int


def _locate(model: nn.Module, index: int) -> tuple[nn.Sequential, int]:
    if isinstance(model, ResidualBlock):
        return model.body, index
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"model must be an nn.Sequential or a ResidualBlock, got {type(model).__name__}"
        )
    if not -len(model) <= index < len(model):
        raise ValueError(f"index {index} is out of range for a container of {len(model)} modules")
    index %= len(model)
    if isinstance(model[index], ResidualBlock):
        return model[index].body, 0
    return model, index


def _chain(model: nn.Module, index: int) -> _Chain:
    """Find the producer at ``index``, its batch norm and the consumer of its units."""
    container, index = _locate(model, index)
    producer = container[index]
    _check_layer(producer)
    width = _width(producer)
    norm, flattened = None, False
    for j in range(index + 1, len(container)):
        module = container[j]
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and norm is None:
            if module.num_features != width:
                raise ValueError(
                    f"batch norm at index {j} has {module.num_features} features, expected {width}"
                )
            norm = j
        elif isinstance(module, nn.Flatten) and not flattened:
            if module.start_dim != 1 or module.end_dim != -1:
                raise ValueError("only nn.Flatten(start_dim=1, end_dim=-1) is supported")
            flattened = True
        elif isinstance(module, _ELEMENTWISE):
            continue
        elif isinstance(module, nn.Linear | nn.Conv2d):
            _check_layer(module)
            return _Chain(container, index, norm, j, _positions(producer, module, flattened, j))
        else:
            raise ValueError(
                f"cannot widen layer {index} through module {j} ({type(module).__name__}): only "
                "batch norms, element-wise activations, dropout, pooling and nn.Flatten may sit "
                "between a layer and the next Linear/Conv2d"
            )
    raise ValueError(
        f"layer {index} ({type(producer).__name__}) has no following Linear/Conv2d in its "
        "container: its width is fixed by the model output or a residual connection"
    )


def _positions(producer: Layer, consumer: Layer, flattened: bool, j: int) -> int:
    width = _width(producer)
    if isinstance(consumer, nn.Conv2d):
        if flattened or isinstance(producer, nn.Linear) or consumer.in_channels != width:
            raise ValueError(
                f"conv layer {j} with {consumer.in_channels} input channels cannot read the "
                f"{width} units of a {type(producer).__name__}"
            )
        return 1
    if isinstance(producer, nn.Conv2d) and not flattened:
        raise ValueError(f"linear layer {j} follows a conv layer without nn.Flatten")
    if consumer.in_features % width:
        raise ValueError(
            f"linear layer {j} has {consumer.in_features} inputs, not a multiple of the "
            f"producer's {width} units"
        )
    return consumer.in_features // width


def _replace(
    chain: _Chain,
    modules: dict[int, nn.Module],
    resizes: dict[int, Callable[[str, Tensor, Tensor], Callable[[Tensor], Tensor]]],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    for j, new in modules.items():
        old = chain.container[j]
        if optimizer is not None:
            for name, old_param in old.named_parameters(recurse=False):
                new_param = getattr(new, name)
                resize = resizes[j](name, old_param, new_param)
                if not transfer_optimizer_state(optimizer, old_param, new_param, resize):
                    logger.debug("parameter %s of module %d is not in the optimizer", name, j)
        chain.container[j] = new


def widen(
    model: nn.Module,
    index: int,
    k: int,
    fan_in: Tensor | None = None,
    fan_out: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    copy_norm_from: Sequence[int] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> WidthChange:
    r"""Add ``k`` units to layer ``index`` of a sequential model, in place.

    The layer (``nn.Linear`` or ``nn.Conv2d``) gets fan-in ``A`` (`add_units`), the first batch
    norm after it ``k`` new entries (`add_batch_norm_units`), and the next ``nn.Linear`` /
    ``nn.Conv2d`` fan-out ``B`` (`add_inputs`; behind ``nn.Flatten`` its fan-in grows by
    ``k * H * W``). Element-wise activations, dropout and pooling between them are allowed. If
    ``model[index]`` is a `nas.networks.ResidualBlock` (or ``model`` is one and ``index`` indexes
    its ``body``), its inner width is grown. The new units are the last ``k``.

    With ``fan_out=None`` (:math:`B = 0`) the model's outputs, in training and evaluation mode,
    and the gradients of its old parameters are unchanged.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> change = widen(net, 0, k=2)
        >>> net[0].out_features, net[2].in_features
        (4, 4)

    Args:
        model: ``nn.Sequential`` or `nas.networks.ResidualBlock`.
        index: Position of the layer to widen.
        k: Number of new units, >= 1.
        fan_in: ``A`` (see `add_units`); default random.
        fan_out: ``B`` (see `add_inputs`); default zeros.
        bias: Biases of the new units (default zeros).
        copy_norm_from: Existing batch-norm channels to copy (default: a fresh entry).
        optimizer: Optimizer holding the model's parameters; its parameters and state follow.
        generator: CPU random generator for the default fan-in.

    Returns:
        A `WidthChange` describing the edit.

    Raises:
        ValueError: If the layer cannot be widened (unsupported type, no following layer,
            unsupported module in between) or an argument has the wrong shape.
    """
    chain = _chain(model, index)
    container = chain.container
    width = _width(container[chain.producer])
    if copy_norm_from is not None and chain.norm is None:
        raise ValueError("copy_norm_from was given but no batch norm follows the layer")
    modules = {
        chain.producer: add_units(
            container[chain.producer], k, fan_in, bias=bias, generator=generator
        ),
        chain.consumer: add_inputs(
            container[chain.consumer], k, fan_out, positions=chain.positions
        ),
    }
    if chain.norm is not None:
        modules[chain.norm] = add_batch_norm_units(container[chain.norm], k, copy_norm_from)

    def grow(name: str, old: Tensor, new: Tensor) -> Callable[[Tensor], Tensor]:
        return _embedding(new.shape)

    _replace(chain, modules, dict.fromkeys(modules, grow), optimizer)
    logger.info("widened layer %d from %d to %d units", chain.producer, width, width + k)
    return WidthChange(
        container,
        chain.producer,
        chain.norm,
        chain.consumer,
        chain.positions,
        tuple(range(width, width + k)),
        width + k,
    )


def narrow(
    model: nn.Module,
    index: int,
    units: int | Sequence[int],
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> WidthChange:
    """Remove units from layer ``index`` of a sequential model, in place (inverse of `widen`).

    Drops the units' rows in the layer, their batch-norm entries and their columns in the next
    layer; ``optimizer`` parameters and state follow. After ``widen(model, i, k)``,
    ``narrow(model, i, k)`` restores the original ``state_dict`` exactly. The function is kept
    only if the removed units' fan-out is zero.

    Args:
        model: ``nn.Sequential`` or `nas.networks.ResidualBlock`.
        index: Position of the layer (as in `widen`).
        units: An integer ``k`` (remove the last ``k`` units) or distinct unit indices.
        optimizer: Optimizer holding the model's parameters.

    Returns:
        A `WidthChange` describing the edit.

    Raises:
        ValueError: If the layer cannot be edited or ``units`` is invalid.
    """
    chain = _chain(model, index)
    container = chain.container
    width = _width(container[chain.producer])
    if isinstance(units, int):
        _check_count(units)
        units = list(range(width - units, width))
    units = [int(i) for i in units]
    keep = _kept(width, units, torch.device("cpu"))
    columns = _expanded(keep, chain.positions)

    modules = {
        chain.producer: remove_units(container[chain.producer], units),
        chain.consumer: remove_inputs(container[chain.consumer], units, positions=chain.positions),
    }
    if chain.norm is not None:
        modules[chain.norm] = remove_batch_norm_units(container[chain.norm], units)

    def rows(name: str, old: Tensor, new: Tensor) -> Callable[[Tensor], Tensor]:
        return _selection(0, keep)

    def cols(name: str, old: Tensor, new: Tensor) -> Callable[[Tensor], Tensor]:
        return _selection(1, columns) if name == "weight" else (lambda value: value.clone())

    resizes = dict.fromkeys(modules, rows)
    resizes[chain.consumer] = cols
    _replace(chain, modules, resizes, optimizer)
    logger.info("narrowed layer %d from %d to %d units", chain.producer, width, len(keep))
    return WidthChange(
        container,
        chain.producer,
        chain.norm,
        chain.consumer,
        chain.positions,
        tuple(sorted(units)),
        len(keep),
    )
