r"""Block coordinate ascent on the mean-field ELBO, with blocks found by colouring co-parents.

Two hidden variables of one layer interact in the ELBO only through the children they share
(their entry of ``Lambda_ll = diag(1/sigma^2_l) + W^T diag(1/sigma^2_{l-1}) W`` is zero
otherwise). A set of variables no two of which share a child is an independent set of the
*co-parent graph*; its block of ``Lambda_ll`` is diagonal, so the single-variable CAVI formulas
applied to the whole set at once give the exact joint maximiser of the block:

.. math::
    \Delta m_B = g_B\, \Lambda_{BB}^{-1}, \qquad v_B = 1/\mathrm{diag}(\Lambda_{BB}),

``g_B`` the ELBO gradient in ``m_B``. A greedy colouring of the co-parent graph partitions every
layer into such blocks; a sweep updates the blocks one after the other (layers bottom-up). A
user-given partition may hold blocks that are not independent sets: such a block is solved
jointly through a Cholesky factor of ``Lambda_BB``, still an exact block maximisation.

The limit of one block holding every hidden variable is the exact mean-field optimum,
:func:`exact_optimum`, by one Cholesky solve of the hidden precision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from defbound.cavi import largest_change, layer_precision
from defbound.state import DEFParameters, Moments
from defbound.update import SweepInfo, mean_gradient, prior_mean, sweep_info

logger = logging.getLogger(__name__)

Partition = tuple[tuple[Tensor, ...], ...]
"""Per hidden layer ``l = 1..L`` (entry ``l - 1``), a tuple of index tensors, one per block."""


def coparent_graph(weights: Tensor) -> Tensor:
    """Adjacency of the co-parent graph of one layer of parents.

    Parents ``j != j'`` are adjacent iff some child ``k`` has ``W_kj != 0`` and ``W_kj' != 0``.

    Args:
        weights: ``W^{(l-1)}`` of shape ``(K_{l-1}, K_l)`` (children by parents).

    Returns:
        Boolean tensor of shape ``(K_l, K_l)`` with a false diagonal.
    """
    pattern = (weights != 0).to(torch.float32)
    adjacency = (pattern.T @ pattern) > 0
    adjacency.fill_diagonal_(False)
    return adjacency


def greedy_colouring(adjacency: Tensor) -> Tensor:
    """Greedy (Welsh-Powell) vertex colouring: highest degree first, smallest free colour.

    Args:
        adjacency: symmetric boolean ``(K, K)`` adjacency with a false diagonal.

    Returns:
        Long tensor of shape ``(K,)`` with colours ``0..C-1``; adjacent vertices differ.
    """
    adj = adjacency.detach().cpu().numpy().astype(bool)
    K = adj.shape[0]
    order = np.argsort(-adj.sum(1), kind="stable")
    colours = np.full(K, -1, dtype=np.int64)
    for vertex in order:
        taken = np.unique(colours[adj[vertex] & (colours >= 0)])
        free = np.setdiff1d(np.arange(len(taken) + 1), taken, assume_unique=True)
        colours[vertex] = free[0]
    return torch.as_tensor(colours, device=adjacency.device)


def colour_partition(params: DEFParameters) -> Partition:
    """Blocks of every hidden layer from a greedy colouring of its co-parent graph.

    Args:
        params: DEF parameters.

    Returns:
        The :data:`Partition`; within every block no two variables share a child.
    """
    partition = []
    for layer in range(1, params.depth + 1):
        colours = greedy_colouring(coparent_graph(params.weights[layer - 1]))
        blocks = tuple(
            torch.nonzero(colours == c).flatten() for c in range(int(colours.max()) + 1)
        )
        partition.append(blocks)
    sizes = [len(b) for b in partition]
    logger.debug("co-parent colouring: %s blocks per layer", sizes)
    return tuple(partition)


def check_partition(
    params: DEFParameters, partition: Sequence[Sequence[Sequence[int] | Tensor]]
) -> Partition:
    """Validate a user partition of the hidden variables into per-layer blocks.

    Args:
        params: DEF parameters.
        partition: for every hidden layer ``l = 1..L`` (entry ``l - 1``), a list of blocks, each
            a list or tensor of unit indices in ``0..K_l-1``.

    Returns:
        The partition as long tensors on the parameters' device.

    Raises:
        ValueError: when the number of layers is wrong, a block is empty, an index is out of
            range, a unit is in two blocks, or a unit is in none; the message names the layer
            and the units.
    """
    device = params.biases[0].device
    if len(partition) != params.depth:
        raise ValueError(
            f"partition must list blocks for each of the {params.depth} hidden layers, "
            f"got {len(partition)} entries"
        )
    out = []
    for layer, blocks in enumerate(partition, start=1):
        K = params.widths[layer]
        seen = torch.zeros(K, dtype=torch.long)
        checked = []
        for b, block in enumerate(blocks):
            index = torch.as_tensor(block, dtype=torch.long).flatten().cpu()
            if index.numel() == 0:
                raise ValueError(f"layer {layer}: block {b} is empty")
            bad = index[(index < 0) | (index >= K)]
            if bad.numel():
                raise ValueError(
                    f"layer {layer}: block {b} has unit indices {bad.tolist()} outside 0..{K - 1}"
                )
            seen.index_add_(0, index, torch.ones_like(index))
            checked.append(index.to(device))
        twice = torch.nonzero(seen > 1).flatten()
        if twice.numel():
            raise ValueError(f"layer {layer}: units {twice.tolist()} are in more than one block")
        missing = torch.nonzero(seen == 0).flatten()
        if missing.numel():
            raise ValueError(f"layer {layer}: units {missing.tolist()} are in no block")
        out.append(tuple(checked))
    return tuple(out)


def is_independent(params: DEFParameters, partition: Partition) -> bool:
    """Whether every block is an independent set of its layer's co-parent graph."""
    for layer, blocks in enumerate(partition, start=1):
        adjacency = coparent_graph(params.weights[layer - 1])
        for index in blocks:
            if adjacency[index][:, index].any():
                return False
    return True


