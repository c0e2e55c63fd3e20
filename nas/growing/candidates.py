r"""Growth candidates, their selection under a parameter budget, and their insertion.

A candidate is ``k`` new units at one site with concrete fan-in :math:`A` (and biases), fan-out
:math:`B` (``None`` for zeros, which keeps the function) and a score from the method that
proposed it (higher is better). Methods that predict a loss change (Gauss-Newton) also carry it,
and `measure_actual_changes` adds the true change on held-out examples for comparison.

Every growth method implements `GrowthStrategy`: given a `GrowthContext` (the network, its
optimizer, data, budget, random generator, compute counter), it returns a `GrowthStep`.
Candidate-based methods call `grow_with`, which selects by `select_candidates` and inserts by
`apply_candidate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from defbound.curvature import Loss, per_example_loss
from nas.growing.compute import ComputeCounter
from nas.growing.sites import Increment, IncrementHook, NormStatistics, Site, site_by_index
from nas.morphism import widen

logger = logging.getLogger(__name__)

SelectionRule = Literal["score_per_param", "score"]


@dataclass
class Candidate:
    """``k`` new units at one site, ready to insert.

    Attributes:
        site_index: Top-level index of the site (as `nas.morphism.widen` takes it).
        site_name: Readable site name.
        k: Number of new units.
        fan_in: ``A``, shape ``site.fan_in_shape(k)``.
        bias: New biases ``(k,)`` or ``None``.
        fan_out: ``B``, shape ``site.fan_out_shape(k)``, or ``None`` (zeros).
        norm: Statistics for new batch-norm entries, or ``None`` (fresh entries).
        score: The proposing method's score; higher is better.
        num_params: Parameters the candidate adds.
        predicted_change: Predicted loss change of the insertion (loss units), if any.
        actual_change: True loss change on held-out examples, if measured.
        info: Method-specific extras (JSON-serialisable).
    """

    site_index: int
    site_name: str
    k: int
    fan_in: Tensor
    bias: Tensor | None
    fan_out: Tensor | None
    norm: NormStatistics | None
    score: float
    num_params: int
    predicted_change: float | None = None
    actual_change: float | None = None
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-serialisable description (no tensors)."""
        return {
            "site": self.site_name,
            "k": self.k,
            "score": self.score,
            "num_params": self.num_params,
            "predicted_change": self.predicted_change,
            "actual_change": self.actual_change,
            **self.info,
        }


@dataclass
class GrowthContext:
    """What a growth method sees at one round.

    Attributes:
        model: The network (an ``nn.Sequential``); methods may edit it in place.
        optimizer: Its optimizer (state follows insertions).
        inputs: Training inputs.
        targets: Training targets.
        val_inputs: Validation inputs.
        val_targets: Validation targets.
        loss: ``"mse"`` or ``"cross_entropy"``.
        units: Units per candidate ``k``.
        layers_per_round: How many sites may grow this round.
        max_new_params: Parameters still allowed by the budget (``None``: no limit).
        generator: CPU random generator (all randomness of the method comes from it).
        counter: Compute bookkeeping; methods book their search passes here.
        round: Round number (1-based).
        batch_size: Training batch size.
        make_optimizer: Builds a fresh optimizer for a network.
        train: ``(model, optimizer, epochs) -> loss`` trains and books the passes as search.
        min_score: Candidates whose score is not above this are "without gain".
        stop_without_gain: If no candidate has a gain, insert nothing (the loop then stops);
            otherwise insert the best candidate with zero fan-out (function preserving).
    """

    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    inputs: Tensor
    targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor
    loss: Loss
    units: int
    layers_per_round: int
    max_new_params: int | None
    generator: torch.Generator
    counter: ComputeCounter
    round: int
    batch_size: int
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    train: Callable[[nn.Module, torch.optim.Optimizer, int], float]
    min_score: float = 0.0
    stop_without_gain: bool = False

    def stat_batch(self, size: int) -> tuple[Tensor, Tensor]:
        """A random subset of ``size`` training examples (drawn from ``generator``)."""
        size = min(size, len(self.inputs))
        index = torch.randperm(len(self.inputs), generator=self.generator)[:size]
        index = index.to(self.inputs.device)
        return self.inputs[index], self.targets[index]


@dataclass
class GrowthStep:
    """Result of one growth step.

    Attributes:
        model: The grown network (the same object unless the method replaced it).
        optimizer: Its optimizer.
        applied: Candidates inserted this round.
        candidates: Every candidate considered (for diagnostics).
    """

    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    applied: list[Candidate]
    candidates: list[Candidate]


class GrowthStrategy(Protocol):
    """A growth method: ``grow(context) -> GrowthStep``; ``name`` identifies it in logs."""

    name: str

    def grow(self, context: GrowthContext) -> GrowthStep:
        """Add units to ``context.model`` and return the step."""
        ...


def select_candidates(
    candidates: Sequence[Candidate],
    *,
    count: int = 1,
    max_new_params: int | None = None,
    rule: SelectionRule = "score_per_param",
    require_positive: bool = True,
    min_score: float = 0.0,
) -> list[Candidate]:
    """Greedy selection: best first by ``rule``, at most one per site, within the budget.

    Args:
        candidates: Candidates of one round.
        count: Maximum number of candidates to take.
        max_new_params: Parameter budget for the round (``None``: unlimited).
        rule: ``"score_per_param"`` (score divided by added parameters) or ``"score"``.
        require_positive: Skip candidates whose score is not above ``min_score``.
        min_score: Threshold for ``require_positive`` (default 0: any predicted gain).

    Returns:
        The chosen candidates, best first.
    """
    if rule not in ("score_per_param", "score"):
        raise ValueError(f"rule must be 'score_per_param' or 'score', got {rule!r}")

    def key(candidate: Candidate) -> float:
        return candidate.score / candidate.num_params if rule == "score_per_param" else (
            candidate.score
        )

    usable = [c for c in candidates if math.isfinite(c.score)]
    if require_positive:
        usable = [c for c in usable if c.score > max(min_score, 0.0)]
    chosen: list[Candidate] = []
    left = math.inf if max_new_params is None else max_new_params
    for candidate in sorted(usable, key=key, reverse=True):
        if len(chosen) == count:
            break
        if candidate.num_params > left or any(c.site_index == candidate.site_index
                                              for c in chosen):
            continue
        chosen.append(candidate)
        left -= candidate.num_params
    return chosen


