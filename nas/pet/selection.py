"""Budgeted selection of PET units: cost-aware greedy, one-shot and iterative schedules.

Structured selection is a knapsack problem: keep a set ``K`` of units maximising
``sum_{u in K} score_u`` subject to ``sum_{u in K} cost_u <= budget``. The greedy rule sorts units
by score per parameter ``score_u / cost_u`` (ties: the supernet's unit order, i.e. module order then
component index) and keeps every unit that still fits, so the budget is filled until the slack is
smaller than the cheapest unit left out. Unstructured selection (every entry costs 1) keeps the
``budget`` best entries and meets the budget exactly.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from nas.pet.supernet import LoraBiasLinear, PetSupernet, Unit

logger = logging.getLogger(__name__)


class Selection(NamedTuple):
    """Result of a structured selection.

    Attributes:
        kept: kept units, in the order they were chosen.
        cost: ``sum_{u in kept} cost_u``.
        budget: the budget it was selected for.
        score: ``sum_{u in kept} score_u``.
    """

    kept: tuple[Unit, ...]
    cost: int
    budget: int
    score: float


def _check_inputs(budget: int, scores: Mapping[Unit, float]) -> tuple[int, list[Unit]]:
    """The checked budget and the units; refuse non-positive costs and non-finite scores."""
    budget = _check_budget(budget)
    units = list(scores)
    for u in units:
        if u.cost <= 0:
            raise ValueError(f"unit {u} has non-positive cost")
        if not math.isfinite(scores[u]):
            raise ValueError(f"unit {u} has a non-finite score {scores[u]!r}")
    return budget, units


def _check_budget(budget: int) -> int:
    if int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    return int(budget)


def greedy_select(scores: Mapping[Unit, float], budget: int) -> Selection:
    """Greedy knapsack selection by score per parameter.

    Units are visited by decreasing ``score_u / cost_u`` and kept whenever they still fit, so
    units with negative scores are kept too while budget is left (the budget is filled).

    Args:
        scores: unit -> score (higher = more worth keeping); the mapping's order breaks ties.
        budget: maximal total cost (parameters).

    Returns:
        the selection; ``cost <= budget`` and every unit left out costs more than
        ``budget - cost``.

    Raises:
        ValueError: on a negative or non-integer budget, a unit with non-positive cost or a
            non-finite score.
    """
    budget, units = _check_inputs(budget, scores)
    order = sorted(range(len(units)), key=lambda i: (-scores[units[i]] / units[i].cost, i))
    kept, cost, total = [], 0, 0.0
    for i in order:
        u = units[i]
        if cost + u.cost <= budget:
            kept.append(u)
            cost += u.cost
            total += scores[u]
    logger.debug(
        "greedy selection: %d/%d units, cost %d of %d", len(kept), len(units), cost, budget
    )
    return Selection(tuple(kept), cost, budget, total)


def exact_select(
    scores: Mapping[Unit, float], budget: int, max_cells: int = 50_000_000
) -> Selection:
    r"""Exact 0/1 knapsack: the highest total score at the largest reachable cost ``<= budget``.

    With ``g = gcd(budget, cost_u for all u)``, costs and budget are divided by ``g`` and

    .. math::

        V_i(c) = \max\big(V_{i-1}(c),\; V_{i-1}(c - w_i) + s_i\big),\qquad V_0(c) =
        \begin{cases} 0 & c = 0 \\ -\infty & c > 0 \end{cases}

    is filled for ``c = 0..budget/g``. The selection uses the largest ``c*`` with
    ``V_n(c*) > -inf`` (``c* = budget/g`` whenever some subset costs exactly the budget) and is
    read back from the choice table. Unlike :func:`greedy_select` it meets the budget exactly
    whenever that is possible; ties keep the earlier choice, so it is deterministic. Falls back
    to :func:`greedy_select` (with a warning) when ``n * budget / g`` exceeds ``max_cells``.

    Args:
        scores: unit -> score (higher = more worth keeping).
        budget: maximal total cost.
        max_cells: size limit of the choice table.

    Returns:
        the selection.

    Raises:
        ValueError: as :func:`greedy_select`.
    """
    import numpy as np

    budget, units = _check_inputs(budget, scores)
    if budget == 0 or not units:
        return Selection((), 0, budget, 0.0)
    g = math.gcd(budget, *(u.cost for u in units))
    cap = budget // g
    if len(units) * (cap + 1) > max_cells:
        warnings.warn(
            f"exact selection needs a {len(units)} x {cap + 1} table; using greedy_select",
            stacklevel=2,
        )
        return greedy_select(scores, budget)
    value = np.full(cap + 1, -np.inf)
    value[0] = 0.0
    take = np.zeros((len(units), cap + 1), dtype=bool)
    for i, u in enumerate(units):
        w = u.cost // g
        if w > cap:
            continue
        cand = np.full(cap + 1, -np.inf)
        cand[w:] = value[: cap + 1 - w] + scores[u]
        better = cand > value
        take[i] = better
        value = np.where(better, cand, value)
    c = int(np.flatnonzero(np.isfinite(value)).max())
    kept = []
    for i in range(len(units) - 1, -1, -1):
        if take[i, c]:
            kept.append(units[i])
            c -= units[i].cost // g
    kept.reverse()
    cost = sum(u.cost for u in kept)
    logger.debug("exact selection: %d/%d units, cost %d of %d", len(kept), len(units), cost, budget)
    return Selection(tuple(kept), cost, budget, float(sum(scores[u] for u in kept)))


def architecture_cost(supernet: PetSupernet) -> int:
    """Parameter count of the supernet's current architecture, from ranks and bias vectors.

    ``C = sum_m r_m (d_in,m + d_out,m) + sum_b |b|`` with ``r_m`` the live rank of matrix ``m``
    and ``|b|`` the full length of each tuned bias vector. Equals ``supernet.count_parameters()``
    exactly when the masks are structured (whole components and whole bias vectors); the two are
    independent counts of the same budget.

    Args:
        supernet: the supernet.

    Returns:
        the cost.
    """
    cost = 0
    for name, r in supernet.ranks().items():
        mod = supernet.model.get_submodule(name)
        cost += r * (mod.in_features + mod.out_features)
    for name in supernet.tuned_biases():
        cost += supernet.model.get_submodule(name).bias_delta.numel()
    return cost


def is_structured(supernet: PetSupernet) -> bool:
    """Whether every mask is structured (whole bias vectors and whole LoRA components).

    A bias mask must be all-0 or all-1; for each LoRA component the A-row and B-column masks must
    be both all-0 or both all-1.
    """
    for _, mod in supernet.pet_modules():
        if mod.mask_bias is not None:
            m = mod.mask_bias.bool()
            if m.any() and not m.all():
                return False
        if isinstance(mod, LoraBiasLinear) and mod.rank > 0:
            a = mod.mask_A.bool()
            b = mod.mask_B.bool()
            a_all, a_any = a.all(dim=1), a.any(dim=1)
            b_all, b_any = b.all(dim=0), b.any(dim=0)
            if not (
                bool((a_all == a_any).all())
                and bool((b_all == b_any).all())
                and bool((a_all == b_all).all())
            ):
                return False
    return True


def select_entries(
    scores: Mapping[str, torch.Tensor], budget: int, alive: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Keep the ``budget`` best single entries (unstructured selection, cost 1 each).

    Entries are ranked by score, descending; ties keep the order of ``scores`` (parameter order,
    then row-major position). Only entries with ``alive`` true are candidates.

    Args:
        scores: parameter name -> per-entry scores.
        budget: number of entries to keep.
        alive: parameter name -> bool mask of candidate entries (default: all).

    Returns:
        parameter name -> bool mask with exactly ``min(budget, #candidates)`` true entries in
        total.

    Raises:
        ValueError: on a negative or non-integer budget.
    """
    budget = _check_budget(budget)
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).double().cpu() for n in names])
    cand = torch.cat(
        [
            (alive[n] if alive is not None else torch.ones_like(scores[n]))
            .detach()
            .reshape(-1)
            .bool()
            .cpu()
            for n in names
        ]
    )
    n_cand = int(cand.sum())
    if budget > n_cand:
        warnings.warn(
            f"budget {budget} exceeds the {n_cand} candidate entries; keeping all of them",
            stacklevel=2,
        )
    key = torch.where(cand, flat, torch.full_like(flat, -math.inf))
    order = torch.sort(key, descending=True, stable=True).indices
    keep = torch.zeros_like(cand)
    keep[order[: min(budget, n_cand)]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].reshape(scores[n].shape).to(scores[n].device)
        start += size
    return out


