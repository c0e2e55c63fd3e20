"""Minibatch training and evaluation used between growth rounds and for static baselines."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from defbound.curvature import Loss, per_example_loss
from nas.growing.compute import ComputeCounter

logger = logging.getLogger(__name__)

Augment = Callable[[Tensor, torch.Generator], Tensor]


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets: Tensor,
    loss: Loss,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    counter: ComputeCounter | None = None,
    kind: str = "train",
    augment: Augment | None = None,
) -> float:
    r"""Train for ``epochs`` passes over the data in shuffled minibatches; return the mean loss.

    Each step minimises :math:`\frac1b \sum_{i \in \text{batch}} \ell_i` with ``optimizer``. The
    order comes from ``generator`` (a CPU generator), so a run is reproducible and resumable.

    Args:
        model: The network (put in training mode).
        optimizer: Optimizer over its parameters.
        inputs: ``(n, ...)``.
        targets: Targets for ``loss``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        epochs: Number of passes (0 does nothing).
        batch_size: Minibatch size.
        generator: CPU generator for the shuffling and the augmentation.
        counter: Where to count the example passes and time.
        kind: ``"train"`` or ``"search"`` (how ``counter`` books the passes).
        augment: Optional ``(batch, generator) -> batch`` applied to each minibatch.

    Returns:
        Mean training loss over the last epoch (``nan`` if ``epochs == 0``).
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    counter = counter if counter is not None else ComputeCounter()
    model.train()
    last = float("nan")
    with counter.timing(kind):
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator).to(inputs.device)
            total, seen = 0.0, 0
            for start in range(0, len(inputs), batch_size):
                index = order[start : start + batch_size]
                batch = inputs[index]
                if augment is not None:
                    batch = augment(batch, generator)
                optimizer.zero_grad(set_to_none=True)
                value = per_example_loss(model(batch), targets[index], loss).mean()
                value.backward()
                optimizer.step()
                total += float(value.detach()) * len(index)
                seen += len(index)
                if kind == "train":
                    counter.add_train(len(index))
                else:
                    counter.add_search(len(index), len(index))
            last = total / seen
    return last


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss: Loss, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean loss and accuracy (classification; ``nan`` for ``"mse"``) in evaluation mode.

    Args:
        model: The network (evaluation mode during the call, then restored).
        inputs: ``(n, ...)``.
        targets: Targets for ``loss``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        batch_size: Evaluation batch size.

    Returns:
        ``(loss, accuracy)``.
    """
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        outputs = model(inputs[start : start + batch_size])
        batch_targets = targets[start : start + batch_size]
        total += float(per_example_loss(outputs, batch_targets, loss).sum())
        if loss == "cross_entropy":
            correct += int((outputs.argmax(dim=1) == batch_targets).sum())
    model.train(was_training)
    accuracy = correct / len(inputs) if loss == "cross_entropy" else float("nan")
    return total / len(inputs), accuracy


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
