r"""Shared training and evaluation loop for PET search and its baselines.

Every method (the searched architecture, BitFit, LoRA, AdaLoRA, random and magnitude pruning,
full fine-tuning) is trained by :func:`fit` with the same :class:`TrainConfig`, the same batches
(drawn from a seeded generator) and the same learning-rate schedule, so runs at equal budget
differ only in which parameters are trainable. The schedule is AdamW with linear warm-up and
linear decay:

.. math::

    \eta_t = \eta \cdot \min\Big(\frac{t + 1}{w},\; \frac{T - t}{T - w}\Big),
    \qquad t = 0..T-1,\ w = \max(1, \lfloor \rho T \rfloor),

with ``T`` steps and warm-up fraction ``rho``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class TrainConfig:
    """Schedule shared by every method of a comparison.

    Args:
        steps: optimizer steps ``T`` (``>= 1``).
        batch_size: examples per step.
        lr: peak learning rate of the PET parameters and the head.
        full_lr: peak learning rate for full fine-tuning (all weights).
        adalora_lr: peak learning rate of the AdaLoRA baseline (``None``: ``lr``). AdaLoRA's
            singular values start at zero and its orthogonality penalty pulls on the factors,
            so on short schedules it needs a larger rate than LoRA; choose it on validation.
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction ``rho`` of the steps spent in linear warm-up, in ``[0, 1)``.
        max_length: token limit per text (longer texts are truncated).
        eval_batch_size: examples per evaluation batch.

    Raises:
        ValueError: for a non-positive count or rate, or a warm-up fraction outside ``[0, 1)``.
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    full_lr: float = 5e-5
    adalora_lr: float | None = None
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_length: int = 64
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_batch_size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "full_lr", "adalora_lr"):
            if name == "adalora_lr" and self.adalora_lr is None:
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction!r}")


