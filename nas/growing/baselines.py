r"""Baseline growth methods, run in the same loop with the same budgets as Gauss-Newton growth.

* `RandomGrowth`: a random site gets ``k`` units, random fan-in, zero fan-out; no scoring.
* `NashSearch`: NASH-style random search: several children, each grown at random (zero
  fan-out, so function preserving) and trained briefly; the child with the lowest validation
  loss is kept. Its children's training is search compute.
* `GradMaxGrowth`: sites in turn (GradMax leaves "where" to a schedule); fan-in near zero, fan-out
  the top-``k`` right singular vectors of :math:`C = \tfrac1n \sum_{i,l} h_{il} g_{il}^\top`
  (producer inputs against consumer-output gradients), which maximise the gradient norm the new
  fan-in receives, scaled to half the mean norm of the consumer's existing columns.
* `TinyGrowth`: TINY-like: the Gauss-Newton machinery with identity curvature (so the fan-in is
  TINY's :math:`\Sigma_h^{-1/2} C` SVD solution and the fan-out a least-squares fit), site by
  that model's score per parameter, amplitude by a line search on the true loss.
* `FireflyGrowth`: Firefly-like: a pool of new units per site with small random fan-in and zero
  fan-out, trained jointly on the real loss for a number of RMSprop steps (network frozen), then
  scored by the first-order gate derivative :math:`-\partial L / \partial y_j` of each unit;
  the best ``k`` units of the best site (per parameter) are inserted with their learned weights.
  Only brand-new units are candidates: Firefly's neuron splitting is not implemented.
* Static networks of a final size are built from `nas.growing.seeds.NetworkSpec` and trained
  from scratch by `nas.growing.loop.train_static`.

All randomness comes from the context's generator.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from defbound.curvature import StatisticsCollector, per_example_loss
from nas.growing.candidates import (
    Candidate,
    GrowthContext,
    GrowthStep,
    apply_candidate,
    candidate_increment,
    choose,
)
from nas.growing.gauss_newton import GaussNewtonConfig, learn_morphism
from nas.growing.sites import (
    Increment,
    IncrementHook,
    Site,
    growth_sites,
    norm_statistics,
    pre_activations,
)
from nas.growing.statistics import collect_site_statistics

logger = logging.getLogger(__name__)


def _fits(site: Site, k: int, budget: int | None) -> bool:
    return budget is None or site.added_parameters(k) <= budget


def _default_fan_in(site: Site, k: int, generator: torch.Generator, gain: float = 1.0) -> Tensor:
    """PyTorch-default-like uniform fan-in in ``[-gain, gain] / sqrt(fan_in)``."""
    weight = site.producer_layer.weight
    shape = site.fan_in_shape(k)
    bound = gain / math.sqrt(math.prod(shape[1:]))
    draw = torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    return draw.to(weight)


def _random_candidate(context: GrowthContext, model: nn.Sequential) -> Candidate | None:
    sites = [s for s in growth_sites(model) if _fits(s, context.units, context.max_new_params)]
    if not sites:
        return None
    site = sites[int(torch.randint(len(sites), (1,), generator=context.generator))]
    bias = None if site.producer_layer.bias is None else torch.zeros(
        context.units, dtype=site.producer_layer.weight.dtype,
        device=site.producer_layer.weight.device)
    return Candidate(
        site.index, site.name, context.units, _default_fan_in(site, context.units,
                                                              context.generator),
        bias, None, None, score=0.0, num_params=site.added_parameters(context.units),
        predicted_change=0.0,
    )


@dataclass
class RandomGrowth:
    """Random site, random fan-in, zero fan-out (function preserving), no scoring."""

    name: str = "random"

    def grow(self, context: GrowthContext) -> GrowthStep:
        """Add ``k`` units at ``layers_per_round`` random sites."""
        applied = []
        for _ in range(context.layers_per_round):
            left = context.max_new_params
            if left is not None:
                left -= sum(c.num_params for c in applied)
            candidate = _random_candidate(
                copy.copy(context) if left is None else _with_budget(context, left),
                context.model,
            )
            if candidate is None:
                break
            apply_candidate(context.model, candidate, context.optimizer)
            applied.append(candidate)
        return GrowthStep(context.model, context.optimizer, applied, list(applied))


def _with_budget(context: GrowthContext, budget: int) -> GrowthContext:
    clone = copy.copy(context)
    clone.max_new_params = budget
    return clone


@dataclass
class NashSearch:
    """NASH-style random search: ``children`` random children trained ``child_epochs``, best kept.

    Attributes:
        children: Number of children per round.
        child_epochs: Training epochs of each child (search compute).
        name: Name in logs and metrics.
    """

    children: int = 4
    child_epochs: int = 1
    name: str = "nash"

    def grow(self, context: GrowthContext) -> GrowthStep:
        """Grow ``children`` copies at random, train each briefly, keep the best by val loss."""
        best = None
        tried = []
        for _ in range(self.children):
            child, optimizer = copy.deepcopy((context.model, context.optimizer))
            grown = RandomGrowth().grow(_for_model(context, child, optimizer))
            if not grown.applied:
                break
            context.train(child, optimizer, self.child_epochs)
            val = _validation_loss(child, context)
            context.counter.add_search(len(context.val_inputs), 0)
            candidate = grown.applied[0]
            candidate.score = -val
            tried.extend(grown.applied)
            if best is None or val < best[0]:
                best = (val, child, optimizer, grown.applied)
        if best is None:
            return GrowthStep(context.model, context.optimizer, [], [])
        return GrowthStep(best[1], best[2], best[3], tried)


def _for_model(context: GrowthContext, model: nn.Sequential, optimizer) -> GrowthContext:
    clone = copy.copy(context)
    clone.model, clone.optimizer = model, optimizer
    return clone


@torch.no_grad()
def _validation_loss(model: nn.Module, context: GrowthContext) -> float:
    was_training = model.training
    model.eval()
    value = float(per_example_loss(model(context.val_inputs), context.val_targets,
                                   context.loss).mean())
    model.train(was_training)
    return value


@dataclass
class GradMaxGrowth:
    r"""GradMax-like growth: sites in turn; fan-out from the SVD of :math:`C`; fan-in near zero.

    Attributes:
        stat_examples: Examples of the one forward/backward statistics pass.
        fan_in_scale: Fan-in = this times a default random draw (GradMax uses 0 with
            :math:`\sigma'(0) = 1`; with ReLU, whose derivative at 0 is 0 in PyTorch, a zero
            fan-in would never move, so a small one is used).
        fan_out_scale: Column norm of the new fan-out relative to the mean existing column norm.
        name: Name in logs and metrics.
    """

    stat_examples: int = 512
    fan_in_scale: float = 1e-2
    fan_out_scale: float = 0.5
    name: str = "gradmax"

    def grow(self, context: GrowthContext) -> GrowthStep:
        """Grow the next site of the schedule."""
        with context.counter.timing("search"):
            sites = [s for s in growth_sites(context.model)
                     if _fits(s, context.units, context.max_new_params)]
            if not sites:
                return GrowthStep(context.model, context.optimizer, [], [])
            site = sites[(context.round - 1) % len(sites)]
            inputs, targets = context.stat_batch(self.stat_examples)
            fan_out, value = self._fan_out(context, site, inputs, targets)
            context.counter.add_search(len(inputs), len(inputs))
            weight = site.producer_layer.weight
            bias = None if site.producer_layer.bias is None else torch.zeros(
                context.units, dtype=weight.dtype, device=weight.device)
            candidate = Candidate(
                site.index, site.name, context.units,
                _default_fan_in(site, context.units, context.generator, self.fan_in_scale),
                bias, fan_out, None, score=value,
                num_params=site.added_parameters(context.units),
            )
        apply_candidate(context.model, candidate, context.optimizer)
        return GrowthStep(context.model, context.optimizer, [candidate], [candidate])

    def _fan_out(
        self, context: GrowthContext, site: Site, inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, float]:
        model, k = context.model, context.units
        producer, consumer = site.producer_layer, site.consumer_layer
        was_training = model.training
        model.eval()
        collector = StatisticsCollector({"p": producer, "q": consumer}, keep_samples=True)
        with collector, torch.enable_grad():
            total = per_example_loss(model(inputs), targets, context.loss).sum()
            torch.autograd.grad(total, [producer.weight, consumer.weight])
        model.train(was_training)
        rows, _ = collector.samples("p")
        _, grads = collector.samples("q")
        columns = consumer.weight.detach().to(torch.float64)
        column_norm = columns.transpose(0, 1).reshape(columns.shape[1], -1).norm(dim=1).mean()
        shape = site.fan_out_shape(k)
        if rows.shape[1] == grads.shape[1] and site.positions == 1:
            cross = torch.einsum("nlp,nlq->pq", rows, grads) / len(inputs)
            _, singular, vh = torch.linalg.svd(cross, full_matrices=False)
            top = vh[:k].T
            value = float(singular[:k].pow(2).sum())
        else:
            # NOTE: GradMax's grow matrix for a consumer behind nn.Flatten (or with another
            # spatial size) is not implemented; the fan-out directions are then random.
            q = shape[0]
            top = torch.linalg.qr(torch.randn(q, k, generator=context.generator,
                                              dtype=torch.float64))[0]
            value = 0.0
        top = top * self.fan_out_scale * column_norm
        fan_out = torch.zeros(shape, dtype=torch.float64, device=top.device)
        if isinstance(consumer, nn.Linear):
            fan_out[:, : k * site.positions : site.positions] = top
        else:
            fan_out[:, :, shape[2] // 2, shape[3] // 2] = top
        return fan_out.to(consumer.weight), value


@dataclass
class TinyGrowth:
    r"""TINY-like growth: identity curvature, closed-form fan-in and fan-out, line-searched size.

    Attributes:
        stat_examples: Examples of the statistics pass (scores are in-sample, as in TINY).
        scales: Amplitudes :math:`\gamma` tried on the true loss for the chosen candidate.
        name: Name in logs and metrics.
    """

    stat_examples: int = 512
    scales: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01)
    name: str = "tiny"

    def grow(self, context: GrowthContext) -> GrowthStep:
        """Score all sites with the identity model, insert the best with a line-searched size."""
        config = GaussNewtonConfig(damping=0.0, curvature="identity", fan_in_steps=0)
        with context.counter.timing("search"):
            sites = growth_sites(context.model)
            inputs, targets = context.stat_batch(self.stat_examples)
            stats = collect_site_statistics(context.model, sites, inputs, targets,
                                            context.loss, curvature_samples=1,
                                            generator=context.generator)
            n = len(inputs)
            context.counter.add_search(n, 2 * n)
            candidates = []
            for site in sites:
                if not _fits(site, context.units, context.max_new_params):
                    continue
                learned = learn_morphism(site, stats[site.index], stats[site.index],
                                         context.units, config, context.generator)
                candidates.append(Candidate(
                    site.index, site.name, context.units, learned.fan_in, learned.bias,
                    learned.fan_out, learned.norm, score=learned.score,
                    num_params=site.added_parameters(context.units)))
            chosen = choose(context, candidates)
            for candidate in chosen:
                if candidate.fan_out is None:
                    continue
                site = next(s for s in sites if s.index == candidate.site_index)
                gamma = _line_search(context, site, candidate, inputs, targets, self.scales)
                candidate.info["scale"] = gamma
                candidate.fan_out = gamma * candidate.fan_out
        for candidate in sorted(chosen, key=lambda c: c.site_index, reverse=True):
            apply_candidate(context.model, candidate, context.optimizer)
        return GrowthStep(context.model, context.optimizer, chosen, candidates)


@torch.no_grad()
def _line_search(
    context: GrowthContext, site: Site, candidate: Candidate, inputs: Tensor, targets: Tensor,
    scales: tuple[float, ...],
) -> float:
    """The amplitude among ``scales`` (or 0) with the lowest true loss on ``inputs``."""
    model = context.model
    was_training = model.training
    model.eval()
    best_scale = 0.0
    best = float(per_example_loss(model(inputs), targets, context.loss).mean())
    for scale in scales:
        with IncrementHook([candidate_increment(site, candidate, scale)]):
            value = float(per_example_loss(model(inputs), targets, context.loss).mean())
        if value < best:
            best, best_scale = value, scale
    model.train(was_training)
    context.counter.add_search(len(inputs) * (len(scales) + 1), 0)
    return best_scale


@dataclass
class FireflyGrowth:
    """Firefly-like growth: train a pool of new units on the real loss, keep the best by gate score.

    Attributes:
        pool: Candidate units per site (at least ``k``; default ``4 k``).
        steps: RMSprop steps on minibatches of the training set.
        lr: RMSprop step size.
        penalty: L2 penalty on the candidates' fan-out.
        clip: Fan-out entries are clipped to ``clip`` times the consumer's mean absolute weight.
        stat_examples: Examples of the scoring pass.
        name: Name in logs and metrics.
    """

    pool: int | None = None
    steps: int = 50
    lr: float = 1e-3
    penalty: float = 1e-4
    clip: float = 1.0
    stat_examples: int = 512
    name: str = "firefly"
    _params: dict = field(default_factory=dict, repr=False)

    def grow(self, context: GrowthContext) -> GrowthStep:
        """Train candidate pools at all sites, insert the best ``k`` units of the best site."""
        k = context.units
        pool = max(k, self.pool if self.pool is not None else 4 * k)
        model = context.model
        with context.counter.timing("search"):
            sites = [s for s in growth_sites(model) if _fits(s, k, context.max_new_params)]
            if not sites:
                return GrowthStep(model, context.optimizer, [], [])
            params = self._init(context, sites, pool)
            was_training = model.training
            model.eval()
            optimizer = torch.optim.RMSprop([t for p in params.values() for t in p[:3]
                                             if t is not None], lr=self.lr)
            for _ in range(self.steps):
                inputs, targets = context.stat_batch(context.batch_size)
                with torch.enable_grad():
                    with IncrementHook(self._increments(sites, params, None)):
                        value = per_example_loss(model(inputs), targets, context.loss).mean()
                    value = value + self.penalty * sum(p[2].pow(2).sum() for p in params.values())
                    optimizer.zero_grad()
                    leaves = [t for p in params.values() for t in p[:3] if t is not None]
                    grads = torch.autograd.grad(value, leaves)
                for leaf, grad in zip(leaves, grads, strict=True):
                    leaf.grad = grad
                optimizer.step()
                with torch.no_grad():
                    for site in sites:
                        limit = params[site.index][4]
                        params[site.index][2].clamp_(-limit, limit)
                context.counter.add_search(len(inputs), len(inputs))
            scores = self._gate_scores(context, sites, params)
            model.train(was_training)
            candidates = []
            for site in sites:
                top = torch.argsort(scores[site.index], descending=True)[:k]
                fan_in, bias, fan_out, norm, _ = params[site.index]
                chosen_out = _units_of_fan_out(site, fan_out.detach(), top, pool)
                candidates.append(Candidate(
                    site.index, site.name, k, fan_in.detach()[top],
                    None if bias is None else bias.detach()[top], chosen_out,
                    None if norm is None else type(norm)(norm.mean[top], norm.var[top], norm.eps),
                    score=float(scores[site.index][top].sum()),
                    num_params=site.added_parameters(k)))
            chosen = choose(context, candidates)
        for candidate in sorted(chosen, key=lambda c: c.site_index, reverse=True):
            apply_candidate(model, candidate, context.optimizer)
        return GrowthStep(model, context.optimizer, chosen, candidates)

    def _init(self, context: GrowthContext, sites: list[Site], pool: int) -> dict:
        inputs, _ = context.stat_batch(context.batch_size)
        captured = {}
        handles = [s.producer_layer.register_forward_pre_hook(
            lambda m, a, i=s.index: captured.__setitem__(i, a[0].detach())) for s in sites]
        with torch.no_grad():
            context.model.eval()
            context.model(inputs)
            context.model.train()
        for handle in handles:
            handle.remove()
        params = {}
        for site in sites:
            weight = site.consumer_layer.weight
            fan_in = _default_fan_in(site, pool, context.generator).requires_grad_(True)
            bias = None
            if site.producer_layer.bias is not None:
                bias = torch.zeros(pool, dtype=weight.dtype, device=weight.device,
                                   requires_grad=True)
            norm = None
            if site.norm is not None:
                with torch.no_grad():
                    norm = norm_statistics(site, pre_activations(site, captured[site.index],
                                                                 fan_in, bias))
            fan_out = torch.zeros(site.fan_out_shape(pool), dtype=weight.dtype,
                                  device=weight.device, requires_grad=True)
            limit = self.clip * float(weight.detach().abs().mean())
            params[site.index] = [fan_in, bias, fan_out, norm, limit]
        return params

    @staticmethod
    def _increments(sites: list[Site], params: dict, gates: dict | None) -> list[Increment]:
        increments = []
        for site in sites:
            fan_in, bias, fan_out, norm, _ = params[site.index]
            if gates is not None:
                gate = gates[site.index]
                if isinstance(site.consumer_layer, nn.Linear):
                    fan_out = fan_out * gate.repeat_interleave(site.positions)[None, :]
                else:
                    fan_out = fan_out * gate[None, :, None, None]
            increments.append(Increment(site, fan_in, bias, fan_out, norm))
        return increments

    def _gate_scores(self, context: GrowthContext, sites: list[Site], params: dict) -> dict:
        inputs, targets = context.stat_batch(self.stat_examples)
        some = params[sites[0].index][2]
        gates = {s.index: torch.ones(params[s.index][2].shape[1] // s.positions
                                     if isinstance(s.consumer_layer, nn.Linear)
                                     else params[s.index][2].shape[1],
                                     dtype=some.dtype, device=some.device, requires_grad=True)
                 for s in sites}
        with torch.enable_grad(), IncrementHook(self._increments(sites, params, gates)):
            value = per_example_loss(context.model(inputs), targets, context.loss).mean()
            grads = torch.autograd.grad(value, list(gates.values()))
        context.counter.add_search(len(inputs), len(inputs))
        return {index: -grad for index, grad in zip(gates, grads, strict=True)}


def _units_of_fan_out(site: Site, fan_out: Tensor, units: Tensor, pool: int) -> Tensor:
    """The fan-out columns of the chosen pool units, in `nas.morphism.add_inputs` layout."""
    if isinstance(site.consumer_layer, nn.Linear):
        blocks = fan_out.reshape(fan_out.shape[0], pool, site.positions)
        return blocks[:, units].reshape(fan_out.shape[0], -1)
    return fan_out[:, units]


__all__ = [
    "FireflyGrowth",
    "GradMaxGrowth",
    "NashSearch",
    "RandomGrowth",
    "TinyGrowth",
]
