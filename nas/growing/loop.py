r"""The growth loop: seed, rounds of scoring and insertion, training between rounds, stopping.

.. code-block:: text

    train(seed, initial_epochs)
    for round r = 1..rounds:
        step = strategy.grow(context)          # score sites, select within the budget, insert
        stop if nothing was inserted            # no site fits the budget / no predicted gain
        train(net, epochs_per_round)
        record widths, predicted vs actual loss change, train/val loss and accuracy
        checkpoint
        stop if the parameter budget is reached or validation loss stalled `patience` rounds
    train(net, final_epochs); evaluate on the test split; checkpoint

State (network, optimizer state, random generator, compute counters, history) is saved after
every round and after the final training with atomic writes; `run_growth` with ``resume=True``
continues from the last checkpoint and reproduces the uninterrupted run exactly on the same
device. All randomness (data order, statistics batches, random fan-ins) comes from one CPU
generator seeded by ``config.seed``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from defbound.atomic_io import save_torch
from defbound.curvature import Loss
from nas.growing.candidates import GrowthContext, GrowthStep, GrowthStrategy
from nas.growing.compute import ComputeCounter
from nas.growing.data import Split, augmentation
from nas.growing.seeds import widths_of
from nas.growing.training import count_parameters, evaluate, train_epochs

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class GrowthConfig:
    """Schedule, budget and stopping rules of `run_growth`.

    Attributes:
        rounds: Maximum number of growth rounds.
        units: Units per candidate ``k``.
        layers_per_round: Sites that may grow per round.
        initial_epochs: Training epochs of the seed before round 1.
        epochs_per_round: Training epochs after each growth step.
        final_epochs: Training epochs after the last round.
        batch_size: Minibatch size.
        lr: Adam step size.
        weight_decay: Adam weight decay.
        max_params: Parameter budget of the grown network (``None``: no limit).
        patience: Stop after this many rounds without a new best validation loss.
        min_relative_score: Only insert candidates whose score exceeds this times the current
            training loss (methods with calibrated scores); ``0`` keeps any positive score.
        stop_without_gain: Stop when no candidate has a score above the threshold; otherwise
            the best candidate is inserted with zero fan-out and growth goes on (default, so
            that every method adds the same units per round).
        augment: ``None``, ``"crop"`` or ``"crop_flip"`` (images only, see `nas.growing.data`).
        seed: Seed of the run's random generator.
    """

    rounds: int = 8
    units: int = 2
    layers_per_round: int = 1
    initial_epochs: int = 5
    epochs_per_round: int = 3
    final_epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_params: int | None = None
    patience: int | None = None
    min_relative_score: float = 0.0
    stop_without_gain: bool = False
    augment: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        counts = {"rounds": self.rounds, "initial_epochs": self.initial_epochs,
                  "epochs_per_round": self.epochs_per_round, "final_epochs": self.final_epochs}
        for name, value in counts.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.units < 1 or self.layers_per_round < 1 or self.batch_size < 1:
            raise ValueError("units, layers_per_round and batch_size must be >= 1")
        if not self.lr > 0 or self.min_relative_score < 0:
            raise ValueError("lr must be > 0 and min_relative_score >= 0")
        if self.augment not in (None, "crop", "crop_flip"):
            raise ValueError(f"augment must be None, 'crop' or 'crop_flip', got {self.augment!r}")


@dataclass
class GrowthResult:
    """Outcome of `run_growth`.

    Attributes:
        model: The final network.
        history: One record per round (round 0: the trained seed), JSON-serialisable.
        final: Test metrics and totals after the final training.
        counter: Compute totals.
        stopped: Why growth stopped.
    """

    model: nn.Sequential
    history: list[dict]
    final: dict
    counter: ComputeCounter
    stopped: str


@dataclass
class _State:
    round: int
    phase: str
    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    counter: ComputeCounter
    history: list[dict] = field(default_factory=list)
    stopped: str = ""
    final: dict = field(default_factory=dict)


class NoGrowth:
    """The strategy of a static network: never adds anything."""

    name = "static"

    def grow(self, context: GrowthContext) -> GrowthStep:
        """Return an empty step."""
        return GrowthStep(context.model, context.optimizer, [], [])


def make_optimizer(model: nn.Module, config: GrowthConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters with the configured step size and weight decay."""
    return torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr,
        weight_decay=config.weight_decay,
    )


