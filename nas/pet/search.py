r"""End-to-end PET architecture search: supernet training, scoring, pruning, retraining.

Stages of :func:`run_search` (each one checkpointed, so an interrupted search resumes after the
last finished stage):

1. ``supernet``: wrap the frozen encoder in a :class:`~nas.pet.supernet.PetSupernet` (bias
   deltas and LoRA at rank ``r_max`` on every target, balanced initialisation) and train the PET
   parameters and the head for ``search_steps`` steps.
2. ``prune``: score every unit on ``score_batches`` held-back training batches and prune to the
   budget, one-shot or iteratively (``rounds`` geometric rounds with ``round_steps`` steps of
   training between them). Structured scores are the first-order loss change
   ``-g_G^T theta_G`` or, with ``score="fisher"``, ``-g_G^T theta_G + 1/2 sum_G F_ii theta_i^2``;
   ``"random"`` and ``"magnitude"`` give the pruning baselines through the same pipeline.
   Structured selection solves the knapsack

   .. math::

       \max_K \sum_{u \in K} \mathrm{score}_u
       \quad \text{s.t.} \quad \sum_{u \in K} \mathrm{cost}_u \le B

   exactly (:func:`~nas.pet.selection.exact_select`), so the budget ``B`` is met exactly
   whenever some set of units costs exactly ``B``.
3. ``retrain``: train the found architecture for ``train.steps`` steps, the schedule every
   baseline gets. ``retrain="reinit"`` (default) restarts it from the standard LoRA start
   (``A`` Gaussian, ``B = 0``, no offset, zero bias deltas, the initial head), so the
   comparison with baselines is at equal training and the result exports to ``peft`` with no
   offset; dead components of a structured result are then dropped (:func:`compact`), so
   retraining costs what the found architecture costs. ``"continue"`` keeps the surviving
   values (and the full-rank modules).
4. ``evaluate``: accuracy and loss on the evaluation splits.

The search cost reported is stages 1-2 (``seconds["search"]``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from nas.pet.allocation import budget_allocation
from nas.pet.scores import (
    Reduce,
    entry_scores,
    fisher_diagonal,
    magnitude_scores,
    pet_gradients,
    random_scores,
    unit_scores,
)
from nas.pet.selection import (
    architecture_cost,
    exact_select,
    greedy_select,
    is_structured,
    prune_structured,
    prune_unstructured,
)
from nas.pet.supernet import LoraBiasLinear, PetSupernet, SupernetConfig
from nas.pet.training import (
    Encoded,
    PetResult,
    TrainConfig,
    cross_entropy_loss,
    evaluate,
    fit,
    iterate_batches,
    to_device,
)

logger = logging.getLogger(__name__)

STAGES = ("supernet", "prune", "retrain", "evaluate")
CHECKPOINT = "search_checkpoint.pt"
RESULT = "search_result.json"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class SearchConfig:
    """Options of a PET architecture search.

    Args:
        budget: parameter budget ``B`` of the PET update (head excluded), ``>= 1``.
        supernet: supernet options (rank, targets, initialisation).
        train: the retraining schedule (shared with the baselines).
        search_steps: supernet training steps (stage 1), ``>= 0``.
        score: ``"first_order"``, ``"fisher"`` (diagonal empirical Fisher added),
            ``"random"`` or ``"magnitude"``.
        reduce: how a unit's loss change becomes a score (see :func:`nas.pet.scores.unit_scores`).
        score_batches: batches averaged for the gradient ``g``.
        fisher_examples: examples for the Fisher diagonal (one backward pass each).
        structured: prune whole units (bias vectors, rank-1 components) or single entries.
        schedule: ``"one_shot"`` or ``"iterative"``.
        rounds: pruning rounds of the iterative schedule (``>= 2`` for ``"iterative"``).
        round_steps: training steps between iterative rounds.
        selection: ``"exact"`` knapsack or ``"greedy"`` score-per-parameter selection.
        retrain: ``"reinit"`` or ``"continue"`` (module docstring).
        seed: seed of the head, factors, batches and dropout.
        eval_splits: splits evaluated at the end (those present in the data).
        device: device of model and batches (``None``: leave the model where it is).
        dtype: ``"float32"``, ``"float64"`` or ``"bfloat16"`` (``None``: keep the model's).

    Raises:
        ValueError: on an invalid option (the message names it).
    """

    budget: int
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search_steps: int = 100
    score: Literal["first_order", "fisher", "random", "magnitude"] = "first_order"
    reduce: Reduce = "signed"
    score_batches: int = 8
    fisher_examples: int = 64
    structured: bool = True
    schedule: Literal["one_shot", "iterative"] = "one_shot"
    rounds: int = 3
    round_steps: int = 20
    selection: Literal["exact", "greedy"] = "exact"
    retrain: Literal["reinit", "continue"] = "reinit"
    seed: int = 0
    eval_splits: tuple[str, ...] = ("validation", "test")
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if int(self.budget) != self.budget or self.budget < 1:
            raise ValueError(f"budget must be a positive integer, got {self.budget!r}")
        for name in ("search_steps", "round_steps"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        for name in ("score_batches", "fisher_examples", "rounds"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        choices = {
            "score": ("first_order", "fisher", "random", "magnitude"),
            "reduce": ("signed", "abs", "squared"),
            "schedule": ("one_shot", "iterative"),
            "selection": ("exact", "greedy"),
            "retrain": ("reinit", "continue"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.schedule == "iterative" and self.rounds < 2:
            raise ValueError("the iterative schedule needs rounds >= 2")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.score in ("random", "magnitude") and not self.structured:
            raise ValueError(f"score={self.score!r} is implemented for structured pruning only")
        self.eval_splits = tuple(self.eval_splits)

    @property
    def method(self) -> str:
        """Method name in result records: ``"search"`` for first-order, else the scorer."""
        names = {"first_order": "search", "fisher": "search-fisher"}
        name = names.get(self.score, self.score)
        if not self.structured:
            name += "-unstructured"
        if self.schedule == "iterative":
            name += "-iterative"
        return name

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable options."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# checkpoints


def _pet_state(supernet: PetSupernet) -> dict[str, torch.Tensor]:
    """Every PET tensor (factors, deltas, masks, offsets) and the head, by name."""
    state = {}
    attrs = ("lora_A", "lora_B", "mask_A", "mask_B", "offset_A", "offset_B")
    for name, mod in supernet.pet_modules():
        for attr in (*attrs, "bias_delta", "mask_bias"):
            value = getattr(mod, attr, None)
            if value is not None:
                state[f"{name}.{attr}"] = value.detach().cpu().clone()
    for name, p in supernet.head_parameters():
        state[f"head:{name}"] = p.detach().cpu().clone()
    return state


@torch.no_grad()
def _load_pet_state(supernet: PetSupernet, state: Mapping[str, torch.Tensor]) -> None:
    """Put saved PET tensors back; LoRA factors and masks are replaced (they may be compacted)."""
    for name, mod in supernet.pet_modules():
        for attr in ("bias_delta", "mask_bias"):
            target = getattr(mod, attr, None)
            if target is not None:
                target.copy_(state[f"{name}.{attr}"].to(target))
        if not isinstance(mod, LoraBiasLinear):
            continue
        like = mod.base.weight
        for attr in ("lora_A", "lora_B"):
            setattr(mod, attr, nn.Parameter(state[f"{name}.{attr}"].to(like).clone()))
        for attr in ("mask_A", "mask_B", "offset_A", "offset_B"):
            key = f"{name}.{attr}"
            setattr(mod, attr, state[key].to(like).clone() if key in state else None)
        mod.rank = mod.lora_A.shape[0]
    heads = dict(supernet.head_parameters())
    for name, p in heads.items():
        p.copy_(state[f"head:{name}"].to(p))


def _save_checkpoint(directory: str, payload: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT)
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def _config_key(config: SearchConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _check_same_options(saved: str, wanted: str, checkpoint_dir: str) -> None:
    if saved == wanted:
        return
    before, now = json.loads(saved), json.loads(wanted)
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ)
    raise ValueError(
        f"the checkpoint in {checkpoint_dir} was written with other search options ({detail}); "
        "use the same options, another directory, or delete it"
    )


def check_resumable(config: SearchConfig, checkpoint_dir: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the options that differ from a checkpoint in the folder.

    Args:
        config: the options of the search about to run.
        checkpoint_dir: the folder ``run_search`` checkpoints to (nothing there: no error).
    """
    path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT)
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)["config"]
        _check_same_options(saved, _config_key(config), os.fspath(checkpoint_dir))


