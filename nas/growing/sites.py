r"""Growth sites: where a network can take new units, and what the new units compute.

A *site* is a producer layer (``nn.Linear`` or ``nn.Conv2d``) together with the consumer layer
that reads its units and the modules in between (batch norm, element-wise activation, pooling,
``nn.Flatten``), exactly the chain that `nas.morphism.widen` edits. Adding ``k`` units with
fan-in :math:`A` (and biases :math:`a`) gives new pre-activations :math:`z = A h + a` (conv:
``conv2d(x, A, a)``), new activations :math:`s = \mathrm{post}(z)` (the in-between modules applied
to the new channels only) and the consumer increment

.. math::
    \delta = B s \quad (\text{conv consumer: } \delta = \mathrm{conv2d}(s, B)).

`new_activations` and `consumer_increment` compute these without editing the network, and
`IncrementHook` adds :math:`\delta` to the consumer's output inside a forward pass, which is how
candidates are evaluated on the real loss before they are inserted.

A batch norm between producer and consumer gets, for the new channels, weight 1, bias 0 and the
mean and (biased) variance of :math:`z` over the examples used to learn the candidate as running
statistics (`NormStatistics`), so that training mode (batch statistics) and evaluation mode
(running statistics) give about the same new activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional

from nas.morphism import _chain
from nas.networks import ResidualBlock

Layer = nn.Linear | nn.Conv2d


@dataclass(frozen=True)
class NormStatistics:
    """Running statistics given to the new entries of the batch norm of a site.

    Attributes:
        mean: Per new channel mean of the new pre-activations, shape ``(k,)``.
        var: Per new channel (biased) variance, shape ``(k,)``.
        eps: The batch norm's ``eps``.
    """

    mean: Tensor
    var: Tensor
    eps: float


@dataclass(frozen=True)
class Site:
    """A producer layer whose width can grow, with its consumer and the modules in between.

    Attributes:
        index: The index to pass to `nas.morphism.widen` on the top-level model.
        name: A readable name, e.g. ``"3"`` or ``"2.body.0"``.
        container: The ``nn.Sequential`` holding producer and consumer.
        producer: Position of the producer in ``container``.
        norm: Position of its batch norm, or ``None``.
        consumer: Position of the consumer.
        positions: Consumer columns per unit (``H * W`` behind ``nn.Flatten``, else 1).
    """

    index: int
    name: str
    container: nn.Sequential
    producer: int
    norm: int | None
    consumer: int
    positions: int

    @property
    def producer_layer(self) -> Layer:
        """The layer that gets the new units."""
        return self.container[self.producer]

    @property
    def consumer_layer(self) -> Layer:
        """The layer that reads the new units."""
        return self.container[self.consumer]

    @property
    def between(self) -> tuple[nn.Module, ...]:
        """Modules between producer and consumer, in order."""
        return tuple(self.container[j] for j in range(self.producer + 1, self.consumer))

    @property
    def width(self) -> int:
        """Current number of units of the producer."""
        layer = self.producer_layer
        return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

    def fan_in_shape(self, k: int) -> tuple[int, ...]:
        """Shape of the fan-in ``A`` of ``k`` new units (without the bias)."""
        return (k, *self.producer_layer.weight.shape[1:])

    def fan_out_shape(self, k: int) -> tuple[int, ...]:
        """Shape of the fan-out ``B`` of ``k`` new units (as `nas.morphism.add_inputs`)."""
        weight = self.consumer_layer.weight
        if isinstance(self.consumer_layer, nn.Linear):
            return (weight.shape[0], k * self.positions)
        return (weight.shape[0], k, *weight.shape[2:])

    def added_parameters(self, k: int) -> int:
        """Number of parameters that ``k`` new units add (fan-in, bias, batch norm, fan-out)."""
        count = math.prod(self.fan_in_shape(k)) + math.prod(self.fan_out_shape(k))
        if self.producer_layer.bias is not None:
            count += k
        if self.norm is not None and self.container[self.norm].affine:
            count += 2 * k
        return count


def growth_sites(model: nn.Module) -> list[Site]:
    """All sites of ``model`` that `nas.morphism.widen` can grow.

    Every top-level ``nn.Linear`` / ``nn.Conv2d`` of an ``nn.Sequential`` that is followed by
    another such layer (through batch norms, element-wise modules, pooling, ``nn.Flatten``) is a
    site, and so is the inner width of every top-level `nas.networks.ResidualBlock`.

    Args:
        model: An ``nn.Sequential``.

    Returns:
        The sites in model order.

    Raises:
        ValueError: If ``model`` is not an ``nn.Sequential``.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an nn.Sequential, got {type(model).__name__}")
    sites = []
    for index, module in enumerate(model):
        if isinstance(module, ResidualBlock):
            name = f"{index}.body.0"
        elif isinstance(module, nn.Linear | nn.Conv2d) and getattr(module, "groups", 1) == 1:
            name = str(index)
        else:
            continue
        try:
            chain = _chain(model, index)
        except ValueError:
            continue
        sites.append(
            Site(
                index,
                name,
                chain.container,
                chain.producer,
                chain.norm,
                chain.consumer,
                chain.positions,
            )
        )
    return sites


def site_by_index(model: nn.Module, index: int) -> Site:
    """The site of ``model`` with top-level index ``index``.

    Raises:
        ValueError: If no site has that index.
    """
    for site in growth_sites(model):
        if site.index == index:
            return site
    raise ValueError(f"layer {index} is not a growth site of the model")