class _Block(NamedTuple):
    index: Tensor  # (B,) unit indices
    columns: Tensor  # (K_c, B) = W[:, B]
    back: Tensor  # (B, K_c) = (W[:, B] / sigma^2_c).T, to update the weighted child residual
    inverse_diagonal: Tensor | None  # (B,) = 1/Lambda_jj when Lambda_BB is diagonal
    cholesky: Tensor | None  # (B, B) factor of Lambda_BB otherwise


class BlockPlan(NamedTuple):
    """Precomputed per-block quantities, reused across sweeps while the weights are fixed.

    Attributes:
        partition: the partition the plan was built from.
        blocks: per layer, the internal per-block factors.
        variances: per layer, ``1/diag(Lambda_ll)`` of shape ``(K_l,)``.
    """

    partition: Partition
    blocks: tuple[tuple[_Block, ...], ...]
    variances: tuple[Tensor, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of blocks in every hidden layer."""
        return tuple(len(b) for b in self.partition)


def block_plan(
    params: DEFParameters,
    partition: Sequence[Sequence[Sequence[int] | Tensor]] | None = None,
) -> BlockPlan:
    """Prepare block coordinate ascent for fixed parameters.

    Args:
        params: DEF parameters.
        partition: user blocks (validated by :func:`check_partition`), or ``None`` for the
            co-parent colouring of :func:`colour_partition`.

    Returns:
        The :class:`BlockPlan`.

    Raises:
        ValueError: for a bad partition (see :func:`check_partition`).
    """
    part = colour_partition(params) if partition is None else check_partition(params, partition)
    all_blocks, variances = [], []
    for layer, blocks in enumerate(part, start=1):
        W = params.weights[layer - 1]
        s2_child = params.noise_vars[layer - 1]
        lam = layer_precision(params, layer)
        variances.append(1 / lam.diagonal().clone())
        prepared = []
        for index in blocks:
            sub = lam[index][:, index]
            columns = W[:, index]
            back = (columns / s2_child[:, None]).T.contiguous()
            off = sub - torch.diag(sub.diagonal())
            if torch.count_nonzero(off) == 0:
                prepared.append(_Block(index, columns, back, 1 / sub.diagonal(), None))
            else:
                prepared.append(_Block(index, columns, back, None, torch.linalg.cholesky(sub)))
        all_blocks.append(tuple(prepared))
    return BlockPlan(part, tuple(all_blocks), tuple(variances))


@torch.no_grad()
def block_sweep(
    params: DEFParameters, moments: Moments, plan: BlockPlan | None = None
) -> tuple[Moments, SweepInfo]:
    r"""One sweep of block coordinate ascent: layers bottom-up, blocks in order.

    For each block ``B`` of layer ``l``, with the child layer ``c = l - 1``:

    .. math::
        g_B = \frac{a_B - m_B}{\sigma^2_B} + \frac{r_c}{\sigma^2_c} W_{:,B},\quad
        m_B \leftarrow m_B + g_B \Lambda_{BB}^{-1},\quad
        r_c \leftarrow r_c - \Delta m_B W_{:,B}^T,

    ``r_c = m_c - m_l W^T - b_c`` the child residual, kept current so later blocks see the move.
    The variances are set to ``1/Lambda_jj``. Work per layer ``O(N K_{l-1} K_l)`` in as many
    dependent stages as there are blocks.

    Args:
        params: DEF parameters.
        moments: current moments.
        plan: precomputed :func:`block_plan` (the colouring plan is built when omitted).

    Returns:
        ``(new_moments, info)``.
    """
    if plan is None:
        plan = block_plan(params)
    # NOTE: blocks run one after the other in Python. On dense weights the colouring has one
    # unit per block, so a sweep is sequential CAVI with K_l Python steps per layer, slower than
    # the triangular solve of defbound.cavi.cavi_sweep that gives the same sweep counts.
    change = 0.0
    for layer in range(1, params.depth + 1):
        m = moments.means[layer].clone()
        s2_own = params.noise_vars[layer]
        own = (prior_mean(params, moments, layer) - m) / s2_own
        child = moments.means[layer - 1] - m @ params.weights[layer - 1].T
        weighted_child = (child - params.biases[layer - 1]) / params.noise_vars[layer - 1]
        for block in plan.blocks[layer - 1]:
            g = own[:, block.index] + weighted_child @ block.columns
            if block.cholesky is None:
                step = g * block.inverse_diagonal
            else:
                step = torch.cholesky_solve(g.T, block.cholesky).T
            m[:, block.index] += step
            own[:, block.index] -= step / s2_own[block.index]
            weighted_child -= step @ block.back
            change = largest_change(change, step)
        variance = plan.variances[layer - 1].expand_as(m).clone()
        moments = moments.replace_layer(layer, m, variance)
    return moments, sweep_info(params, moments, change)


def hidden_precision(params: DEFParameters) -> Tensor:
    r"""Dense exact posterior precision over all hidden variables, stacked ``z_1..z_L``.

    Block tridiagonal: diagonal blocks :func:`defbound.cavi.layer_precision` and
    ``Lambda_{l,l+1} = -diag(1/sigma^2_l) W^{(l)}``.

    Returns:
        Tensor of shape ``(n, n)``, ``n = sum_{l>=1} K_l``.
    """
    widths = params.widths[1:]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    n = int(offsets[-1])
    ref = params.biases[0]
    lam = torch.zeros(n, n, dtype=ref.dtype, device=ref.device)
    for layer in range(1, params.depth + 1):
        a, b = offsets[layer - 1], offsets[layer]
        lam[a:b, a:b] = layer_precision(params, layer)
        if layer < params.depth:
            c = offsets[layer + 1]
            coupling = -params.weights[layer] / params.noise_vars[layer][:, None]
            lam[a:b, b:c] = coupling
            lam[b:c, a:b] = coupling.T
    return lam


def exact_optimum(params: DEFParameters, x: Tensor, max_size: int = 6000) -> Moments:
    r"""The mean-field optimum ``q*`` by one Cholesky solve: every hidden variable as one block.

    .. math:: m^* = \Lambda^{-1} h, \qquad v^*_i = 1/\Lambda_{ii}, \qquad h = g(m = 0),

    ``g`` the ELBO gradient of :func:`defbound.update.mean_gradient` (``g = h - Lambda m``).
    ``ELBO* = elbo(params, q*)``. Cost ``O(n^3 / 3 + N n^2)`` with ``n = sum_{l>=1} K_l``.

    Args:
        params: DEF parameters.
        x: data, ``(N, K_0)``.
        max_size: refuse models with more hidden variables per row than this.

    Returns:
        The optimal :class:`Moments`.

    Raises:
        ValueError: when ``n > max_size``.
    """
    widths = params.widths[1:]
    n = sum(widths)
    if n > max_size:
        raise ValueError(
            f"the exact optimum needs a dense {n} x {n} Cholesky factor; raise max_size "
            f"(now {max_size}) if memory allows"
        )
    N = x.shape[0]
    zeros = Moments(
        (x, *(torch.zeros(N, k, dtype=x.dtype, device=x.device) for k in widths)),
        (torch.zeros_like(x), *(torch.ones(N, k, dtype=x.dtype, device=x.device) for k in widths)),
    )
    h = torch.cat([mean_gradient(params, zeros, l) for l in range(1, params.depth + 1)], dim=-1)
    lam = hidden_precision(params)
    chol = torch.linalg.cholesky(lam)
    means = torch.cholesky_solve(h.T, chol).T
    variances = (1 / lam.diagonal()).expand(N, -1)
    split_m = torch.split(means, list(widths), dim=-1)
    split_v = torch.split(variances, list(widths), dim=-1)
    return Moments(
        (x, *(m.contiguous() for m in split_m)),
        (torch.zeros_like(x), *(v.contiguous() for v in split_v)),
    )
