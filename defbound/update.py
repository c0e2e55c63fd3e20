r"""Closed-form parallel update of a whole hidden layer under the forest-mixture bound.

With the optimal auxiliary parameters plugged in, the FM bound separates over the variables of
one layer, so every ``q(z_{l,j})`` is maximised at once. In batch form (rows are data points,
``c = l - 1`` the child layer, ``W = W^{(l-1)}``, ``a_l`` the prior mean from the layer above):

.. math::
    s = \sqrt{v_l},\quad S = s |W|^T,\quad
    D = \frac{1}{\sigma^2_l} + \frac{(S / \sigma^2_c) |W|}{s},\quad
    g = \frac{a_l - m_l}{\sigma^2_l} + \frac{m_c - m_l W^T - b_c}{\sigma^2_c} W,

    m_l \leftarrow m_l + \omega\, g / D, \qquad v_l \leftarrow 1/D \ \text{(rule "fm")}
    \ \text{or}\ 1/\Lambda_{jj} \ \text{(rule "exact")}.

``g`` is the ELBO gradient in ``m_l`` and ``D >= diag(Lambda_ll)`` is a separable curvature
that majorises the layer's true precision, so the step is a damped Jacobi step that cannot lower
the ELBO for ``omega`` in ``(0, 2)`` (the FM minoriser touches the ELBO at the current means).
On a forest ``D = diag(Lambda_ll)`` and the step is exactly CAVI.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from defbound.bound import elbo, fm_gap
from defbound.state import DEFParameters, Moments

VarianceRule = Literal["exact", "fm"]
Schedule = Literal["layerwise", "odd-even"]


def prior_mean(params: DEFParameters, moments: Moments, layer: int) -> Tensor:
    """Prior mean ``a_l`` of layer ``l`` under q: ``m_{l+1} W_l^T + b_l``, or ``b_L`` at the top."""
    if layer == params.depth:
        return params.biases[layer].expand_as(moments.means[layer])
    return moments.means[layer + 1] @ params.weights[layer].T + params.biases[layer]


def mean_gradient(params: DEFParameters, moments: Moments, layer: int) -> Tensor:
    r"""Gradient of the ELBO in the means of hidden layer ``l`` (``1 <= l <= L``), per row.

    .. math::
        g = \frac{a_l - m_l}{\sigma^2_l}
          + \Big(\frac{m_{l-1} - m_l W^T - b_{l-1}}{\sigma^2_{l-1}}\Big) W,
        \quad W = W^{(l-1)}.

    Returns:
        Tensor of shape ``(N, K_l)``.
    """
    W = params.weights[layer - 1]
    m = moments.means[layer]
    child_residual = moments.means[layer - 1] - m @ W.T - params.biases[layer - 1]
    own = (prior_mean(params, moments, layer) - m) / params.noise_vars[layer]
    return own + (child_residual / params.noise_vars[layer - 1]) @ W


def exact_precision_diagonal(params: DEFParameters, layer: int) -> Tensor:
    r"""Diagonal of the exact posterior precision of layer ``l``.

    .. math:: \Lambda_{jj} = 1/\sigma^2_{l,j} + \sum_k W_{kj}^2 / \sigma^2_{l-1,k}.

    It does not depend on the data or on any mean, so CAVI's optimal variances are ``1/Lambda_jj``.

    Returns:
        Tensor of shape ``(K_l,)``.
    """
    W = params.weights[layer - 1]
    return 1 / params.noise_vars[layer] + (1 / params.noise_vars[layer - 1]) @ (W**2)


def fm_curvature(params: DEFParameters, moments: Moments, layer: int) -> Tensor:
    r"""Separable FM curvature ``D`` of layer ``l`` at the current variances, per row.

    .. math::
        D_j = \frac{1}{\sigma^2_{l,j}} + \sum_k \frac{W_{kj}^2}{\pi^*_{kj}\sigma^2_{l-1,k}}
            = \frac{1}{\sigma^2_{l,j}}
            + \frac{1}{s_j}\sum_k |W_{kj}| \frac{\sum_{j'} |W_{kj'}| s_{j'}}{\sigma^2_{l-1,k}}.

    Standard deviations are floored at ``sqrt(tiny)`` so a zero variance cannot divide by zero.

    Returns:
        Tensor of shape ``(N, K_l)``; ``D_j >= Lambda_jj`` entrywise.
    """
    W_abs = params.weights[layer - 1].abs()
    tiny = torch.finfo(moments.variances[layer].dtype).tiny ** 0.5
    s = moments.variances[layer].sqrt().clamp_min(tiny)
    S = s @ W_abs.T
    return 1 / params.noise_vars[layer] + ((S / params.noise_vars[layer - 1]) @ W_abs) / s


def layer_update(
    params: DEFParameters,
    moments: Moments,
    layer: int,
    variance_rule: VarianceRule = "exact",
    omega: float = 1.0,
) -> Moments:
    """Update every variable of hidden layer ``l`` at once by the FM closed form.

    Args:
        params: DEF parameters.
        moments: current moments.
        layer: hidden layer ``1 <= l <= L``.
        variance_rule: ``"exact"`` sets ``v = 1/Lambda_jj`` (the mean-field ELBO optimum);
            ``"fm"`` sets ``v = 1/D``, the maximiser of the FM bound itself.
        omega: over-relaxation factor in ``(0, 2)`` for the mean step ``m + omega g / D``.

    Returns:
        New moments; only layer ``l`` changes.

    Raises:
        ValueError: for a layer outside ``1..L``, an unknown variance rule or ``omega`` outside
            ``(0, 2)``.
    """
    _check_update_args(params, layer, variance_rule, omega)
    D = fm_curvature(params, moments, layer)
    g = mean_gradient(params, moments, layer)
    mean = moments.means[layer] + omega * g / D
    if variance_rule == "fm":
        variance = 1 / D
    else:
        variance = (1 / exact_precision_diagonal(params, layer)).expand_as(mean).clone()
    return moments.replace_layer(layer, mean, variance)


def _check_update_args(params: DEFParameters, layer: int, variance_rule: str, omega: float) -> None:
    if not 1 <= layer <= params.depth:
        raise ValueError(f"layer must be a hidden layer in 1..{params.depth}, got {layer}")
    if variance_rule not in ("exact", "fm"):
        raise ValueError(f"variance_rule must be 'exact' or 'fm', got {variance_rule!r}")
    if not 0 < omega < 2:
        raise ValueError(f"omega must lie in (0, 2) for a guaranteed ascent, got {omega}")


def layer_order(depth: int, schedule: Schedule = "layerwise") -> list[int]:
    """Order of hidden layers in one sweep.

    ``"layerwise"`` goes bottom-up ``1, 2, ..., L``. ``"odd-even"`` updates all odd layers, then
    all even ones: layers two apart share no FM term, so each group could run in parallel.

    Raises:
        ValueError: for an unknown schedule.
    """
    if schedule == "layerwise":
        return list(range(1, depth + 1))
    if schedule == "odd-even":
        return list(range(1, depth + 1, 2)) + list(range(2, depth + 1, 2))
    raise ValueError(f"schedule must be 'layerwise' or 'odd-even', got {schedule!r}")


class SweepInfo(NamedTuple):
    """Diagnostics of one sweep (totals over rows).

    Attributes:
        elbo: exact ELBO after the sweep.
        bound: collapsed FM bound after the sweep.
        max_change: largest absolute change of any mean.
    """

    elbo: float
    bound: float
    max_change: float


def sweep_info(params: DEFParameters, moments: Moments, change: float) -> SweepInfo:
    """The sweep record: total ELBO, total FM bound and the largest mean change.

    The bound is taken as the ELBO minus :func:`defbound.bound.fm_gap`, so the ELBO is computed
    once; a non-finite change is recorded as ``inf``.
    """
    value = elbo(params, moments).sum()
    bound = value - fm_gap(params, moments).sum()
    if not math.isfinite(change):
        change = math.inf
    return SweepInfo(elbo=value.item(), bound=bound.item(), max_change=change)


@torch.no_grad()
def fm_sweep(
    params: DEFParameters,
    moments: Moments,
    variance_rule: VarianceRule = "exact",
    omega: float = 1.0,
    schedule: Schedule = "layerwise",
) -> tuple[Moments, SweepInfo]:
    """One FM sweep: :func:`layer_update` on every hidden layer in schedule order.

    Args:
        params: DEF parameters.
        moments: current moments.
        variance_rule: see :func:`layer_update`.
        omega: see :func:`layer_update`.
        schedule: see :func:`layer_order`.

    Returns:
        ``(new_moments, info)``.
    """
    change = 0.0
    for layer in layer_order(params.depth, schedule):
        new = layer_update(params, moments, layer, variance_rule, omega)
        delta = (new.means[layer] - moments.means[layer]).abs().max().item()
        change = max(change, delta)
        moments = new
    return moments, sweep_info(params, moments, change)