def pre_activations(site: Site, inputs: Tensor, fan_in: Tensor, bias: Tensor | None) -> Tensor:
    r"""New pre-activations :math:`z = A h + a` (conv: ``conv2d(x, A, a)``) of the new units.

    Args:
        site: The site.
        inputs: Producer inputs, ``(n, p)`` or ``(n, C_in, H, W)``.
        fan_in: ``A``, shape ``site.fan_in_shape(k)``.
        bias: ``a``, shape ``(k,)``, or ``None``.

    Returns:
        ``(n, k)`` or ``(n, k, H', W')``.
    """
    layer = site.producer_layer
    if isinstance(layer, nn.Linear):
        return functional.linear(inputs, fan_in, bias)
    return functional.conv2d(
        inputs, fan_in, bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def norm_statistics(site: Site, z: Tensor) -> NormStatistics | None:
    """Batch statistics of the new pre-activations ``z`` for the site's batch norm (if any)."""
    if site.norm is None:
        return None
    dims = [0] if z.ndim == 2 else [0, 2, 3]
    mean = z.mean(dim=dims)
    var = z.var(dim=dims, unbiased=False)
    return NormStatistics(mean, var, float(site.container[site.norm].eps))


def new_activations(site: Site, z: Tensor, norm: NormStatistics | None) -> Tensor:
    r"""Apply the in-between modules to the new channels: :math:`s = \mathrm{post}(z)`.

    The site's batch norm acts on the new channels as :math:`(z - \mu)/\sqrt{v + \epsilon}`
    with ``norm``'s statistics (weight 1, bias 0); every other in-between module acts channel by
    channel and is applied as it is (evaluation-mode dropout is the identity).

    Args:
        site: The site.
        z: New pre-activations from `pre_activations`.
        norm: Statistics for the batch norm; required when the site has one.

    Returns:
        ``s``: ``(n, k * positions)`` for a linear consumer, ``(n, k, H, W)`` for a conv one.
    """
    s = z
    for offset, module in enumerate(site.between):
        if site.producer + 1 + offset == site.norm:
            if norm is None:
                raise ValueError("the site has a batch norm: pass its NormStatistics")
            shape = (1, -1) if s.ndim == 2 else (1, -1, 1, 1)
            s = (s - norm.mean.reshape(shape)) / (norm.var.reshape(shape) + norm.eps).sqrt()
        elif isinstance(module, nn.Flatten):
            s = s.flatten(start_dim=1)
        elif isinstance(module, nn.Dropout | nn.Dropout1d | nn.Dropout2d):
            continue
        else:
            s = module(s)
    if isinstance(site.consumer_layer, nn.Linear) and s.ndim != 2:
        s = s.flatten(start_dim=1)
    return s


def consumer_features(site: Site, s: Tensor) -> Tensor:
    r"""Features :math:`U` with :math:`\delta_{c l} = \sum_m B_{c m} U_{m l}` per example.

    Linear consumer: :math:`U = s`, one position; conv consumer: the unfolded patches of ``s``
    under the consumer's kernel, stride, padding and dilation.

    Args:
        site: The site.
        s: New activations from `new_activations`.

    Returns:
        ``(n, M, L)`` with ``M = B.shape[1:]`` flattened and ``L`` consumer output positions.
    """
    layer = site.consumer_layer
    if isinstance(layer, nn.Linear):
        return s.unsqueeze(2)
    return functional.unfold(
        s, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
    )


def consumer_increment(site: Site, s: Tensor, fan_out: Tensor) -> Tensor:
    r"""Consumer increment :math:`\delta = B s` (conv: ``conv2d(s, B)``), shaped like its output."""
    layer = site.consumer_layer
    if isinstance(layer, nn.Linear):
        return functional.linear(s, fan_out)
    return functional.conv2d(s, fan_out, None, layer.stride, layer.padding, layer.dilation)


@dataclass
class Increment:
    """Candidate units to add virtually at a site (see `IncrementHook`).

    Attributes:
        site: The site.
        fan_in: ``A``.
        bias: New biases or ``None``.
        fan_out: ``B``.
        norm: Batch-norm statistics for the new channels (sites with a batch norm).
    """

    site: Site
    fan_in: Tensor
    bias: Tensor | None
    fan_out: Tensor
    norm: NormStatistics | None = None


@contextmanager
def IncrementHook(increments: list[Increment]) -> Iterator[None]:  # noqa: N802
    r"""Inside the context, every forward pass adds :math:`\delta = B\,\mathrm{post}(A h + a)`.

    The producer's input ``h`` is captured by a forward pre-hook and the increment is added to
    the consumer's output by a forward hook; the network itself is not edited. In evaluation
    mode the result equals the output of the network grown by `nas.morphism.widen` with the same
    ``A``, ``a``, ``B`` (and new batch-norm entries holding ``norm``'s statistics). Gradients
    flow to the increments' tensors.

    Args:
        increments: One entry per site (several sites may be active at once).
    """
    handles = []
    captured: dict[int, Tensor] = {}
    for number, increment in enumerate(increments):
        site = increment.site

        def remember(module: nn.Module, args: tuple[Tensor, ...], number: int = number) -> None:
            captured[number] = args[0]

        def add(
            module: nn.Module,
            args: tuple[Tensor, ...],
            output: Tensor,
            number: int = number,
            increment: Increment = increment,
        ) -> Tensor:
            # the increment's tensors may be float64 statistics: compute in the model's dtype
            h = captured.pop(number)
            bias = None if increment.bias is None else increment.bias.to(h)
            z = pre_activations(increment.site, h, increment.fan_in.to(h), bias)
            s = new_activations(increment.site, z, increment.norm).to(output.dtype)
            return output + consumer_increment(increment.site, s, increment.fan_out.to(output))

        handles.append(site.producer_layer.register_forward_pre_hook(remember))
        handles.append(site.consumer_layer.register_forward_hook(add))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