# --------------------------------------------------------------------------------------------
# stages


def _score_fn(config: SearchConfig, score_data: list[dict[str, torch.Tensor]], seed: int):
    def structured(supernet: PetSupernet):
        if config.score == "random":
            return random_scores(supernet, seed=seed)
        if config.score == "magnitude":
            return magnitude_scores(supernet)
        grads = pet_gradients(supernet, score_data, cross_entropy_loss)
        fisher = None
        if config.score == "fisher":
            fisher = fisher_diagonal(
                supernet, score_data, cross_entropy_loss, max_examples=config.fisher_examples
            )
        return unit_scores(supernet, grads, fisher, reduce=config.reduce)

    def unstructured(supernet: PetSupernet):
        grads = pet_gradients(supernet, score_data, cross_entropy_loss)
        fisher = None
        if config.score == "fisher":
            fisher = fisher_diagonal(
                supernet, score_data, cross_entropy_loss, max_examples=config.fisher_examples
            )
        scores = entry_scores(supernet, grads, fisher)
        if config.reduce == "abs":
            return {k: v.abs() for k, v in scores.items()}
        if config.reduce == "squared":
            return {k: v**2 for k, v in scores.items()}
        return scores

    return structured if config.structured else unstructured


def train_supernet(
    model: nn.Module,
    data: Encoded,
    config: SearchConfig,
    progress: bool = False,
) -> tuple[PetSupernet, dict[str, Any]]:
    """Stage 1: build the supernet around ``model`` and train it for ``search_steps`` steps.

    Args:
        model: the pre-trained classifier (wrapped in place; pass a copy to keep it).
        data: the encoded training split.
        config: the search options.
        progress: show progress bars.

    Returns:
        ``(supernet, info)``; ``info`` holds the initial head state (for ``retrain="reinit"``),
        the supernet's size, the final training loss and the wall-clock seconds.
    """
    start = time.perf_counter()
    _place(model, config)
    supernet = PetSupernet(model, dataclasses.replace(config.supernet, seed=config.seed))
    info: dict[str, Any] = {
        "head_init": {n: p.detach().cpu().clone() for n, p in supernet.head_parameters()},
        "supernet_params": supernet.count_parameters(),
        "search_loss": float("nan"),
    }
    if config.search_steps > 0:
        fit_info = fit(
            supernet,
            _trainable(supernet),
            data,
            config.train,
            seed=config.seed,
            steps=config.search_steps,
            optimizer_hook=supernet.enforce_masks,
            device=config.device,
            progress=progress,
            desc="supernet",
        )
        info["search_loss"] = fit_info.final_loss()
    info["seconds"] = time.perf_counter() - start
    return supernet, info


