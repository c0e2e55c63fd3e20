"""The one primitive a user needs to write a Gaussian DEF as an ordinary Pyro model."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

SITE_KEY = "defbound"
"""Key under ``site["infer"]`` where :func:`def_layer` records what the bound needs."""


def def_layer(
    name: str,
    *,
    bias: Tensor,
    noise_scale: Tensor | float,
    parent: Tensor | None = None,
    parent_name: str | None = None,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    obs: Tensor | None = None,
) -> Tensor:
    r"""Sample one Gaussian DEF layer and record its structure on the Pyro sample site.

    .. math::
        z \mid z_{\mathrm{parent}} \sim
        N\big(z_{\mathrm{parent}} (W \odot M)^T + b,\ \mathrm{diag}\,\sigma^2\big),

    or ``N(b, diag sigma^2)`` for a top layer (no parent). The site is an ordinary
    ``Normal(...).to_event(1)`` sample site, so the model also runs under ``poutine.trace``,
    ``pyro.infer.Predictive`` and Pyro's own ELBOs; ``site["infer"]["defbound"]`` carries the
    parent's site name, the raw weights, mask, bias and noise scale for :class:`FMBound` and the
    closed-form updates. Call it inside a ``pyro.plate`` over data rows.

    Args:
        name: sample site name.
        bias: ``(K,)`` bias ``b`` (prior mean for a top layer).
        noise_scale: ``(K,)`` or scalar standard deviation ``sigma``, positive.
        parent: parent layer's value, ``(N, K_parent)``; ``None`` for a top layer.
        parent_name: the parent's sample site name; required with ``parent``.
        weights: ``(K, K_parent)`` weights ``W`` (row = this layer's unit, column = parent unit);
            required with ``parent``.
        mask: optional 0/1 tensor shaped like ``weights``; zeros are structural (no edge).
        obs: observed value ``(N, K)`` for the data layer.

    Returns:
        The sampled (or observed) value, ``(N, K)``.

    Raises:
        ValueError: on inconsistent arguments, shapes, non-positive noise or a non-binary mask.
    """
    bias = torch.as_tensor(bias)
    K = _check_vector(name, "bias", bias)
    scale = torch.as_tensor(noise_scale, dtype=bias.dtype, device=bias.device)
    if scale.dim() == 0:
        scale = scale.expand(K)
    if _check_vector(name, "noise_scale", scale) != K:
        raise ValueError(f"layer {name!r}: noise_scale has {scale.shape[0]} entries, bias has {K}")
    if not torch.all(scale > 0):
        raise ValueError(
            f"layer {name!r}: noise_scale must be positive everywhere, got minimum "
            f"{scale.min().item():g}"
        )
    if parent is None:
        if weights is not None or parent_name is not None or mask is not None:
            raise ValueError(
                f"layer {name!r}: weights, parent_name and mask need a parent value; a top layer "
                "takes only bias and noise_scale"
            )
        loc = bias
        effective = None
    else:
        effective = _check_edge(name, parent, parent_name, weights, mask, K)
        loc = parent @ effective.T + bias
    if obs is not None:
        _check_obs(name, obs, K)
    record = {
        "parent": parent_name,
        "weights": weights,
        "effective_weights": effective,
        "mask": mask,
        "bias": bias,
        "noise_scale": scale,
    }
    return pyro.sample(
        name,
        dist.Normal(loc, scale).to_event(1),
        obs=obs,
        infer={SITE_KEY: record},
    )


def _check_vector(layer: str, what: str, value: Tensor) -> int:
    if value.dim() != 1:
        raise ValueError(f"layer {layer!r}: {what} must be a vector (K,), got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"layer {layer!r}: {what} has non-finite entries")
    return int(value.shape[0])


def _check_edge(
    name: str,
    parent: Tensor,
    parent_name: str | None,
    weights: Tensor | None,
    mask: Tensor | None,
    K: int,
) -> Tensor:
    if parent_name is None or weights is None:
        raise ValueError(
            f"layer {name!r}: a layer with a parent value needs parent_name (the parent's sample "
            "site) and weights"
        )
    if weights.dim() != 2 or weights.shape[0] != K or weights.shape[1] != parent.shape[-1]:
        raise ValueError(
            f"layer {name!r}: weights have shape {tuple(weights.shape)}, expected "
            f"({K}, {parent.shape[-1]}) = (width of {name!r}, width of parent {parent_name!r})"
        )
    if not torch.isfinite(weights).all():
        raise ValueError(f"layer {name!r}: weights have non-finite entries")
    if mask is None:
        return weights
    if tuple(mask.shape) != tuple(weights.shape):
        raise ValueError(
            f"layer {name!r}: mask has shape {tuple(mask.shape)}, expected the weights' shape "
            f"{tuple(weights.shape)}"
        )
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError(f"layer {name!r}: mask must contain only 0 and 1")
    return weights * mask.to(weights.dtype)


def _check_obs(name: str, obs: Tensor, K: int) -> None:
    if obs.dim() != 2 or obs.shape[-1] != K:
        raise ValueError(
            f"layer {name!r}: observed data has shape {tuple(obs.shape)}, expected (N, {K})"
        )
    if obs.shape[0] == 0:
        raise ValueError(f"layer {name!r}: observed data is empty (0 rows)")
    if not torch.isfinite(obs).all():
        n_bad = int((~torch.isfinite(obs)).sum())
        raise ValueError(f"layer {name!r}: observed data has {n_bad} NaN or infinite values")
