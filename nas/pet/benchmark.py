"""Benchmark of PET search against its baselines at equal budget, several seeds.

Per seed one pre-trained model is loaded (its new head seeded with the seed) and every method
starts from a copy of it, with the same :class:`~nas.pet.training.TrainConfig`, batches and
dropout seeds. One supernet is trained per seed and shared by the searched architecture and the
random and magnitude pruning baselines at every budget. Runs are appended to ``results.jsonl``
as they finish, so an interrupted benchmark resumes where it stopped.

Search cost: ``seconds["search"]`` (supernet training + scoring + pruning) of the searched run
divided by the training time of the LoRA q,v run of the same seed, which uses the same number of
steps as the supernet when ``search_steps == train.steps``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nas.pet import baselines
from nas.pet.allocation import plot_allocation, summarise_allocation
from nas.pet.search import SearchConfig, run_search, train_supernet
from nas.pet.training import Encoded, PetResult, TrainConfig

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
HAND_DESIGNED = {"bitfit": "bitfit", "lora-qv": "lora-qv"}
METHODS = ("search", "random", "magnitude", "hand", "adalora", "full")


@dataclass
class BenchConfig:
    """Options of the benchmark.

    Args:
        budgets: budgets, each an integer or ``"bitfit"`` / ``"lora-qv"`` (the size of that
            method on the model; the hand-designed baseline of such a budget is that method).
        seeds: seeds; each gives one head initialisation, one batch order and one supernet.
        train: the schedule every method is trained with.
        search: search options (its ``budget``, ``train`` and ``seed`` are overridden).
        methods: subset of ``("search", "random", "magnitude", "hand", "adalora", "full")``.
        device: device every run is trained and evaluated on (``None``: where the model is).

    Raises:
        ValueError: for an unknown method or budget name, or no seed.
    """

    budgets: tuple[int | str, ...] = ("bitfit", "lora-qv")
    seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=lambda: SearchConfig(budget=1))
    methods: tuple[str, ...] = METHODS
    device: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        for b in self.budgets:
            if isinstance(b, str) and b not in HAND_DESIGNED:
                raise ValueError(f"budget {b!r} must be an integer or one of {list(HAND_DESIGNED)}")
            if not isinstance(b, str) and (int(b) != b or b < 1):
                raise ValueError(f"budget {b!r} must be a positive integer")
        if not self.seeds:
            raise ValueError("need at least one seed")
        self.budgets = tuple(self.budgets)
        self.seeds = tuple(self.seeds)
        self.methods = tuple(self.methods)


def resolve_budget(budget: int | str, model: nn.Module) -> int:
    """Number of parameters of a budget given as an integer or a method name.

    Args:
        budget: an integer, ``"bitfit"`` (all bias vectors) or ``"lora-qv"`` (rank 8 on query
            and value).
        model: the classifier the budget refers to.

    Returns:
        the budget in parameters.

    Raises:
        ValueError: for an unknown name.
    """
    if budget == "bitfit":
        return baselines.bitfit_budget(model)
    if budget == "lora-qv":
        return baselines.lora_budget(model, r=8)
    if isinstance(budget, str):
        raise ValueError(f"unknown budget name {budget!r}")
    return int(budget)


def _load_done(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _key(method: str, budget: int | str | None, seed: int) -> str:
    return f"{method}|{budget}|{seed}"


def run_benchmark(
    model_fn: Callable[[int], nn.Module],
    data: Mapping[str, Encoded],
    config: BenchConfig,
    out_dir: str | os.PathLike,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run every method at every budget and seed; append each record to ``results.jsonl``.

    Args:
        model_fn: ``model_fn(seed)`` returns a fresh pre-trained classifier whose head is
            initialised from ``seed``.
        data: encoded splits (``"train"`` and the evaluation splits).
        config: the benchmark options.
        out_dir: output folder (created).
        progress: show progress bars.

    Returns:
        all records (earlier ones read back from ``results.jsonl``), as dictionaries with the
        budget label under ``"budget_label"``.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS)
    records = _load_done(path)
    done = {_key(r["method"], r["budget_label"], r["seed"]) for r in records}

    def save(result: PetResult, label: int | str | None) -> None:
        record = {**result.to_dict(), "budget_label": label}
        records.append(record)
        done.add(_key(result.method, label, result.seed))
        with open(path, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        logger.info(
            "%s budget=%s seed=%d: accuracy %.4f, %d params",
            result.method,
            label,
            result.seed,
            result.accuracy,
            result.n_params,
        )

    scorers = {"search": "first_order", "random": "random", "magnitude": "magnitude"}
    for seed in config.seeds:
        pristine = model_fn(seed)
        budgets = {label: resolve_budget(label, pristine) for label in config.budgets}
        search_cfg = dataclasses.replace(
            config.search, train=config.train, seed=seed, device=config.device
        )
        wanted = [(m, label) for label in config.budgets for m in scorers if m in config.methods]
        trained = None
        if any(_key(m, label, seed) not in done for m, label in wanted):
            trained = train_supernet(
                copy.deepcopy(pristine),
                data["train"],
                dataclasses.replace(search_cfg, budget=1),
                progress,
            )
        for label, budget in budgets.items():
            for method, score in scorers.items():
                if method not in config.methods or _key(method, label, seed) in done:
                    continue
                cfg = dataclasses.replace(search_cfg, budget=budget, score=score)
                result, _ = run_search(pristine, data, cfg, progress=progress, trained=trained)
                result.method = method
                save(result, label)
            if "hand" in config.methods and isinstance(label, str):
                name = HAND_DESIGNED[label]
                if _key(name, label, seed) not in done:
                    model = copy.deepcopy(pristine)
                    if name == "bitfit":
                        result = baselines.run_bitfit(
                            model, data, config.train, seed, config.device, progress
                        )
                    else:
                        result = baselines.run_lora(
                            model,
                            data,
                            config.train,
                            seed,
                            device=config.device,
                            progress=progress,
                        )
                    save(result, label)
            if "adalora" in config.methods and _key("adalora", label, seed) not in done:
                result = baselines.run_adalora(
                    copy.deepcopy(pristine),
                    data,
                    config.train,
                    budget,
                    seed,
                    device=config.device,
                    progress=progress,
                )
                save(result, label)
        if "full" in config.methods and _key("full", None, seed) not in done:
            result = baselines.run_full(
                copy.deepcopy(pristine), data, config.train, seed, config.device, progress
            )
            save(result, None)
    return records


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Table rows (mean and sd over seeds), search cost ratios and budget allocation.

    Args:
        records: records from :func:`run_benchmark`.

    Returns:
        ``{"rows": [...], "search_cost": {...}, "allocation": {budget label: summary}}``;
        each row has ``method``, ``budget``, ``n_params``, ``accuracy_mean``, ``accuracy_sd``,
        ``seeds``, ``train_seconds``.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((str(r["budget_label"]), r["method"]), []).append(r)
    rows = []
    for (label, method), rs in sorted(groups.items()):
        accs = [r["metrics"].get("test", {}).get("accuracy", float("nan")) for r in rs]
        mean, sd = _mean_sd(accs)
        train_s = [r["seconds"].get("retrain", r["seconds"].get("train", float("nan"))) for r in rs]
        rows.append(
            {
                "budget": label,
                "method": method,
                "n_params": sorted({int(r["n_params"]) for r in rs}),
                "accuracy_mean": mean,
                "accuracy_sd": sd,
                "seeds": len(rs),
                "train_seconds": _mean_sd(train_s)[0],
                "search_seconds": _mean_sd([r["seconds"].get("search", float("nan")) for r in rs])[
                    0
                ],
            }
        )
    lora = {r["seed"]: r["seconds"]["train"] for r in records if r["method"] == "lora-qv"}
    ratios = [
        r["seconds"]["search"] / lora[r["seed"]]
        for r in records
        if r["method"] == "search" and r["seed"] in lora
    ]
    mean, sd = _mean_sd(ratios)
    allocation = {}
    for r in records:
        if r["method"] == "search":
            allocation.setdefault(str(r["budget_label"]), []).extend(
                r["details"].get("allocation", [])
            )
    return {
        "rows": rows,
        "search_cost": {"ratio_mean": mean, "ratio_sd": sd, "n": len(ratios)},
        "allocation": {k: summarise_allocation(v) for k, v in allocation.items()},
    }


def format_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of :func:`summarise` rows (accuracy in percent, mean ± sd)."""
    lines = [
        "| budget | method | trainable params (head excluded) | test accuracy % | seeds |",
        "|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        params = "/".join(f"{n:,}" for n in row["n_params"])
        acc = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_sd']:.2f}"
        lines.append(f"| {row['budget']} | {row['method']} | {params} | {acc} | {row['seeds']} |")
    cost = summary["search_cost"]
    if cost["n"]:
        lines.append("")
        lines.append(
            f"search cost / LoRA-qv run: {cost['ratio_mean']:.2f} ± {cost['ratio_sd']:.2f} "
            f"(n={cost['n']})"
        )
    return "\n".join(lines)


def plot_benchmark_allocation(
    records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
) -> list[str]:
    """One PNG per budget of the searched runs' mean allocation over seeds.

    Args:
        records: records from :func:`run_benchmark`.
        out_dir: output folder.

    Returns:
        the written paths.
    """
    paths = []
    by_budget: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r["method"] == "search":
            by_budget.setdefault(str(r["budget_label"]), []).append(r)
    for label, rs in by_budget.items():
        rows = [
            {**row, "params": row["params"] / len(rs)}
            for r in rs
            for row in r["details"].get("allocation", [])
        ]
        path = os.path.join(os.fspath(out_dir), f"budget_{label}.png")
        plot_allocation(rows, path, title=f"searched PET budget ({label}), mean of {len(rs)} seeds")
        paths.append(path)
    return paths


def to_json(obj: Any) -> Any:
    """Make tensors and tuples JSON-friendly (for ``json.dump(..., default=to_json)``)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)