def geometric_budgets(start: int, target: int, rounds: int) -> list[int]:
    """Budgets of an iterative schedule shrinking geometrically from ``start`` to ``target``.

    ``B_t = round(start * (target / start) ** (t / R))`` for ``t = 1..R``; the last one is
    ``target`` exactly.

    Args:
        start: current parameter count (``> 0``).
        target: final budget (``0 <= target <= start``).
        rounds: number of rounds ``R >= 1``.

    Returns:
        the ``R`` budgets, non-increasing.

    Raises:
        ValueError: on invalid arguments.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 <= target <= start or start <= 0:
        raise ValueError(f"need 0 <= target <= start and start > 0, got {target=}, {start=}")
    ratio = max(target, 1) / start
    out = [round(start * ratio ** (t / rounds)) for t in range(1, rounds)]
    return [*out, target]


class PruneInfo(NamedTuple):
    """Diagnostics of one pruning round.

    Attributes:
        round: round index (0-based).
        budget: the round's budget.
        count: unmasked PET parameters after the round.
        n_units: structured units (or entries) kept.
    """

    round: int
    budget: int
    count: int
    n_units: int


def prune_structured(
    supernet: PetSupernet,
    score_fn: Callable[[PetSupernet], Mapping[Unit, float]],
    budget: int,
    rounds: int = 1,
    retrain_fn: Callable[[PetSupernet, int], None] | None = None,
    select: Callable[[Mapping[Unit, float], int], Selection] = greedy_select,
) -> list[PruneInfo]:
    """One-shot (``rounds=1``) or iterative structured pruning to ``budget``.

    Each round scores the live units with ``score_fn``, keeps a greedy selection within the
    round's budget (:func:`geometric_budgets`) and, between rounds, calls ``retrain_fn``. Pruned
    units never return.

    Args:
        supernet: the supernet; its masks are changed in place.
        score_fn: ``score_fn(supernet) -> {unit: score}``.
        budget: final parameter budget.
        rounds: number of pruning rounds.
        retrain_fn: ``retrain_fn(supernet, round)``, called after every round but the last.
        select: ``select(scores, budget) -> Selection``: :func:`greedy_select` (default) or
            :func:`exact_select`.

    Returns:
        one ``PruneInfo`` per round.
    """
    start = supernet.count_parameters()
    infos = []
    for t, b in enumerate(geometric_budgets(start, min(budget, start), rounds)):
        scores = score_fn(supernet)
        alive = supernet.alive_units()
        sel = select({u: scores[u] for u in alive}, b)
        supernet.keep_units(sel.kept)
        infos.append(PruneInfo(t, b, supernet.count_parameters(), len(sel.kept)))
        logger.info(
            "structured round %d: budget %d, kept %d units (%d params)",
            t,
            b,
            len(sel.kept),
            infos[-1].count,
        )
        if retrain_fn is not None and t < rounds - 1:
            retrain_fn(supernet, t)
    return infos


def prune_unstructured(
    supernet: PetSupernet,
    score_fn: Callable[[PetSupernet], Mapping[str, torch.Tensor]],
    budget: int,
    rounds: int = 1,
    retrain_fn: Callable[[PetSupernet, int], None] | None = None,
) -> list[PruneInfo]:
    """One-shot or iterative unstructured pruning to exactly ``budget`` entries.

    Args:
        supernet: the supernet; its masks are changed in place.
        score_fn: ``score_fn(supernet) -> {parameter name: per-entry scores}`` (e.g.
            :func:`nas.pet.scores.entry_scores` on fresh gradients).
        budget: final number of unmasked entries.
        rounds: number of pruning rounds.
        retrain_fn: ``retrain_fn(supernet, round)``, called after every round but the last.

    Returns:
        one ``PruneInfo`` per round.
    """
    start = supernet.count_parameters()
    infos = []
    for t, b in enumerate(geometric_budgets(start, min(budget, start), rounds)):
        scores = score_fn(supernet)
        keep = select_entries(scores, b, alive=supernet.masks())
        supernet.set_masks(keep)
        infos.append(PruneInfo(t, b, supernet.count_parameters(), b))
        logger.info("unstructured round %d: budget %d, count %d", t, b, infos[-1].count)
        if retrain_fn is not None and t < rounds - 1:
            retrain_fn(supernet, t)
    return infos