def prune_supernet(
    supernet: PetSupernet,
    data: Encoded,
    config: SearchConfig,
    progress: bool = False,
) -> dict[str, Any]:
    """Stage 2: score and prune the trained supernet to ``config.budget`` (masks set in place).

    Args:
        supernet: the trained supernet.
        data: the encoded training split (scoring batches are drawn from it with their own seed).
        config: the search options.
        progress: show progress bars for the retraining between rounds.

    Returns:
        diagnostics: one record per round (budget, count, units kept) and the final count.

    Raises:
        ValueError: if the budget exceeds the supernet's size.
    """
    size = supernet.count_parameters()
    if config.budget > size:
        raise ValueError(
            f"budget {config.budget} exceeds the supernet's {size} PET parameters; "
            "lower the budget or raise r_max"
        )
    score_data = [
        to_device(b, config.device)
        for b in iterate_batches(
            data, config.train.batch_size, config.score_batches, seed=config.seed + 10_007
        )
    ]
    rounds = config.rounds if config.schedule == "iterative" else 1

    def retrain_round(net: PetSupernet, t: int) -> None:
        fit(
            net,
            _trainable(net),
            data,
            config.train,
            seed=config.seed + 100 * (t + 1),
            steps=config.round_steps,
            optimizer_hook=net.enforce_masks,
            device=config.device,
            progress=progress,
            desc=f"round {t + 1}",
        )

    supernet.eval()
    score_fn = _score_fn(config, score_data, config.seed)
    if config.structured:
        select = exact_select if config.selection == "exact" else greedy_select
        infos = prune_structured(
            supernet, score_fn, config.budget, rounds, retrain_round, select=select
        )
    else:
        infos = prune_unstructured(supernet, score_fn, config.budget, rounds, retrain_round)
    return {"rounds": [info._asdict() for info in infos], "count": supernet.count_parameters()}


