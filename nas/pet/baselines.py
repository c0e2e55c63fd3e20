r"""Baselines for PET search, trained with the same data, seeds and schedule.

* **BitFit**: every bias of the wrapped modules (the six linear maps and two LayerNorms per
  layer and the embedding LayerNorm, i.e. the bias vectors of the supernet), plus the head.
* **LoRA q,v** through ``peft``: rank ``r`` on query and value, ``alpha = 2r``, no biases; cost
  ``sum_m r (d_in + d_out)``.
* **AdaLoRA** through ``peft`` on the same matrices: starts at rank ``init_r`` and prunes
  triplets ``(p_k, lambda_k, q_k)`` on its cubic schedule down to a total rank
  ``R = floor(B / (d_in + d_out + 1))`` (a triplet costs ``d_in + d_out + 1``), so its final
  count is at most the budget ``B``.
* **Random and magnitude pruning**: the search pipeline (:func:`nas.pet.search.run_search`) with
  random or magnitude scores instead of the loss-change estimate.
* **Full fine-tuning**: every weight, at ``TrainConfig.full_lr``; the reference.

Every function takes a fresh pre-trained classifier (modified in place), the encoded splits
and the shared :class:`~nas.pet.training.TrainConfig`, and returns a
:class:`~nas.pet.training.PetResult` whose ``n_params`` excludes the head.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from nas.pet.supernet import BERT_HEAD_MODULES, BERT_LORA_TARGETS
from nas.pet.training import (
    Encoded,
    PetResult,
    TrainConfig,
    evaluate,
    fit,
    model_loss,
)

logger = logging.getLogger(__name__)

QV_TARGETS = ("query", "value")


def _is_head(name: str, heads: Sequence[str]) -> bool:
    return any(part in heads for part in name.split("."))


def bitfit_parameters(
    model: nn.Module,
    lora_targets: str = BERT_LORA_TARGETS,
    head_modules: Sequence[str] = BERT_HEAD_MODULES,
) -> list[tuple[str, nn.Parameter]]:
    """The bias vectors BitFit tunes: biases of target linear maps and of every LayerNorm.

    The same set as the supernet's bias deltas (head and pooler excluded).

    Args:
        model: the classifier.
        lora_targets: regex of the target linear maps (as in ``SupernetConfig``).
        head_modules: head module names (excluded).

    Returns:
        ``(parameter name, bias)`` pairs in model order.
    """
    pattern = re.compile(lora_targets)
    out = []
    for name, mod in model.named_modules():
        if not name or _is_head(name, head_modules) or getattr(mod, "bias", None) is None:
            continue
        if (isinstance(mod, nn.Linear) and pattern.search(name)) or isinstance(mod, nn.LayerNorm):
            out.append((f"{name}.bias", mod.bias))
    return out


def bitfit_budget(model: nn.Module, **kwargs) -> int:
    """Number of BitFit parameters ``sum_b |b|`` (25,728 for all-MiniLM-L6-v2).

    Args:
        model: the classifier.
        **kwargs: passed to :func:`bitfit_parameters`.

    Returns:
        the count.
    """
    return sum(p.numel() for _, p in bitfit_parameters(model, **kwargs))


def _linear_shapes(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, int, int]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            out.append((name, mod.in_features, mod.out_features))
    return out


def lora_budget(model: nn.Module, r: int = 8, targets: Sequence[str] = QV_TARGETS) -> int:
    """Parameters of LoRA rank ``r`` on the named matrices: ``sum_m r (d_in,m + d_out,m)``.

    73,728 for all-MiniLM-L6-v2 with ``r = 8`` on query and value.

    Args:
        model: the classifier.
        r: LoRA rank.
        targets: last components of the target module names.

    Returns:
        the count.

    Raises:
        ValueError: if no module matches ``targets``.
    """
    shapes = _linear_shapes(model, targets)
    if not shapes:
        raise ValueError(f"no nn.Linear named {tuple(targets)} in the model")
    return sum(r * (d_in + d_out) for _, d_in, d_out in shapes)


def _result(
    method: str,
    budget: int | None,
    n_params: int,
    head_params: int,
    seed: int,
    model: nn.Module,
    data: Mapping[str, Encoded],
    config: TrainConfig,
    seconds: float,
    train_loss: float,
    device: torch.device | str | None,
    details: dict | None = None,
) -> PetResult:
    start = time.perf_counter()
    metrics = {
        split: evaluate(model, data[split], config.eval_batch_size, device)
        for split in ("validation", "test")
        if split in data
    }
    return PetResult(
        method=method,
        budget=budget,
        n_params=n_params,
        head_params=head_params,
        seed=seed,
        metrics=metrics,
        seconds={"train": seconds, "evaluate": time.perf_counter() - start},
        train_loss=train_loss,
        details=details or {},
    )


def _head_params(model: nn.Module, heads: Sequence[str] = BERT_HEAD_MODULES) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_head(n, heads)]


def run_bitfit(
    model: nn.Module,
    data: Mapping[str, Encoded],
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PetResult:
    """Train all bias vectors of :func:`bitfit_parameters` and the head.

    Args:
        model: fresh pre-trained classifier (modified in place).
        data: encoded splits (``"train"`` required).
        config: the shared schedule.
        seed: seed of batches and dropout.
        device: device of model and batches.
        progress: show a progress bar.

    Returns:
        the run's record (method ``"bitfit"``).
    """
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    biases = [p for _, p in bitfit_parameters(model)]
    head = _head_params(model)
    for p in biases + head:
        p.requires_grad_(True)
    info = fit(
        model,
        biases + head,
        data["train"],
        config,
        seed,
        device=device,
        progress=progress,
        desc="bitfit",
    )
    n = sum(p.numel() for p in biases)
    return _result(
        "bitfit",
        n,
        n,
        sum(p.numel() for p in head),
        seed,
        model,
        data,
        config,
        info.seconds,
        info.final_loss(),
        device,
    )


def _lora_counts(model: nn.Module) -> tuple[int, int]:
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    head = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    )
    return lora, head


def run_lora(
    model: nn.Module,
    data: Mapping[str, Encoded],
    config: TrainConfig,
    seed: int = 0,
    r: int = 8,
    targets: Sequence[str] = QV_TARGETS,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PetResult:
    """LoRA (``peft``) at rank ``r`` on the target matrices, ``alpha = 2r``, plus the head.

    Args:
        model: fresh pre-trained classifier (wrapped by peft).
        data: encoded splits.
        config: the shared schedule.
        seed: seed of batches, dropout and the LoRA factors.
        r: LoRA rank.
        targets: target module names (last name component).
        device: device of model and batches.
        progress: show a progress bar.

    Returns:
        the run's record (method ``"lora-qv"`` for query and value, else ``"lora"``).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    budget = lora_budget(model, r, targets)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="SEQ_CLS",
    )
    peft_model = get_peft_model(model, cfg)
    if device is not None:
        peft_model.to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    method = "lora-qv" if tuple(targets) == QV_TARGETS else "lora"
    info = fit(
        peft_model,
        params,
        data["train"],
        config,
        seed,
        device=device,
        progress=progress,
        desc=method,
    )
    n_lora, n_head = _lora_counts(peft_model)
    return _result(
        method,
        budget,
        n_lora,
        n_head,
        seed,
        peft_model,
        data,
        config,
        info.seconds,
        info.final_loss(),
        device,
        {"r": r, "targets": list(targets)},
    )