def run_growth(
    strategy: GrowthStrategy,
    model: nn.Sequential,
    data: Split,
    config: GrowthConfig,
    *,
    loss: Loss = "cross_entropy",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_round: Callable[[dict], None] | None = None,
) -> GrowthResult:
    """Grow ``model`` with ``strategy`` on ``data`` (see the module docstring).

    Args:
        strategy: A growth method (`nas.growing.gauss_newton.GaussNewtonGrowth`, a baseline).
        model: The seed network (edited in place; the result's ``model`` is the final one).
        data: Train/validation/test tensors on the model's device.
        config: `GrowthConfig`.
        loss: ``"cross_entropy"`` or ``"mse"``.
        checkpoint: File to save the state to after every round (and to resume from).
        resume: Continue from ``checkpoint`` if it exists.
        on_round: Called with each round's record after it is checkpointed (progress display).

    Returns:
        `GrowthResult`.

    Raises:
        ValueError: If the checkpoint belongs to another method or configuration.
    """
    path = Path(checkpoint) if checkpoint is not None else None
    augment = augmentation(config.augment)
    if resume and path is not None and path.exists():
        state = _load(path, strategy, config)
        logger.info("resumed %s from %s at round %d (%s)", strategy.name, path, state.round,
                    state.phase)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        state = _State(0, "seed", model, make_optimizer(model, config), generator,
                       ComputeCounter())

    def train(net: nn.Module, optimizer: torch.optim.Optimizer, epochs: int,
              kind: str = "train") -> float:
        return train_epochs(net, optimizer, data.train_inputs, data.train_targets, loss, epochs,
                            config.batch_size, state.generator, counter=state.counter, kind=kind,
                            augment=augment)

    if state.phase == "seed":
        train(state.model, state.optimizer, config.initial_epochs)
        state.history.append(_record(state, data, loss, None, 0))
        state.phase = "grow"
        _save(path, state, strategy, config)
        if on_round is not None:
            on_round(state.history[-1])

    best_val, stale = _best_so_far(state.history)
    while state.phase == "grow":
        if state.round >= config.rounds:
            state.stopped = state.stopped or "rounds"
            state.phase = "final"
            break
        state.round += 1
        params = count_parameters(state.model)
        budget = None if config.max_params is None else config.max_params - params
        train_loss = state.history[-1]["train_loss"]
        context = GrowthContext(
            state.model, state.optimizer, data.train_inputs, data.train_targets,
            data.val_inputs, data.val_targets, loss, config.units, config.layers_per_round,
            budget, state.generator, state.counter, state.round, config.batch_size,
            lambda net: make_optimizer(net, config),
            lambda net, opt, epochs: train(net, opt, epochs, "search"),
            min_score=config.min_relative_score * train_loss,
            stop_without_gain=config.stop_without_gain,
        )
        step = strategy.grow(context)
        state.model, state.optimizer = step.model, step.optimizer
        if not step.applied:
            state.round -= 1
            state.stopped = "no candidate fits the budget or predicts a gain"
            state.phase = "final"
            break
        after_growth = evaluate(state.model, data.train_inputs, data.train_targets, loss)[0]
        train(state.model, state.optimizer, config.epochs_per_round)
        record = _record(state, data, loss, step, state.round)
        record["train_loss_after_growth"] = after_growth
        state.history.append(record)
        if record["val_loss"] < best_val:
            best_val, stale = record["val_loss"], 0
        else:
            stale += 1
        if config.max_params is not None and record["params"] >= config.max_params:
            state.stopped, state.phase = "parameter budget reached", "final"
        elif config.patience is not None and stale >= config.patience:
            state.stopped, state.phase = "validation loss stopped improving", "final"
        _save(path, state, strategy, config)
        if on_round is not None:
            on_round(record)

    if state.phase == "final":
        train(state.model, state.optimizer, config.final_epochs)
        state.final = _final(state, data, loss)
        state.final["epochs"] = total_epochs(config, state.round)
        state.phase = "done"
        _save(path, state, strategy, config)
    return GrowthResult(state.model, state.history, state.final, state.counter,
                        state.stopped or "rounds")