@torch.no_grad()
def reinitialise(supernet: PetSupernet, head_state: Mapping[str, torch.Tensor], seed: int) -> None:
    """Restart the kept architecture from the standard LoRA start (masks unchanged).

    ``A ~ N(0, 1/d_in)`` per entry, ``B = 0``, offsets removed, bias deltas zero, head restored to
    ``head_state``. The masked function is then exactly the pre-trained encoder with the initial
    head, as for every baseline.

    Args:
        supernet: the pruned supernet.
        head_state: head parameter name -> initial value.
        seed: seed of ``A``.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, mod in supernet.pet_modules():
        if mod.bias_delta is not None:
            mod.bias_delta.zero_()
        if hasattr(mod, "offset_A") and mod.rank > 0:
            mod.offset_A = None
            mod.offset_B = None
            a = torch.randn(mod.lora_A.shape, generator=gen, dtype=torch.float64)
            mod.lora_A.copy_(a / math.sqrt(mod.in_features))
            mod.lora_B.zero_()
    for name, p in supernet.head_parameters():
        p.copy_(head_state[name].to(p))
    supernet.apply_masks_()


@torch.no_grad()
def compact(supernet: PetSupernet) -> None:
    """Drop dead LoRA components from every module (no offsets allowed), in place.

    Row ``k`` of ``A`` and column ``k`` of ``B`` are removed when component ``k`` is masked, so
    a module keeps rank ``r_m`` and one with ``r_m = 0`` skips the LoRA path. The function, the
    masks of the kept entries and both parameter counts are unchanged; training is cheaper.

    Args:
        supernet: a pruned supernet without balanced-init offsets (e.g. after
            :func:`reinitialise`).

    Raises:
        ValueError: if a module still carries an offset.
    """
    for name, mod in supernet.lora_modules():
        if mod.offset_A is not None:
            raise ValueError(f"module {name!r} carries a balanced-init offset; cannot compact")
        idx = torch.nonzero(mod.component_alive()).flatten()
        mod.lora_A = nn.Parameter(mod.lora_A[idx].clone())
        mod.lora_B = nn.Parameter(mod.lora_B[:, idx].clone())
        mod.mask_A = mod.mask_A[idx].clone()
        mod.mask_B = mod.mask_B[:, idx].clone()
        mod.rank = len(idx)


def _trainable(supernet: PetSupernet) -> list[nn.Parameter]:
    return [p for _, p, _ in supernet.pet_parameters()] + [p for _, p in supernet.head_parameters()]


def _place(model: nn.Module, config: SearchConfig) -> None:
    if config.dtype is not None:
        model.to(_DTYPES[config.dtype])
    if config.device is not None:
        model.to(config.device)


def _architecture(supernet: PetSupernet) -> dict[str, Any]:
    return {
        "ranks": {k: v for k, v in supernet.ranks().items() if v > 0},
        "biases": supernet.tuned_biases(),
        "structured": is_structured(supernet),
        "allocation": budget_allocation(supernet),
    }


# --------------------------------------------------------------------------------------------
# pipeline


def run_search(
    model: nn.Module,
    data: Mapping[str, Encoded],
    config: SearchConfig,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = False,
    trained: tuple[PetSupernet, dict[str, Any]] | None = None,
) -> tuple[PetResult, PetSupernet]:
    """Run the whole search (module docstring) and return its record and the final supernet.

    With ``checkpoint_dir`` every finished stage is saved there (``search_checkpoint.pt``) and
    the final record is written to ``search_result.json``; calling again with the same directory
    and options resumes after the last finished stage. Stages are seeded independently, so a
    resumed search gives the same result as an uninterrupted one.

    Args:
        model: the pre-trained classifier (wrapped in place).
        data: encoded splits; ``"train"`` is required, ``config.eval_splits`` are evaluated.
        config: the search options.
        checkpoint_dir: folder for checkpoints (``None``: no checkpointing).
        progress: show progress bars.
        trained: an already trained stage-1 ``(supernet, info)`` from :func:`train_supernet`
            with the same options (deep-copied; ``model`` is then unused). Lets several budgets or
            scorers share one supernet.

    Returns:
        ``(result, supernet)``; ``result.n_params`` counts the unmasked PET entries and
        ``result.details["architecture_cost"]`` the same budget from ranks and bias lengths.

    Raises:
        ValueError: if ``data`` has no ``"train"`` split, the budget is too large, or the
            checkpoint was written with other options.
    """
    # NOTE: checkpoints are written between stages only; a search interrupted inside a stage
    # repeats that stage from its start (stages are seeded, so the result is the same).
    if "train" not in data:
        raise ValueError(f"data needs a 'train' split, got {sorted(data)}")
    key = _config_key(config)
    payload: dict[str, Any] = {"config": key, "stage": None, "record": {}}
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
        path = os.path.join(checkpoint_dir, CHECKPOINT)
        if os.path.isfile(path):
            payload = torch.load(path, map_location="cpu", weights_only=False)
            _check_same_options(payload["config"], key, checkpoint_dir)
            logger.info("resuming search after stage %r", payload["stage"])
    done = STAGES.index(payload["stage"]) + 1 if payload["stage"] else 0
    record = payload["record"]
    seconds = record.setdefault("seconds", {})

    def finish(stage: str, supernet: PetSupernet) -> None:
        payload["stage"] = stage
        payload["state"] = _pet_state(supernet)
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, payload)

    if trained is not None:
        supernet, info = copy.deepcopy(trained[0]), trained[1]
    else:
        steps = config.search_steps if done == 0 else 0
        supernet, info = train_supernet(
            model, data["train"], dataclasses.replace(config, search_steps=steps), progress
        )
    record.setdefault("head_init", info["head_init"])
    record.setdefault("supernet_params", info["supernet_params"])
    if done >= 1:
        _load_pet_state(supernet, payload["state"])
    else:
        seconds["supernet"] = info["seconds"]
        record["search_loss"] = info["search_loss"]
        finish("supernet", supernet)

    if done < 2:
        start = time.perf_counter()
        record["prune"] = prune_supernet(supernet, data["train"], config, progress)
        seconds["prune"] = time.perf_counter() - start
        record["architecture"] = _architecture(supernet)
        finish("prune", supernet)

    if done < 3:
        start = time.perf_counter()
        if config.retrain == "reinit":
            reinitialise(supernet, record["head_init"], seed=config.seed + 1)
            if config.structured:
                compact(supernet)
        fit_info = fit(
            supernet,
            _trainable(supernet),
            data["train"],
            config.train,
            seed=config.seed + 1,
            optimizer_hook=supernet.enforce_masks,
            device=config.device,
            progress=progress,
            desc="retrain",
        )
        seconds["retrain"] = time.perf_counter() - start
        record["train_loss"] = fit_info.final_loss()
        finish("retrain", supernet)

    start = time.perf_counter()
    metrics = {
        split: evaluate(supernet, data[split], config.train.eval_batch_size, config.device)
        for split in config.eval_splits
        if split in data
    }
    seconds["evaluate"] = time.perf_counter() - start
    seconds["search"] = seconds.get("supernet", 0.0) + seconds.get("prune", 0.0)
    result = PetResult(
        method=config.method,
        budget=config.budget,
        n_params=supernet.count_parameters(),
        head_params=supernet.head_parameter_count(),
        seed=config.seed,
        metrics=metrics,
        seconds=dict(seconds),
        train_loss=record.get("train_loss", float("nan")),
        details={
            **record["architecture"],
            "architecture_cost": architecture_cost(supernet),
            "supernet_params": record["supernet_params"],
            "search_loss": record.get("search_loss", float("nan")),
            "prune_rounds": record["prune"]["rounds"],
            "config": config.to_dict(),
        },
    )
    if checkpoint_dir is not None:
        finish("evaluate", supernet)
        with open(os.path.join(checkpoint_dir, RESULT), "w") as fh:
            json.dump(result.to_dict(), fh, indent=2, default=str)
    logger.info(
        "search done: %d params (budget %d), test accuracy %.4f",
        result.n_params,
        config.budget,
        result.accuracy,
    )
    return result, supernet