def run_adalora(
    model: nn.Module,
    data: Mapping[str, Encoded],
    config: TrainConfig,
    budget: int,
    seed: int = 0,
    init_r: int = 12,
    targets: Sequence[str] = QV_TARGETS,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PetResult:
    """AdaLoRA (``peft``) pruned to the budget (module docstring), plus the head.

    Learning rate ``config.adalora_lr`` (default ``config.lr``). Schedule: ``tinit = T/10``
    warm-up steps at full rank, cubic budget decrease, the last
    ``tfinal = T/5`` steps at the final rank, reallocation every ``deltaT = max(1, T/50)`` steps.

    Args:
        model: fresh pre-trained classifier (wrapped by peft).
        data: encoded splits.
        config: the shared schedule.
        budget: parameter budget ``B``.
        seed: seed of batches, dropout and the factors.
        init_r: starting rank per matrix.
        targets: target module names (last name component).
        device: device of model and batches.
        progress: show a progress bar.

    Returns:
        the run's record (method ``"adalora"``); ``n_params`` counts the live triplets,
        ``sum_k (d_in + d_out + 1)``.

    Raises:
        ValueError: if the budget cannot pay for one triplet, or exceeds the starting rank.
    """
    from peft import AdaLoraConfig, get_peft_model

    shapes = _linear_shapes(model, targets)
    if not shapes:
        raise ValueError(f"no nn.Linear named {tuple(targets)} in the model")
    unit = max(d_in + d_out + 1 for _, d_in, d_out in shapes)
    total_rank = budget // unit
    if total_rank < 1:
        raise ValueError(f"budget {budget} is below one AdaLoRA triplet ({unit} parameters)")
    if total_rank > init_r * len(shapes):
        raise ValueError(
            f"budget {budget} needs total rank {total_rank} > init_r * modules = "
            f"{init_r * len(shapes)}; raise init_r"
        )
    torch.manual_seed(seed)
    steps = config.steps
    cfg = AdaLoraConfig(
        init_r=init_r,
        target_r=max(1, total_rank // len(shapes)),
        tinit=steps // 10,
        tfinal=steps // 5,
        deltaT=max(1, steps // 50),
        total_step=steps,
        lora_alpha=2 * init_r,
        lora_dropout=0.0,
        target_modules=list(targets),
        task_type="SEQ_CLS",
    )
    peft_model = get_peft_model(model, cfg)
    if device is not None:
        peft_model.to(device)
    # NOTE: peft's target is target_r per module; the total rank is set directly so the budget
    # is met with a non-integer mean rank (25,728 parameters = 33 triplets over 12 matrices).
    peft_model.base_model.rankallocator.target_bgt = total_rank
    params = [p for p in peft_model.parameters() if p.requires_grad]
    info = fit(
        peft_model,
        params,
        data["train"],
        config,
        seed,
        lr=config.lr if config.adalora_lr is None else config.adalora_lr,
        loss_fn=model_loss,
        after_backward=peft_model.base_model.update_and_allocate,
        device=device,
        progress=progress,
        desc="adalora",
    )
    ranks = _adalora_ranks(peft_model)
    dims = {name: d_in + d_out + 1 for name, d_in, d_out in shapes}
    n_live = sum(r * dims[_strip(name, dims)] for name, r in ranks.items())
    n_head = sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n
    )
    return _result(
        "adalora",
        budget,
        n_live,
        n_head,
        seed,
        peft_model,
        data,
        config,
        info.seconds,
        info.final_loss(),
        device,
        {"ranks": ranks, "total_rank": total_rank, "init_r": init_r},
    )


def _strip(name: str, known: Mapping[str, int]) -> str:
    for k in known:
        if name.endswith(k) or k.endswith(name):
            return k
    raise KeyError(name)


def _adalora_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Live rank per AdaLoRA module: nonzero entries of ``lora_E``."""
    out = {}
    for name, p in peft_model.named_parameters():
        if "lora_E" in name:
            module = name.split(".lora_E")[0]
            module = module.removeprefix("base_model.model.")
            out[module] = int((p.detach() != 0).sum())
    return out


def run_full(
    model: nn.Module,
    data: Mapping[str, Encoded],
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PetResult:
    """Full fine-tuning of every weight at ``config.full_lr`` (the reference).

    Args:
        model: fresh pre-trained classifier (modified in place).
        data: encoded splits.
        config: the shared schedule.
        seed: seed of batches and dropout.
        device: device of model and batches.
        progress: show a progress bar.

    Returns:
        the run's record (method ``"full"``, ``budget`` ``None``).
    """
    if device is not None:
        model.to(device)
    model.requires_grad_(True)
    params = list(model.parameters())
    info = fit(
        model,
        params,
        data["train"],
        config,
        seed,
        lr=config.full_lr,
        device=device,
        progress=progress,
        desc="full",
    )
    head = sum(p.numel() for p in _head_params(model))
    n = sum(p.numel() for p in params) - head
    return _result(
        "full", None, n, head, seed, model, data, config, info.seconds, info.final_loss(), device
    )