def train_static(
    model: nn.Sequential,
    data: Split,
    config: GrowthConfig,
    epochs: int,
    *,
    loss: Loss = "cross_entropy",
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> GrowthResult:
    """Train a fixed network from scratch for ``epochs`` epochs with the loop's optimiser.

    Args:
        model: The network.
        data: The data split.
        config: Optimiser, batch size, augmentation and seed are taken from it.
        epochs: Training epochs.
        loss: The loss.
        checkpoint: Optional checkpoint file.
        resume: Continue from ``checkpoint``.

    Returns:
        `GrowthResult` with a single record.
    """
    static = GrowthConfig(**{**asdict(config), "rounds": 0, "initial_epochs": epochs,
                             "final_epochs": 0, "max_params": None})
    return run_growth(NoGrowth(), model, data, static, loss=loss, checkpoint=checkpoint,
                      resume=resume)


def total_epochs(config: GrowthConfig, rounds: int | None = None) -> int:
    """Training epochs of a growth run with ``rounds`` rounds (default ``config.rounds``)."""
    rounds = config.rounds if rounds is None else rounds
    return config.initial_epochs + rounds * config.epochs_per_round + config.final_epochs


def _best_so_far(history: list[dict]) -> tuple[float, int]:
    best, stale = math.inf, 0
    for record in history:
        if record["val_loss"] < best:
            best, stale = record["val_loss"], 0
        else:
            stale += 1
    return best, stale


def _record(state: _State, data: Split, loss: Loss, step: GrowthStep | None,
            round_: int) -> dict:
    train_loss, train_acc = evaluate(state.model, data.train_inputs, data.train_targets, loss)
    val_loss, val_acc = evaluate(state.model, data.val_inputs, data.val_targets, loss)
    record = {
        "round": round_,
        "widths": list(widths_of(state.model)),
        "params": count_parameters(state.model),
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "compute": state.counter.as_dict(),
        "applied": [],
        "candidates": [],
        "spearman": None,
    }
    if step is not None:
        record["applied"] = [c.summary() for c in step.applied]
        record["candidates"] = [c.summary() for c in step.candidates]
        record["spearman"] = rank_correlation(step.candidates)
    return record


def rank_correlation(candidates: list) -> float | None:
    """Spearman correlation of predicted and actual loss change (``None`` below 3 candidates)."""
    pairs = [(c.predicted_change, c.actual_change) for c in candidates
             if c.predicted_change is not None and c.actual_change is not None]
    if len(pairs) < 3:
        return None
    predicted, actual = np.array(pairs).T
    if np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return None
    return float(spearmanr(predicted, actual).statistic)


def _final(state: _State, data: Split, loss: Loss) -> dict:
    test_loss, test_acc = evaluate(state.model, data.test_inputs, data.test_targets, loss)
    train_loss, train_acc = evaluate(state.model, data.train_inputs, data.train_targets, loss)
    val_loss, val_acc = evaluate(state.model, data.val_inputs, data.val_targets, loss)
    return {
        "widths": list(widths_of(state.model)),
        "params": count_parameters(state.model),
        "rounds": state.round,
        "train_loss": train_loss, "train_acc": train_acc,
        "val_loss": val_loss, "val_acc": val_acc,
        "test_loss": test_loss, "test_acc": test_acc,
        "compute": state.counter.as_dict(),
        "stopped": state.stopped or "rounds",
    }


def _save(path: Path | None, state: _State, strategy: GrowthStrategy,
          config: GrowthConfig) -> None:
    if path is None:
        return
    save_torch(path, {
        "version": CHECKPOINT_VERSION,
        "strategy": strategy.name,
        "config": asdict(config),
        "round": state.round,
        "phase": state.phase,
        "model": state.model,
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "counter": asdict(state.counter),
        "history": state.history,
        "stopped": state.stopped,
        "final": state.final,
    })


def _load(path: Path, strategy: GrowthStrategy, config: GrowthConfig) -> _State:
    # NOTE: the checkpoint pickles the network module itself (its architecture changes while it
    # grows), so it is loaded with weights_only=False: only load checkpoints you wrote.
    saved = torch.load(path, weights_only=False)
    if saved.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a growth checkpoint of version {CHECKPOINT_VERSION}")
    if saved["strategy"] != strategy.name or saved["config"] != asdict(config):
        raise ValueError(
            f"{path} was written by method {saved['strategy']!r} with another configuration; "
            "use a fresh output folder or the same settings to resume"
        )
    model = saved["model"]
    optimizer = make_optimizer(model, config)
    optimizer.load_state_dict(saved["optimizer"])
    generator = torch.Generator().manual_seed(config.seed)
    generator.set_state(saved["generator"])
    return _State(saved["round"], saved["phase"], model, optimizer, generator,
                  ComputeCounter(**saved["counter"]), saved["history"], saved["stopped"],
                  saved["final"])
