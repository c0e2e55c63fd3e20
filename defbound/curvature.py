r"""Second-order utilities shared by the bound code and by `nas`: curvature products and solves.

Conventions used throughout the module:

* A model maps a batch of inputs ``x`` of shape ``(n, ...)`` to outputs ``f`` of shape ``(n, o)``.
  Examples are independent: no batch norm or dropout in training mode (call ``model.eval()``).
* Two losses are supported, both written per example:

  * ``"mse"``: :math:`\ell_i = \tfrac12 \lVert f_i - y_i \rVert^2`, so the Hessian of the
    loss with respect to the output is :math:`\Lambda_i = I`;
  * ``"cross_entropy"``: :math:`\ell_i = -\log \mathrm{softmax}(f_i)_{y_i}` with integer class
    targets, so :math:`\Lambda_i = \mathrm{diag}(p_i) - p_i p_i^\top`, :math:`p_i =
    \mathrm{softmax}(f_i)`.

* The total loss is :math:`L = \tfrac1n \sum_i \ell_i` (``reduction="mean"``) or
  :math:`\sum_i \ell_i` (``reduction="sum"``).
* Parameters :math:`\theta` are a name-to-tensor mapping (by default every trainable parameter of
  the model, in ``named_parameters`` order). Curvature products take and return *flat* vectors of
  length ``P = sum(numel)`` in that order; `flatten_tensors` and `unflatten_vector` convert.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn import functional

logger = logging.getLogger(__name__)

Loss = Literal["mse", "cross_entropy"]
Reduction = Literal["mean", "sum"]

_LOSSES = ("mse", "cross_entropy")
_REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------------------------
# Validation helpers


def _check_loss(loss: str) -> None:
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_damping(damping: float) -> None:
    if not math.isfinite(float(damping)) or float(damping) < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")


def _check_outputs(outputs: Tensor) -> None:
    if outputs.ndim != 2:
        raise ValueError(
            f"outputs must have shape (n, o), got shape {tuple(outputs.shape)}; "
            "flatten the model output to two dimensions"
        )


def _check_targets(outputs: Tensor, targets: Tensor, loss: str) -> None:
    _check_outputs(outputs)
    if loss == "mse":
        if targets.shape != outputs.shape:
            raise ValueError(
                f"mse targets must have the output shape {tuple(outputs.shape)}, "
                f"got {tuple(targets.shape)}"
            )
    else:
        if targets.shape != outputs.shape[:1] or targets.is_floating_point():
            raise ValueError(
                "cross_entropy targets must be integer class indices of shape "
                f"({outputs.shape[0]},), got {targets.dtype} of shape {tuple(targets.shape)}"
            )


def _check_independent_examples(model: nn.Module) -> None:
    for name, module in model.named_modules():
        stochastic = isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Dropout)
        if stochastic and module.training:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is in training mode, which couples "
                "examples (or makes the output random); call model.eval() before computing "
                "curvature"
            )


def _scale(n: int, reduction: str) -> float:
    _check_reduction(reduction)
    return 1.0 / n if reduction == "mean" else 1.0


# ------------------------------------------------------------------------------------------------
# Parameters as flat vectors


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Return the trainable parameters of ``model`` as detached tensors, keyed by name.

    Args:
        model: Any module.

    Returns:
        ``{name: parameter.detach()}`` for every parameter with ``requires_grad``, in
        ``named_parameters`` order.
    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def flatten_tensors(tensors: Mapping[str, Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector.

    Args:
        tensors: Mapping of tensors with any shapes.

    Returns:
        Vector of shape ``(sum(t.numel()),)`` in the mapping's order.
    """
    if not tensors:
        raise ValueError("cannot flatten an empty mapping of tensors")
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten_vector(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (inverse of `flatten_tensors`).

    Args:
        vector: Shape ``(P,)`` with ``P = sum(t.numel() for t in like.values())``.
        like: Mapping giving the names, order and shapes.

    Returns:
        ``{name: piece}`` with ``piece.shape == like[name].shape``.

    Raises:
        ValueError: If ``vector`` is not one-dimensional of length ``P``.
    """
    total = sum(t.numel() for t in like.values())
    if vector.ndim != 1 or vector.numel() != total:
        raise ValueError(f"vector must have shape ({total},), got {tuple(vector.shape)}")
    pieces = torch.split(vector, [t.numel() for t in like.values()])
    return {
        name: piece.reshape(t.shape) for (name, t), piece in zip(like.items(), pieces, strict=True)
    }


def _resolve_params(model: nn.Module, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    _check_independent_examples(model)
    resolved = trainable_parameters(model) if params is None else dict(params)
    if not resolved:
        raise ValueError("no parameters to differentiate: the model has no trainable parameters")
    known = dict(model.named_parameters())
    unknown = [name for name in resolved if name not in known]
    if unknown:
        raise ValueError(f"parameter names {unknown} are not parameters of the model")
    return resolved


def _as_tangent(vector: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    first = next(iter(params.values()))
    vector = vector.to(dtype=first.dtype, device=first.device)
    return unflatten_vector(vector, params)


def _batch_function(
    model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor
) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    names = tuple(params)

    def forward(*values: Tensor) -> Tensor:
        outputs = functional_call(model, dict(zip(names, values, strict=True)), (inputs,))
        _check_outputs(outputs)
        return outputs

    return forward, tuple(params.values())


# ------------------------------------------------------------------------------------------------
# Losses and their output-space Hessians


def per_example_loss(outputs: Tensor, targets: Tensor, loss: Loss) -> Tensor:
    r"""Per-example loss values.

    ``"mse"``: :math:`\ell_i = \tfrac12 \sum_k (f_{ik} - y_{ik})^2`;
    ``"cross_entropy"``: :math:`\ell_i = \log \sum_k e^{f_{ik}} - f_{i y_i}`.

    Args:
        outputs: Model outputs ``f``, shape ``(n, o)``.
        targets: ``(n, o)`` for ``"mse"``; integer classes ``(n,)`` for ``"cross_entropy"``.
        loss: ``"mse"`` or ``"cross_entropy"``.

    Returns:
        Loss values, shape ``(n,)``.

    Raises:
        ValueError: On an unknown loss or mismatched shapes.
    """
    _check_loss(loss)
    _check_targets(outputs, targets, loss)
    if loss == "mse":
        return 0.5 * (outputs - targets).pow(2).sum(dim=1)
    return functional.cross_entropy(outputs, targets, reduction="none")


def loss_hessian(outputs: Tensor, loss: Loss) -> Tensor:
    r"""Hessian :math:`\Lambda_i = \partial^2 \ell_i / \partial f_i^2` for every example.

    ``"mse"``: :math:`\Lambda_i = I`; ``"cross_entropy"``: :math:`\Lambda_i =
    \mathrm{diag}(p_i) - p_i p_i^\top` with :math:`p_i = \mathrm{softmax}(f_i)`. Neither
    depends on the targets.

    Args:
        outputs: Model outputs, shape ``(n, o)``.
        loss: ``"mse"`` or ``"cross_entropy"``.

    Returns:
        Shape ``(n, o, o)``.
    """
    _check_loss(loss)
    _check_outputs(outputs)
    n, o = outputs.shape
    if loss == "mse":
        eye = torch.eye(o, dtype=outputs.dtype, device=outputs.device)
        return eye.expand(n, o, o).clone()
    p = outputs.softmax(dim=1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def loss_hessian_sqrt(outputs: Tensor, loss: Loss) -> Tensor:
    r"""Square-root factor :math:`S_i` with :math:`S_i S_i^\top = \Lambda_i` (`loss_hessian`).

    ``"mse"``: :math:`S_i = I`. ``"cross_entropy"``: :math:`S_i = \mathrm{diag}(\sqrt{p_i}) -
    p_i \sqrt{p_i}^\top`; expanding and using :math:`\sum_k p_{ik} = 1` gives
    :math:`S_i S_i^\top = \mathrm{diag}(p_i) - p_i p_i^\top`.

    Args:
        outputs: Model outputs, shape ``(n, o)``.
        loss: ``"mse"`` or ``"cross_entropy"``.

    Returns:
        Shape ``(n, o, o)``.
    """
    _check_loss(loss)
    _check_outputs(outputs)
    n, o = outputs.shape
    if loss == "mse":
        eye = torch.eye(o, dtype=outputs.dtype, device=outputs.device)
        return eye.expand(n, o, o).clone()
    p = outputs.softmax(dim=1)
    root = p.sqrt()
    return torch.diag_embed(root) - p.unsqueeze(2) * root.unsqueeze(1)


def loss_hessian_vector_product(outputs: Tensor, vectors: Tensor, loss: Loss) -> Tensor:
    r"""Apply :math:`\Lambda_i` to one output-space vector per example, without forming it.

    ``"mse"``: :math:`\Lambda_i u_i = u_i`; ``"cross_entropy"``: :math:`\Lambda_i u_i = p_i
    \odot u_i - p_i (p_i^\top u_i)`.

    Args:
        outputs: Model outputs, shape ``(n, o)``.
        vectors: ``u``, shape ``(n, o)``.
        loss: ``"mse"`` or ``"cross_entropy"``.

    Returns:
        :math:`(\Lambda_i u_i)_i`, shape ``(n, o)``.
    """
    _check_loss(loss)
    _check_outputs(outputs)
    if vectors.shape != outputs.shape:
        raise ValueError(
            f"vectors must have the output shape {tuple(outputs.shape)}, got {tuple(vectors.shape)}"
        )
    if loss == "mse":
        return vectors.clone()
    p = outputs.softmax(dim=1)
    return p * vectors - p * (p * vectors).sum(dim=1, keepdim=True)


def output_gradients(outputs: Tensor, targets: Tensor, loss: Loss) -> Tensor:
    r"""Residuals :math:`r_i = \partial \ell_i / \partial f_i`, shape ``(n, o)``, by autograd.

    Args:
        outputs: Model outputs, shape ``(n, o)`` (detached internally).
        targets: Targets as for `per_example_loss`.
        loss: ``"mse"`` or ``"cross_entropy"``.

    Returns:
        Shape ``(n, o)``.
    """
    outputs = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        total = per_example_loss(outputs, targets, loss).sum()
        (residuals,) = torch.autograd.grad(total, outputs)
    return residuals


def _sample_targets(
    outputs: Tensor, loss: Loss, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Targets drawn from the model's predictive distribution, shape ``(num_samples, n, ...)``."""
    outputs = outputs.detach()
    if loss == "mse":
        noise = torch.randn(
            (num_samples, *outputs.shape),
            generator=generator,
            dtype=outputs.dtype,
            device=outputs.device,
        )
        return outputs.unsqueeze(0) + noise
    p = outputs.softmax(dim=1)
    draws = torch.multinomial(p, num_samples, replacement=True, generator=generator)
    return draws.T.contiguous()


# ------------------------------------------------------------------------------------------------
# Per-example quantities


def per_example_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: Loss,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""Gradients of each example's loss, :math:`\nabla_\theta \ell_i`, by ``vmap(grad(.))``.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        inputs: Shape ``(n, ...)``.
        targets: ``(n, o)`` for ``"mse"``, integer ``(n,)`` for ``"cross_entropy"``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        params: Parameters to differentiate (default: all trainable ones).

    Returns:
        ``{name: g}`` with ``g`` of shape ``(n, *param.shape)``.
    """
    _check_loss(loss)
    if len(targets) != len(inputs):
        raise ValueError(f"got {len(inputs)} inputs but {len(targets)} targets")
    params = _resolve_params(model, params)

    def example_loss(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        outputs = functional_call(model, theta, (x.unsqueeze(0),))
        return per_example_loss(outputs, y.unsqueeze(0), loss).sum()

    return vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)


def per_example_jacobians(
    model: nn.Module, inputs: Tensor, params: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    r"""Jacobians :math:`J_i = \partial f_i / \partial \theta` of each example's output.

    Computed by ``vmap(jacrev(.))`` over examples, so the cost is ``o`` backward passes per
    example.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        inputs: Shape ``(n, ...)``.
        params: Parameters to differentiate (default: all trainable ones).

    Returns:
        ``{name: J}`` with ``J`` of shape ``(n, o, *param.shape)``.
    """
    params = _resolve_params(model, params)

    def example_output(theta: dict[str, Tensor], x: Tensor) -> Tensor:
        outputs = functional_call(model, theta, (x.unsqueeze(0),))
        _check_outputs(outputs)
        return outputs.squeeze(0)

    return vmap(jacrev(example_output), in_dims=(None, 0))(params, inputs)


def _flat_jacobians(jacobians: Mapping[str, Tensor]) -> Tensor:
    """Concatenate ``{name: (n, o, *shape)}`` into ``(n, o, P)``."""
    return torch.cat([j.flatten(start_dim=2) for j in jacobians.values()], dim=2)


# ------------------------------------------------------------------------------------------------
# Matrix-free curvature products


def ggn_vector_product(
    model: nn.Module,
    inputs: Tensor,
    vector: Tensor,
    loss: Loss,
    params: Mapping[str, Tensor] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Generalized Gauss-Newton matrix times a vector, without forming any matrix.

    .. math::
        G v = c \sum_i J_i^\top \Lambda_i J_i v,\quad c = 1/n \text{ (mean) or } 1 \text{ (sum)}

    computed as one JVP (:math:`u = J v`), the output-space product :math:`\Lambda_i u_i` and
    one VJP. :math:`\Lambda_i` is given in `loss_hessian`; it does not depend on the targets.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        inputs: Shape ``(n, ...)``.
        vector: ``v``, shape ``(P,)`` in the order of ``params``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        params: Parameters (default: all trainable ones).
        reduction: ``"mean"`` or ``"sum"`` over examples.

    Returns:
        :math:`G v`, shape ``(P,)``.
    """
    _check_loss(loss)
    _check_reduction(reduction)
    params = _resolve_params(model, params)
    forward, primals = _batch_function(model, params, inputs)
    tangents = tuple(_as_tangent(vector, params).values())

    outputs, jv = jvp(forward, primals, tangents)
    cotangent = loss_hessian_vector_product(outputs, jv, loss) * _scale(len(inputs), reduction)

    _, pullback = vjp(forward, *primals)
    return flatten_tensors(dict(zip(params, pullback(cotangent), strict=True)))


def empirical_fisher_vector_product(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    vector: Tensor,
    loss: Loss,
    params: Mapping[str, Tensor] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Empirical Fisher matrix times a vector.

    .. math::
        F_{\mathrm{emp}} v = c \sum_i g_i (g_i^\top v),\qquad g_i = \nabla_\theta \ell_i

    computed as one JVP of the per-example losses (:math:`u_i = g_i^\top v`) and one VJP with
    cotangent :math:`c\,u`.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        inputs: Shape ``(n, ...)``.
        targets: Observed targets (see `per_example_loss`).
        vector: ``v``, shape ``(P,)``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        params: Parameters (default: all trainable ones).
        reduction: ``"mean"`` or ``"sum"`` over examples.

    Returns:
        :math:`F_{\mathrm{emp}} v`, shape ``(P,)``.
    """
    _check_loss(loss)
    _check_reduction(reduction)
    params = _resolve_params(model, params)
    forward, primals = _batch_function(model, params, inputs)

    def losses(*values: Tensor) -> Tensor:
        return per_example_loss(forward(*values), targets, loss)

    tangents = tuple(_as_tangent(vector, params).values())
    _, directional = jvp(losses, primals, tangents)

    _, pullback = vjp(losses, *primals)
    product = pullback(directional * _scale(len(inputs), reduction))
    return flatten_tensors(dict(zip(params, product, strict=True)))


def true_fisher_vector_product(
    model: nn.Module,
    inputs: Tensor,
    vector: Tensor,
    loss: Loss,
    params: Mapping[str, Tensor] | None = None,
    reduction: Reduction = "mean",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Fisher matrix of the model's own predictive distribution times a vector.

    .. math::
        F v = c \sum_i J_i^\top \, \mathbb{E}_{y \sim p(\cdot \mid f_i)}
        [r_{iy} r_{iy}^\top] \, J_i v,\qquad r_{iy} = \partial \ell(f_i, y) / \partial f_i

    The predictive distribution is the categorical :math:`\mathrm{softmax}(f_i)` for
    ``"cross_entropy"`` and :math:`\mathcal N(f_i, I)` for ``"mse"``. With ``num_samples=None``
    the expectation is exact: a sum over all classes for cross-entropy, the identity for MSE. For
    these two losses the exact true Fisher equals the GGN (`ggn_vector_product`); the
    Monte-Carlo version (``num_samples`` targets per example) is the usual cheap estimate.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        inputs: Shape ``(n, ...)``.
        vector: ``v``, shape ``(P,)``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        params: Parameters (default: all trainable ones).
        reduction: ``"mean"`` or ``"sum"`` over examples.
        num_samples: ``None`` for the exact expectation, else the number of sampled targets.
        generator: Random generator for the sampled targets, on the outputs' device.

    Returns:
        :math:`F v`, shape ``(P,)``.
    """
    _check_loss(loss)
    _check_reduction(reduction)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be None or >= 1, got {num_samples}")
    params = _resolve_params(model, params)
    forward, primals = _batch_function(model, params, inputs)
    tangents = tuple(_as_tangent(vector, params).values())
    outputs, jv = jvp(forward, primals, tangents)
    outputs = outputs.detach()

    if num_samples is None and loss == "mse":
        projected = jv
    elif num_samples is None:
        n, o = outputs.shape
        classes = torch.arange(o, device=outputs.device)
        residuals = torch.stack(
            [output_gradients(outputs, classes[c].expand(n), loss) for c in range(o)]
        )
        weights = outputs.softmax(dim=1).T
        projected = torch.einsum("cn,cno,cn->no", weights, residuals, (residuals * jv).sum(2))
    else:
        sampled = _sample_targets(outputs, loss, num_samples, generator)
        residuals = torch.stack([output_gradients(outputs, y, loss) for y in sampled])
        projected = torch.einsum("sno,sn->no", residuals, (residuals * jv).sum(2)) / num_samples

    _, pullback = vjp(forward, *primals)
    product = pullback(projected * _scale(len(inputs), reduction))
    return flatten_tensors(dict(zip(params, product, strict=True)))


# ------------------------------------------------------------------------------------------------
# Diagonal estimates


def diagonal_ggn(
    model: nn.Module,
    inputs: Tensor,
    loss: Loss,
    params: Mapping[str, Tensor] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Exact diagonal of the GGN from per-example Jacobians.

    .. math::
        \mathrm{diag}(G)_j = c \sum_i \sum_k \big( (S_i^\top J_i)_{kj} \big)^2

    with :math:`S_i S_i^\top = \Lambda_i` (`loss_hessian_sqrt`). Costs ``o`` backward passes per
    example and ``n * o * P`` memory: meant for small models or few parameters.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        inputs: Shape ``(n, ...)``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        params: Parameters (default: all trainable ones).
        reduction: ``"mean"`` or ``"sum"`` over examples.

    Returns:
        Shape ``(P,)``.
    """
    _check_loss(loss)
    _check_reduction(reduction)
    params = _resolve_params(model, params)
    jacobians = _flat_jacobians(per_example_jacobians(model, inputs, params))
    with torch.no_grad():
        outputs = functional_call(model, params, (inputs,))
    root = loss_hessian_sqrt(outputs, loss)
    rotated = torch.einsum("nok,nop->nkp", root, jacobians)
    return rotated.pow(2).sum(dim=(0, 1)) * _scale(len(inputs), reduction)


def diagonal_fisher(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    loss: Loss,
    kind: Literal["empirical", "true"] = "empirical",
    num_samples: int = 1,
    params: Mapping[str, Tensor] | None = None,
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Diagonal of the empirical Fisher, or a Monte-Carlo estimate of the true Fisher's diagonal.

    .. math::
        \mathrm{empirical:}\ c \sum_i g_i \odot g_i,\qquad
        \mathrm{true:}\ \frac{c}{S} \sum_i \sum_{s=1}^{S} \tilde g_{is} \odot \tilde g_{is}

    where :math:`g_i` uses the observed target and :math:`\tilde g_{is}` a target drawn from the
    model's predictive distribution (see `true_fisher_vector_product`). The exact diagonal of the
    true Fisher is `diagonal_ggn` for both supported losses.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        inputs: Shape ``(n, ...)``.
        targets: Observed targets; required for ``kind="empirical"``, ignored otherwise.
        loss: ``"mse"`` or ``"cross_entropy"``.
        kind: ``"empirical"`` or ``"true"``.
        num_samples: Sampled targets per example for ``kind="true"``.
        params: Parameters (default: all trainable ones).
        reduction: ``"mean"`` or ``"sum"`` over examples.
        generator: Random generator for the sampled targets, on the outputs' device.

    Returns:
        Shape ``(P,)``.
    """
    _check_loss(loss)
    scale = _scale(len(inputs), reduction)
    params = _resolve_params(model, params)
    if kind == "empirical":
        if targets is None:
            raise ValueError("kind='empirical' needs the observed targets")
        grads = per_example_gradients(model, inputs, targets, loss, params)
        return torch.cat([g.flatten(start_dim=1).pow(2).sum(0) for g in grads.values()]) * scale
    if kind != "true":
        raise ValueError(f"kind must be 'empirical' or 'true', got {kind!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    with torch.no_grad():
        outputs = functional_call(model, params, (inputs,))
    _check_outputs(outputs)
    sampled = _sample_targets(outputs, loss, num_samples, generator)
    repeated = inputs.unsqueeze(0).expand(num_samples, *inputs.shape).flatten(end_dim=1)
    grads = per_example_gradients(model, repeated, sampled.flatten(end_dim=1), loss, params)
    diagonal = torch.cat([g.flatten(start_dim=1).pow(2).sum(0) for g in grads.values()])
    return diagonal * scale / num_samples


# ------------------------------------------------------------------------------------------------
# Hook-based layer statistics


@dataclass(frozen=True)
class LayerStatistics:
    r"""Second moments of one layer's input ``h`` and back-propagated output gradient ``g``.

    For a linear layer :math:`u = W h` (conv: ``h`` is an unfolded input patch at one of ``L``
    output positions) and per-example gradients :math:`g_{il} = \partial \ell_i / \partial
    u_{il}`:

    .. math::
        \Sigma_h = \tfrac1n \sum_i \sum_l h_{il} h_{il}^\top,\quad
        \Sigma_g = \tfrac1n \sum_i \sum_l g_{il} g_{il}^\top,\quad
        C = \tfrac1n \sum_i \sum_l h_{il} g_{il}^\top

    Positions are summed, examples averaged; then :math:`C^\top` is the gradient of the mean
    loss with respect to the weight matrix (conv: reshaped to ``(C_out, C_in * kh * kw)``).

    Attributes:
        input_covariance: :math:`\Sigma_h`, shape ``(p, p)``.
        gradient_covariance: :math:`\Sigma_g`, shape ``(q, q)``.
        cross_covariance: :math:`C`, shape ``(p, q)``.
        num_examples: ``n``.
        num_positions: ``L`` (1 for linear layers).
    """

    input_covariance: Tensor
    gradient_covariance: Tensor
    cross_covariance: Tensor
    num_examples: int
    num_positions: int

    def kronecker_factors(self) -> tuple[Tensor, Tensor]:
        r"""K-FAC factors ``(A, G)`` with :math:`F_W \approx A \otimes G`.

        :math:`A = \Sigma_h` and :math:`G = \Sigma_g / L`. With column-stacked
        :math:`\mathrm{vec}(W)` the Fisher of the weights is approximated by
        :math:`A \otimes G`; for PyTorch's row-major ``W.flatten()`` it is :math:`G \otimes A`.
        For a linear layer with a single example the approximation is exact.

        Returns:
            ``(A, G)`` with shapes ``(p, p)`` and ``(q, q)``.
        """
        return self.input_covariance, self.gradient_covariance / self.num_positions


def _layer_inputs(module: nn.Module, inputs: Tensor) -> Tensor:
    """Layer input as ``(n, L, p)`` rows (conv: unfolded patches)."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    patches = functional.unfold(
        inputs,
        kernel_size=module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )
    return patches.transpose(1, 2)


def _layer_gradients(module: nn.Module, gradients: Tensor) -> Tensor:
    """Output gradient as ``(n, L, q)`` rows."""
    if isinstance(module, nn.Linear):
        return gradients.reshape(gradients.shape[0], -1, gradients.shape[-1])
    return gradients.flatten(start_dim=2).transpose(1, 2)


def _check_collectable(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        return
    if not isinstance(module, nn.Conv2d):
        raise ValueError(
            f"module {name!r} is a {type(module).__name__}; statistics are collected for "
            "nn.Linear and nn.Conv2d only"
        )
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(
            f"conv module {name!r} needs groups=1, padding_mode='zeros' and integer padding, "
            f"got groups={module.groups}, padding_mode={module.padding_mode!r}, "
            f"padding={module.padding!r}"
        )


@dataclass
class _Accumulator:
    input_sum: Tensor | None = None
    gradient_sum: Tensor | None = None
    cross_sum: Tensor | None = None
    num_examples: int = 0
    num_positions: int = 0
    samples: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class StatisticsCollector:
    r"""Accumulate `LayerStatistics` for chosen ``nn.Linear`` / ``nn.Conv2d`` layers via hooks.

    A forward hook records each layer's input; a hook on the layer's output tensor receives the
    back-propagated gradient and adds :math:`\sum h h^\top`, :math:`\sum g g^\top` and
    :math:`\sum h g^\top` to running sums (in ``dtype``). `statistics` divides by the number
    of examples once, so statistics accumulated over minibatches equal those of the full batch.

    For per-example gradients :math:`g_i = \partial \ell_i / \partial u_i`, back-propagate the
    *sum* of per-example losses (`collect_statistics` does this). Forward passes that are not
    followed by a backward pass through the layer are not counted. Examples must be independent
    (no batch norm in training mode).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> with StatisticsCollector({"hidden": net[0]}) as collector:
        ...     net(torch.randn(5, 3)).pow(2).sum().backward()
        >>> collector.statistics()["hidden"].cross_covariance.shape
        torch.Size([3, 4])

    Args:
        modules: ``{name: layer}``; each an ``nn.Linear`` or an ``nn.Conv2d`` with ``groups=1``
            and integer zero padding.
        homogeneous: Append a constant 1 to ``h`` (for layers with a bias, so that the bias is
            covered by the statistics).
        dtype: Accumulation dtype (default float64).
        keep_samples: Also keep every ``(h, g)`` pair, shapes ``(n, L, p)`` and ``(n, L, q)``.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        homogeneous: bool = False,
        dtype: torch.dtype = torch.float64,
        keep_samples: bool = False,
    ) -> None:
        if not modules:
            raise ValueError("modules must name at least one layer")
        for name, module in modules.items():
            _check_collectable(name, module)
        self.modules = dict(modules)
        self.homogeneous = homogeneous
        self.dtype = dtype
        self.keep_samples = keep_samples
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sums = {name: _Accumulator() for name in self.modules}

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def detach(self) -> None:
        """Remove the hooks; accumulated sums are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget all accumulated sums and samples."""
        self._sums = {name: _Accumulator() for name in self.modules}

    def __enter__(self) -> StatisticsCollector:
        self.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not output.requires_grad:
                logger.debug("layer %s: output needs no gradient, forward pass not counted", name)
                return
            rows = _layer_inputs(module, args[0].detach()).to(self.dtype)
            if self.homogeneous:
                rows = torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1)
            output.register_hook(self._gradient_hook(name, module, rows))

        return hook

    def _gradient_hook(self, name: str, module: nn.Module, rows: Tensor) -> Callable[..., None]:
        def hook(gradient: Tensor) -> None:
            grads = _layer_gradients(module, gradient.detach()).to(self.dtype)
            acc = self._sums[name]
            flat_h, flat_g = rows.flatten(end_dim=1), grads.flatten(end_dim=1)
            terms = (flat_h.T @ flat_h, flat_g.T @ flat_g, flat_h.T @ flat_g)
            if acc.input_sum is None:
                acc.input_sum, acc.gradient_sum, acc.cross_sum = terms
                acc.num_positions = rows.shape[1]
            elif acc.num_positions != rows.shape[1]:
                raise RuntimeError(
                    f"layer {name!r} saw {rows.shape[1]} output positions, earlier batches "
                    f"{acc.num_positions}; collect inputs of one spatial size per collector"
                )
            else:
                acc.input_sum += terms[0]
                acc.gradient_sum += terms[1]
                acc.cross_sum += terms[2]
            acc.num_examples += rows.shape[0]
            if self.keep_samples:
                acc.samples.append((rows, grads))

        return hook

    def statistics(self) -> dict[str, LayerStatistics]:
        """Divide the accumulated sums by the number of examples.

        Returns:
            ``{name: LayerStatistics}``.

        Raises:
            RuntimeError: If a layer has seen no backward pass yet.
        """
        result = {}
        for name, acc in self._sums.items():
            if acc.num_examples == 0:
                raise RuntimeError(f"layer {name!r} has no statistics: run forward and backward")
            n = acc.num_examples
            result[name] = LayerStatistics(
                input_covariance=acc.input_sum / n,
                gradient_covariance=acc.gradient_sum / n,
                cross_covariance=acc.cross_sum / n,
                num_examples=n,
                num_positions=acc.num_positions,
            )
        return result

    def samples(self, name: str) -> tuple[Tensor, Tensor]:
        """All recorded ``(h, g)`` of one layer, concatenated over passes.

        Args:
            name: A key of ``modules``.

        Returns:
            ``(h, g)`` with shapes ``(n, L, p)`` and ``(n, L, q)``.

        Raises:
            ValueError: If the collector was built without ``keep_samples``, or ``name`` is
                unknown.
        """
        if not self.keep_samples:
            raise ValueError("samples are only kept with keep_samples=True")
        if name not in self._sums:
            raise ValueError(f"unknown layer {name!r}; known: {sorted(self._sums)}")
        pairs = self._sums[name].samples
        if not pairs:
            raise RuntimeError(f"layer {name!r} has no samples: run forward and backward")
        return torch.cat([h for h, _ in pairs]), torch.cat([g for _, g in pairs])


def collect_statistics(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    loss: Loss,
    *,
    homogeneous: bool = False,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LayerStatistics]:
    r"""One pass over ``batches`` collecting `LayerStatistics` with observed targets.

    For each batch the sum of per-example losses is differentiated, so the recorded ``g`` are
    per-example gradients :math:`\partial \ell_i / \partial u_i`. The gradient is taken with
    respect to the layers' weights (so the output hooks fire even when an in-place activation
    follows the layer); no parameter is updated and no ``.grad`` is written.

    Args:
        model: Module mapping ``(n, ...)`` inputs to ``(n, o)`` outputs; evaluation mode.
        modules: Layers of ``model`` to collect, see `StatisticsCollector`.
        batches: Iterable of ``(inputs, targets)``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        homogeneous: Append a constant 1 to the inputs ``h``.
        dtype: Accumulation dtype.

    Returns:
        ``{name: LayerStatistics}``.
    """
    _check_loss(loss)
    _check_independent_examples(model)
    weights = [module.weight for module in modules.values()]
    if not all(weight.requires_grad for weight in weights):
        raise ValueError("every collected layer needs a weight with requires_grad=True")

    collector = StatisticsCollector(modules, homogeneous=homogeneous, dtype=dtype)
    with collector, torch.enable_grad():
        for inputs, targets in batches:
            total = per_example_loss(model(inputs), targets, loss).sum()
            torch.autograd.grad(total, weights)
    return collector.statistics()


# ------------------------------------------------------------------------------------------------
# Solves


def _check_square(matrix: Tensor, name: str) -> int:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square matrix (d, d), got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return matrix.shape[0]


def _damped_matrix(matrix: Tensor, damping: float, damping_matrix: Tensor | None) -> Tensor:
    d = _check_square(matrix, "matrix")
    _check_damping(damping)
    a = matrix.to(torch.float64)
    a = 0.5 * (a + a.T)
    if damping_matrix is None:
        return a + damping * torch.eye(d, dtype=a.dtype, device=a.device)
    if _check_square(damping_matrix, "damping_matrix") != d:
        raise ValueError(
            f"damping_matrix must have shape ({d}, {d}), got {tuple(damping_matrix.shape)}"
        )
    extra = damping_matrix.to(torch.float64)
    return a + damping * 0.5 * (extra + extra.T)


def damped_solve(
    matrix: Tensor,
    rhs: Tensor,
    damping: float = 0.0,
    damping_matrix: Tensor | None = None,
) -> Tensor:
    r"""Solve :math:`(C + \lambda D) x = b` in float64 for symmetric positive semi-definite ``C``.

    ``C`` (and ``D``) are symmetrized as :math:`(C + C^\top)/2`. A Cholesky factorization is
    tried first; if the damped matrix is not numerically positive definite (singular ``C`` with
    :math:`\lambda = 0`, or an indefinite ``C``), the pseudo-inverse solution
    :math:`x = (C + \lambda D)^+ b` is returned instead and a warning is logged.

    Args:
        matrix: ``C``, shape ``(d, d)``.
        rhs: ``b``, shape ``(d,)`` or ``(d, k)``.
        damping: :math:`\lambda \ge 0`.
        damping_matrix: ``D``, shape ``(d, d)`` (default: the identity).

    Returns:
        ``x`` with the shape of ``rhs``, in ``rhs``'s dtype.

    Raises:
        ValueError: On non-square or non-finite matrices, mismatched shapes or negative damping.
    """
    a = _damped_matrix(matrix, damping, damping_matrix)
    d = a.shape[0]
    if rhs.ndim not in (1, 2) or rhs.shape[0] != d:
        raise ValueError(f"rhs must have shape ({d},) or ({d}, k), got {tuple(rhs.shape)}")
    b = rhs.to(torch.float64)
    b2 = b.unsqueeze(1) if b.ndim == 1 else b

    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(b2, factor)
    else:
        logger.warning(
            "damped matrix (d=%d, damping=%g) is not positive definite; using the pseudo-inverse",
            d,
            damping,
        )
        x = torch.linalg.pinv(a, hermitian=True) @ b2
    return x.reshape(b.shape).to(rhs.dtype)


def generalized_eigh(a: Tensor, b: Tensor, damping: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""Solve the symmetric-definite generalized eigenproblem :math:`A v = \mu (B + \lambda I) v`.

    With the Cholesky factor :math:`B + \lambda I = L L^\top`, the problem becomes the standard
    one :math:`L^{-1} A L^{-\top} w = \mu w`, :math:`v = L^{-\top} w`. If :math:`B + \lambda I`
    is not positive definite, the problem is restricted to the range of ``B``: with
    :math:`B = U \mathrm{diag}(s) U^\top` and the ``r`` eigenvalues :math:`s_j` above
    :math:`d \cdot \epsilon \cdot \max s`, :math:`W = U_r \mathrm{diag}(s_r)^{-1/2}` and
    :math:`v = W w` for the eigenvectors ``w`` of :math:`W^\top A W`. Computed in float64.

    Args:
        a: Symmetric ``A``, shape ``(d, d)``.
        b: Symmetric positive semi-definite ``B``, shape ``(d, d)``.
        damping: :math:`\lambda \ge 0` added to the diagonal of ``B``.

    Returns:
        ``(mu, V)``: eigenvalues in descending order, shape ``(r,)``, and eigenvectors as
        columns, shape ``(d, r)``, normalized to :math:`V^\top (B + \lambda I) V = I`;
        ``r = d`` unless the fallback is used. In ``a``'s dtype.

    Raises:
        ValueError: On non-square, mismatched or non-finite inputs, or negative damping.
    """
    d = _check_square(a, "a")
    if _check_square(b, "b") != d:
        raise ValueError(f"b must have the shape of a, ({d}, {d}), got {tuple(b.shape)}")
    a64 = a.to(torch.float64)
    a64 = 0.5 * (a64 + a64.T)
    b64 = _damped_matrix(b, damping, None)

    factor, info = torch.linalg.cholesky_ex(b64)
    if int(info) == 0:
        eye = torch.eye(d, dtype=torch.float64, device=a.device)
        whitening = torch.linalg.solve_triangular(factor, eye, upper=False).T
    else:
        logger.warning("B + damping*I is not positive definite; restricting to the range of B")
        s, u = torch.linalg.eigh(b64)
        keep = s > d * torch.finfo(torch.float64).eps * s.abs().max()
        whitening = u[:, keep] / s[keep].sqrt()

    reduced = whitening.T @ a64 @ whitening
    mu, w = torch.linalg.eigh(0.5 * (reduced + reduced.T))
    order = torch.argsort(mu, descending=True)
    return mu[order].to(a.dtype), (whitening @ w[:, order]).to(a.dtype)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int | None = None,
) -> tuple[Tensor, int]:
    r"""Solve :math:`M x = b` for symmetric positive definite ``M`` given only :math:`v \mapsto Mv`.

    Stops when :math:`\lVert b - M x \rVert \le \mathrm{tol} \cdot \lVert b \rVert`.

    Args:
        matvec: The product with ``M``, mapping ``(d,)`` to ``(d,)``.
        rhs: ``b``, shape ``(d,)``.
        tol: Relative residual tolerance.
        max_iter: Iteration limit (default ``2 d``); a warning is issued when it is reached.

    Returns:
        ``(x, iterations)``.

    Raises:
        ValueError: If ``rhs`` is not a vector.
        RuntimeError: If a search direction has non-positive curvature :math:`p^\top M p \le 0`
            (``M`` is not positive definite; add damping).
    """
    if rhs.ndim != 1:
        raise ValueError(f"rhs must be a vector (d,), got shape {tuple(rhs.shape)}")
    limit = 2 * rhs.numel() if max_iter is None else max_iter
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rr = residual @ residual
    target = tol * torch.linalg.vector_norm(rhs)
    for iteration in range(limit + 1):
        if rr.sqrt() <= target:
            return x, iteration
        if iteration == limit:
            break
        product = matvec(direction)
        curvature = direction @ product
        if curvature <= 0:
            raise RuntimeError(
                f"conjugate gradient met non-positive curvature {float(curvature):.3g} at "
                f"iteration {iteration}; the matrix is not positive definite, increase damping"
            )
        step = rr / curvature
        x = x + step * direction
        residual = residual - step * product
        rr_next = residual @ residual
        direction = residual + (rr_next / rr) * direction
        rr = rr_next
    warnings.warn(
        f"conjugate gradient stopped after {limit} iterations with relative residual "
        f"{float(rr.sqrt() / torch.linalg.vector_norm(rhs)):.3g} > tol={tol}; raise max_iter "
        "or the damping",
        stacklevel=2,
    )
    return x, limit


# ------------------------------------------------------------------------------------------------
# Quadratic model


@dataclass(frozen=True)
class QuadraticModel:
    r"""Damped quadratic model of a loss change in a step ``s``.

    .. math::
        m(s) = g^\top s + \tfrac12 s^\top (C + \lambda I) s,\qquad
        s^* = -(C + \lambda I)^{-1} g,\qquad
        -m(s^*) = \tfrac12 g^\top (C + \lambda I)^{-1} g

    ``C`` is a dense symmetric positive semi-definite matrix (solved by `damped_solve`, with the
    pseudo-inverse fallback when :math:`C + \lambda I` is singular) or a matrix-vector product
    (solved by `conjugate_gradient`, which needs :math:`C + \lambda I` positive definite).

    Example:
        >>> model = QuadraticModel(torch.tensor([1.0, -2.0]), torch.eye(2), damping=1.0)
        >>> model.minimiser()
        tensor([-0.5000,  1.0000])
        >>> float(model.predicted_decrease())
        1.25

    Attributes:
        gradient: ``g``, shape ``(d,)``.
        curvature: ``C`` as a ``(d, d)`` tensor, or a callable ``v -> C v`` on ``(d,)`` vectors.
        damping: :math:`\lambda \ge 0`.
        cg_tol: Relative residual tolerance of conjugate gradient (callable curvature).
        cg_max_iter: Iteration limit of conjugate gradient (default ``2 d``).
    """

    gradient: Tensor
    curvature: Tensor | Callable[[Tensor], Tensor]
    damping: float = 0.0
    cg_tol: float = 1e-10
    cg_max_iter: int | None = None

    def __post_init__(self) -> None:
        if self.gradient.ndim != 1:
            raise ValueError(f"gradient must be a vector (d,), got {tuple(self.gradient.shape)}")
        _check_damping(self.damping)
        d = self.gradient.numel()
        if isinstance(self.curvature, Tensor):
            if self.curvature.shape != (d, d):
                raise ValueError(
                    f"dense curvature must have shape ({d}, {d}), got {tuple(self.curvature.shape)}"
                )
        elif not callable(self.curvature):
            raise ValueError("curvature must be a (d, d) tensor or a callable v -> C v")

    def curvature_product(self, vector: Tensor) -> Tensor:
        r"""Damped curvature times a vector, :math:`(C + \lambda I) v`.

        Args:
            vector: ``v``, shape ``(d,)``.

        Returns:
            Shape ``(d,)``.
        """
        if vector.shape != self.gradient.shape:
            raise ValueError(
                f"vector must have shape {tuple(self.gradient.shape)}, got {tuple(vector.shape)}"
            )
        if isinstance(self.curvature, Tensor):
            product = self.curvature @ vector
        else:
            product = self.curvature(vector)
        return product + self.damping * vector

    def value(self, step: Tensor) -> Tensor:
        r"""Model value :math:`m(s) = g^\top s + \tfrac12 s^\top (C + \lambda I) s`.

        Args:
            step: ``s``, shape ``(d,)``.

        Returns:
            Scalar tensor.
        """
        return self.gradient @ step + 0.5 * step @ self.curvature_product(step)

    def minimiser(self) -> Tensor:
        r"""Minimising step :math:`s^* = -(C + \lambda I)^{-1} g` (pseudo-inverse if singular).

        Returns:
            Shape ``(d,)``, in the gradient's dtype.
        """
        if isinstance(self.curvature, Tensor):
            return -damped_solve(self.curvature, self.gradient, self.damping)
        solution, _ = conjugate_gradient(
            self.curvature_product, self.gradient, tol=self.cg_tol, max_iter=self.cg_max_iter
        )
        return -solution

    def predicted_decrease(self) -> Tensor:
        r"""Predicted decrease :math:`-m(s^*) = \tfrac12 g^\top (C + \lambda I)^{-1} g \ge 0`.

        Returns:
            Scalar tensor.
        """
        return -0.5 * (self.gradient @ self.minimiser())