def apply_candidate(
    model: nn.Sequential,
    candidate: Candidate,
    optimizer: torch.optim.Optimizer | None = None,
    scale: float = 1.0,
) -> None:
    r"""Insert ``candidate`` into ``model`` in place with fan-out :math:`\eta B` (``scale`` = η).

    New batch-norm entries get weight 1, bias 0 and ``candidate.norm``'s running statistics.

    Args:
        model: The network.
        candidate: What to insert.
        optimizer: Optimizer whose parameters and state follow (`nas.morphism.widen`).
        scale: :math:`\eta`; ignored when the fan-out is ``None``.
    """
    fan_out = None if candidate.fan_out is None else scale * candidate.fan_out
    change = widen(
        model, candidate.site_index, candidate.k, candidate.fan_in, fan_out,
        bias=candidate.bias, optimizer=optimizer,
    )
    if change.norm_index is not None and candidate.norm is not None:
        norm = change.container[change.norm_index]
        with torch.no_grad():
            new = list(change.units)
            norm.running_mean[new] = candidate.norm.mean.to(norm.running_mean)
            norm.running_var[new] = candidate.norm.var.to(norm.running_var)


def candidate_increment(site: Site, candidate: Candidate, scale: float = 1.0) -> Increment:
    """The `nas.growing.sites.Increment` that adds ``candidate`` virtually at ``site``.

    Tensors keep their dtype and device: `nas.growing.sites.IncrementHook` computes in the
    model's.
    """
    fan_out = (
        candidate.fan_in.new_zeros(site.fan_out_shape(candidate.k))
        if candidate.fan_out is None
        else scale * candidate.fan_out
    )
    return Increment(site, candidate.fan_in, candidate.bias, fan_out, candidate.norm)


@torch.no_grad()
def measure_actual_changes(
    model: nn.Sequential,
    candidates: Sequence[Candidate],
    inputs: Tensor,
    targets: Tensor,
    loss: Loss,
    scale: float = 1.0,
) -> list[float]:
    """True mean-loss change of inserting each candidate alone, on ``(inputs, targets)``.

    Evaluated in evaluation mode with `nas.growing.sites.IncrementHook` (no copy of the network),
    which equals inserting the candidate with `apply_candidate`. Sets ``actual_change``.

    Returns:
        The changes, in candidate order.
    """
    was_training = model.training
    model.eval()
    try:
        base = float(per_example_loss(model(inputs), targets, loss).mean())
        changes = []
        for candidate in candidates:
            site = site_by_index(model, candidate.site_index)
            with IncrementHook([candidate_increment(site, candidate, scale)]):
                value = float(per_example_loss(model(inputs), targets, loss).mean())
            candidate.actual_change = value - base
            changes.append(value - base)
    finally:
        model.train(was_training)
    return changes


def choose(
    context: GrowthContext,
    candidates: list[Candidate],
    *,
    rule: SelectionRule = "score_per_param",
    require_positive: bool = True,
) -> list[Candidate]:
    """`select_candidates` with the context's count, budget and threshold.

    When no candidate has a gain and ``context.stop_without_gain`` is false, copies of the best
    candidates by ``rule`` are returned with zero fan-out (``info["zero_fan_out"]``, predicted
    and actual change 0), so every method adds the same number of units per round while the
    function is kept; the originals keep their predictions for diagnostics.
    """
    chosen = select_candidates(
        candidates, count=context.layers_per_round, max_new_params=context.max_new_params,
        rule=rule, require_positive=require_positive, min_score=context.min_score,
    )
    if chosen or context.stop_without_gain or not require_positive:
        return chosen
    chosen = select_candidates(
        candidates, count=context.layers_per_round, max_new_params=context.max_new_params,
        rule=rule, require_positive=False,
    )
    return [
        replace(
            candidate,
            fan_out=None,
            predicted_change=None if candidate.predicted_change is None else 0.0,
            actual_change=None if candidate.actual_change is None else 0.0,
            info={**candidate.info, "zero_fan_out": True},
        )
        for candidate in chosen
    ]


def grow_with(
    context: GrowthContext,
    candidates: list[Candidate],
    *,
    rule: SelectionRule = "score_per_param",
    scale: float = 1.0,
    require_positive: bool = True,
) -> GrowthStep:
    """Select among ``candidates`` (`select_candidates`) and insert them (`apply_candidate`).

    Args:
        context: The round's context.
        candidates: Proposals, one or more per site.
        rule: Selection rule.
        scale: Fan-out multiplier (eta) at insertion.
        require_positive: Only take candidates with a positive score.

    Returns:
        `GrowthStep` with the inserted candidates.
    """
    chosen = choose(context, candidates, rule=rule, require_positive=require_positive)
    for candidate in sorted(chosen, key=lambda c: c.site_index, reverse=True):
        apply_candidate(context.model, candidate, context.optimizer, scale)
        logger.info("round %d: +%d units at site %s (score %.3g)", context.round, candidate.k,
                    candidate.site_name, candidate.score)
    return GrowthStep(context.model, context.optimizer, chosen, candidates)