class Encoded(NamedTuple):
    """A tokenised split: padded ids, attention mask and labels (``n`` rows, CPU tensors)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(split: Any, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenise a split with ``text`` and ``label`` columns.

    Args:
        split: a ``datasets.Dataset`` (or any mapping of column name to list).
        tokenizer: a Hugging Face tokenizer.
        max_length: truncation length.

    Returns:
        the encoded split, padded to its longest text.

    Raises:
        ValueError: if the split is empty or lacks a column.
    """
    columns = split.column_names if hasattr(split, "column_names") else list(split)
    for col in ("text", "label"):
        if col not in columns:
            raise ValueError(f"split has no {col!r} column; it has {list(columns)}")
    texts = list(split["text"])
    if not texts:
        raise ValueError("cannot encode an empty split")
    enc = tokenizer(
        texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    labels = torch.as_tensor(list(split["label"]), dtype=torch.long)
    return Encoded(enc["input_ids"], enc["attention_mask"], labels)


def _trim(data: Encoded, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = data.attention_mask[idx]
    length = max(int(mask.sum(dim=1).max()), 1)
    return {
        "input_ids": data.input_ids[idx, :length],
        "attention_mask": mask[:, :length],
        "labels": data.labels[idx],
    }


def iterate_batches(data: Encoded, batch_size: int, steps: int, seed: int) -> Iterator[Batch]:
    """Yield ``steps`` training batches from seeded epoch-wise permutations.

    Batches are trimmed to their longest text, so short batches cost less.

    Args:
        data: the encoded training split.
        batch_size: examples per batch (at most the split size).
        steps: number of batches.
        seed: seed of the permutations; the same seed gives the same batches.

    Yields:
        batches with ``input_ids``, ``attention_mask`` (``(b, L)``) and ``labels`` (``(b,)``).
    """
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(data))
    order = torch.randperm(len(data), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + size > len(order):
            order = torch.randperm(len(data), generator=gen)
            pos = 0
        yield _trim(data, order[pos : pos + size])
        pos += size


def to_device(batch: Batch, device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """Move every tensor of a batch to ``device`` (no-op for ``None``)."""
    if device is None:
        return dict(batch)
    return {k: v.to(device) for k, v in batch.items()}


def cross_entropy_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy ``-(1/n) sum_i log p(y_i | x_i)`` of a classifier returning ``logits``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return functional.cross_entropy(logits.float(), batch["labels"])


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own ``loss`` output (e.g. AdaLoRA adds its orthogonality penalty there)."""
    return model(**batch).loss


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    """Multiplier of the peak rate at ``step`` (module docstring formula)."""
    warm = max(1, math.floor(warmup_fraction * steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(1, steps - warm))


@dataclass
class FitInfo:
    """Diagnostics of one :func:`fit` call.

    Attributes:
        steps: optimizer steps taken.
        losses: training loss per step.
        seconds: wall-clock time of the loop.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def final_loss(self, window: int = 20) -> float:
        """Mean training loss over the last ``window`` steps (``nan`` without steps)."""
        tail = self.losses[-window:]
        return float(sum(tail) / len(tail)) if tail else float("nan")


def fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    data: Encoded,
    config: TrainConfig,
    seed: int,
    *,
    lr: float | None = None,
    steps: int | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    after_backward: Callable[[int], None] | None = None,
    optimizer_hook: Callable[[torch.optim.Optimizer], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "train",
) -> FitInfo:
    """Train ``params`` of ``model`` with AdamW on seeded batches of ``data``.

    Dropout is seeded with ``torch.manual_seed(seed)``, batches with ``seed``, so a call is
    reproducible on CPU whatever ran before it.

    Args:
        model: the model (put in train mode for the loop, eval mode afterwards).
        params: the trainable parameters.
        data: the encoded training split.
        config: the schedule.
        seed: seed of batches and dropout.
        lr: peak learning rate (default ``config.lr``).
        steps: number of steps (default ``config.steps``).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        after_backward: called with the step index after ``backward`` and ``step``, before
            ``zero_grad`` (AdaLoRA's rank allocation).
        optimizer_hook: called once with the optimizer (e.g. to register mask re-application).
        device: device of the batches.
        progress: show a tqdm progress bar.
        desc: progress-bar label.

    Returns:
        the fit diagnostics.

    Raises:
        ValueError: if there is no trainable parameter.
    """
    import time

    from tqdm.auto import tqdm

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("fit got no trainable parameter")
    steps = config.steps if steps is None else steps
    peak = config.lr if lr is None else lr
    optimizer = torch.optim.AdamW(params, lr=peak, weight_decay=config.weight_decay)
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    torch.manual_seed(seed)
    info = FitInfo(steps=steps)
    start = time.perf_counter()
    model.train()
    batches = iterate_batches(data, config.batch_size, steps, seed)
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False)
    for t, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = peak * lr_factor(t, steps, config.warmup_fraction)
        loss = loss_fn(model, to_device(batch, device))
        loss.backward()
        optimizer.step()
        if after_backward is not None:
            after_backward(t)
        optimizer.zero_grad(set_to_none=True)
        info.losses.append(float(loss.detach()))
        if progress and t % 10 == 0:
            bar.set_postfix(loss=f"{info.losses[-1]:.3f}")
    model.eval()
    info.seconds = time.perf_counter() - start
    logger.info(
        "%s: %d steps, final loss %.4f, %.1f s", desc, steps, info.final_loss(), info.seconds
    )
    return info


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Encoded,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier on an encoded split.

    Args:
        model: classifier returning ``logits``.
        data: the encoded split.
        batch_size: examples per batch.
        device: device of the batches.

    Returns:
        ``{"accuracy": ..., "loss": ..., "n": ...}``.
    """
    model.eval()
    correct, total_loss = 0, 0.0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch = to_device(_trim(data, idx), device)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        total_loss += float(functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    n = len(data)
    return {"accuracy": correct / n, "loss": total_loss / n, "n": n}


@dataclass
class PetResult:
    """Record of one method's run (searched architecture or baseline).

    Attributes:
        method: method name (``"search"``, ``"bitfit"``, ``"lora-qv"``, ...).
        budget: the parameter budget asked for (``None`` for full fine-tuning).
        n_params: trainable parameters of the method, head excluded (for pruned supernets: the
            unmasked PET entries).
        head_params: trainable head parameters (not budgeted).
        seed: seed of the run.
        metrics: evaluation results per split (``{"test": {"accuracy": ...}}``).
        seconds: wall-clock seconds per stage.
        train_loss: mean training loss over the last steps.
        details: method-specific record (architecture, ranks, allocation, prune rounds, ...).
    """

    method: str
    budget: int | None
    n_params: int
    head_params: int
    seed: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    train_loss: float = float("nan")
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Test accuracy (``nan`` when the run was not evaluated on a test split)."""
        return float(self.metrics.get("test", {}).get("accuracy", float("nan")))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary of the record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PetResult:
        """Rebuild a record written by :meth:`to_dict`."""
        return cls(**dict(record))
