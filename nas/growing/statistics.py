r"""One pass over a batch that records what growth scoring needs at every site.

For every site (producer ``P``, consumer ``Q`` with output :math:`u`) and example ``i``:

* the producer's input :math:`h_i` (raw: ``(n, p)`` or ``(n, C, H, W)``), from which the new
  activations :math:`s_i(A)` are recomputed for any fan-in;
* the Jacobian :math:`J_i = \partial f_i / \partial u_i` of the network output with respect to
  the consumer output, by ``o`` backward passes (one per output coordinate) through the whole
  batch: examples are independent in evaluation mode, so row ``k`` of every :math:`J_i` comes
  from the gradient of :math:`\sum_i f_{ik}`;
* with ``curvature_samples=s``, the exact :math:`S_i^\top J_i` (``o`` backward passes) is
  replaced by ``s`` rows :math:`\tilde r_{ij}^\top J_i / \sqrt{s}` with residuals
  :math:`\tilde r_{ij}` of targets drawn from the model's predictive distribution: an unbiased
  estimate of :math:`G_i` (for cross-entropy the Fisher equals the GGN) at ``s + 1`` backward
  passes per example instead of ``o``;
* the back-propagated gradient :math:`g_i = J_i^\top r_i`, :math:`r_i = \partial \ell_i /
  \partial f_i`, and the whitened Jacobian :math:`W_i = S_i^\top J_i` with :math:`S_i S_i^\top
  = \Lambda_i` (`defbound.curvature.loss_hessian_sqrt`), so that the per-example GGN at
  :math:`u` is :math:`G_i = J_i^\top \Lambda_i J_i = W_i^\top W_i`.

Everything is kept per example (never averaged), in float64. `SiteStatistics.concat` joins
minibatches; every growth quantity is a sum over examples divided once, so minibatch passes give
the full-batch result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from defbound.curvature import Loss, loss_hessian_sqrt, output_gradients, per_example_loss
from nas.growing.sites import Site

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteStatistics:
    r"""Per-example growth statistics of one site.

    Attributes:
        inputs: Producer inputs :math:`h_i`, ``(n, p)`` or ``(n, C, H, W)`` (float64).
        gradients: :math:`g_i = J_i^\top r_i` at the consumer output, ``(n, q, L)``.
        whitened_jacobians: :math:`S_i^\top J_i`, ``(n, o, q, L)``.
        losses: Per-example losses :math:`\ell_i` of the current network, ``(n,)``.
    """

    inputs: Tensor
    gradients: Tensor
    whitened_jacobians: Tensor
    losses: Tensor

    @property
    def num_examples(self) -> int:
        """Number of examples ``n``."""
        return self.inputs.shape[0]

    def subset(self, index: Tensor | slice) -> SiteStatistics:
        """The statistics of a subset of the examples."""
        return SiteStatistics(
            self.inputs[index],
            self.gradients[index],
            self.whitened_jacobians[index],
            self.losses[index],
        )

    @staticmethod
    def concat(parts: Sequence[SiteStatistics]) -> SiteStatistics:
        """Join statistics of several minibatches (examples concatenated in order)."""
        if not parts:
            raise ValueError("need at least one part to concatenate")
        return SiteStatistics(
            torch.cat([p.inputs for p in parts]),
            torch.cat([p.gradients for p in parts]),
            torch.cat([p.whitened_jacobians for p in parts]),
            torch.cat([p.losses for p in parts]),
        )


def _as_rows(tensor: Tensor) -> Tensor:
    """``(n, q)`` -> ``(n, q, 1)``; ``(n, C, H, W)`` -> ``(n, C, H*W)``."""
    if tensor.ndim == 2:
        return tensor.unsqueeze(2)
    return tensor.flatten(start_dim=2)


def collect_site_statistics(
    model: nn.Module,
    sites: Sequence[Site],
    inputs: Tensor,
    targets: Tensor,
    loss: Loss,
    *,
    batch_size: int | None = None,
    curvature_samples: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[int, SiteStatistics]:
    """Record `SiteStatistics` for every site on ``(inputs, targets)``.

    The model is put in evaluation mode for the pass (and restored); no parameter or ``.grad``
    changes. Cost per example: one forward pass and ``o`` backward passes (exact curvature) or
    ``curvature_samples + 1`` (sampled).

    Args:
        model: The network, mapping ``(n, ...)`` to ``(n, o)``.
        sites: Sites of ``model`` (from `nas.growing.sites.growth_sites`).
        inputs: Shape ``(n, ...)``.
        targets: Targets for ``loss``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        batch_size: Minibatch size of the pass (default: all at once).
        curvature_samples: ``None`` for the exact whitened Jacobian (``o`` backward passes),
            else the number of sampled targets per example (Monte-Carlo GGN).
        generator: CPU random generator for the sampled targets.
        dtype: Storage dtype of the statistics.

    Returns:
        ``{site.index: SiteStatistics}``.
    """
    if not sites:
        raise ValueError("no sites to collect statistics for")
    if curvature_samples is not None and curvature_samples < 1:
        raise ValueError(f"curvature_samples must be None or >= 1, got {curvature_samples}")
    if len(inputs) != len(targets):
        raise ValueError(f"got {len(inputs)} inputs but {len(targets)} targets")
    size = len(inputs) if batch_size is None else batch_size
    was_training = model.training
    model.eval()
    try:
        parts: dict[int, list[SiteStatistics]] = {site.index: [] for site in sites}
        for start in range(0, len(inputs), size):
            batch = _one_batch(
                model, sites, inputs[start : start + size], targets[start : start + size], loss,
                curvature_samples, generator, dtype,
            )
            for index, stats in batch.items():
                parts[index].append(stats)
    finally:
        model.train(was_training)
    return {index: SiteStatistics.concat(p) for index, p in parts.items()}


def _one_batch(
    model: nn.Module,
    sites: Sequence[Site],
    inputs: Tensor,
    targets: Tensor,
    loss: Loss,
    samples: int | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> dict[int, SiteStatistics]:
    producer_inputs: dict[int, Tensor] = {}
    consumer_outputs: dict[int, Tensor] = {}
    handles = []
    for site in sites:

        def remember(module: nn.Module, args: tuple[Tensor, ...], index: int = site.index) -> None:
            producer_inputs[index] = args[0].detach()

        def keep(
            module: nn.Module, args: tuple[Tensor, ...], output: Tensor, index: int = site.index
        ) -> None:
            consumer_outputs[index] = output

        handles.append(site.producer_layer.register_forward_pre_hook(remember))
        handles.append(site.consumer_layer.register_forward_hook(keep))
    try:
        with torch.enable_grad():
            outputs = model(inputs)
            order = [site.index for site in sites]
            tracked = [consumer_outputs[index] for index in order]
            if samples is None:
                eye = torch.eye(outputs.shape[1]).to(outputs)
                cotangents = [row.expand_as(outputs) for row in eye]
            else:
                cotangents = _sampled_residuals(outputs.detach(), loss, samples, generator)
            cotangents.append(output_gradients(outputs.detach(), targets, loss).to(outputs))
            rows = [
                torch.autograd.grad(outputs, tracked, cotangent, retain_graph=True)
                for cotangent in cotangents
            ]
    finally:
        for handle in handles:
            handle.remove()

    outputs = outputs.detach().to(dtype)
    losses = per_example_loss(outputs, targets, loss)
    root = loss_hessian_sqrt(outputs, loss) if samples is None else None
    result = {}
    for position, index in enumerate(order):
        pulled = torch.stack([_as_rows(row[position].to(dtype)) for row in rows], dim=1)
        if root is None:
            whitened = pulled[:, :-1] / samples**0.5
        else:
            whitened = torch.einsum("nok,noql->nkql", root, pulled[:, :-1])
        result[index] = SiteStatistics(
            inputs=producer_inputs[index].to(dtype),
            gradients=pulled[:, -1],
            whitened_jacobians=whitened,
            losses=losses,
        )
    return result


def _sampled_residuals(
    outputs: Tensor, loss: Loss, samples: int, generator: torch.Generator | None
) -> list[Tensor]:
    r"""Residuals :math:`\partial \ell(f_i, \tilde y) / \partial f_i` for sampled targets."""
    if loss == "mse":
        noise = torch.randn((samples, *outputs.shape), generator=generator,
                            dtype=outputs.dtype)
        return list(-noise.to(outputs.device))
    probs = outputs.softmax(dim=1).cpu()
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator).T
    draws = draws.to(outputs.device)
    return [output_gradients(outputs, draw, loss) for draw in draws]
