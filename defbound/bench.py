r"""Benchmark of FM sweeps against every baseline on synthetic Gaussian DEFs.

Models have controllable forest-likeness: every weight matrix is

.. math:: W^{(l)} = F^{(l)} + \epsilon\, R^{(l)},

``F`` a random forest (each child has exactly one parent, weight ``N(0, 1)``) and ``R`` a dense
(or, with ``parents_per_child = p``, ``p`` random parents per child) Gaussian part with entries
``N(0, 1/p)``, so ``epsilon^2`` is the expected energy of the non-forest part of a row relative to
the forest part, whatever the width. Data rows are drawn from the model itself.

For every method the benchmark records the ELBO after every sweep (SVI: every few steps) and its
wall time, and reports the sweeps and the time needed to come within a relative tolerance of
the reference value

.. math:: \mathrm{ELBO}_t \ge \mathrm{ELBO}_{ref} - \mathrm{tol}\,|\mathrm{ELBO}_{ref}|,

where ``ELBO_ref`` is the exact mean-field optimum ``ELBO*`` (dense Cholesky solve) when the model
is small enough, and the best value any method reached otherwise; plus divergence and the peak
memory of the run.

Timing rules: every coordinate method's sweep time includes its own ELBO/FM-bound evaluation
(needed for its stopping rule) and one-off setup (CAVI's triangles, the block colouring); SVI's
time counts only its SVI steps, not the closed-form evaluations made for the report.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from defbound.blocks import block_plan, block_sweep, exact_optimum
from defbound.bound import elbo, fm_bound, forest_likeness
from defbound.cavi import (
    DivergenceMonitor,
    cavi_sweep,
    cavi_system,
    jacobi_spectral_radius,
    jacobi_sweep,
)
from defbound.state import DEFParameters, Moments, check_parameters, prior_moments
from defbound.svi_baseline import SVIBaseline
from defbound.update import SweepInfo, fm_sweep

logger = logging.getLogger(__name__)

BENCH_METHODS: tuple[str, ...] = (
    "fm", "fm-or", "fm-a", "fm-a-or", "cavi", "block", "jacobi", "svi", "exact",
)
"""``fm``: FM sweep, exact variances; ``-or``: over-relaxed (``omega``); ``fm-a``: FM variance
rule ``v = 1/D``; ``cavi``: sequential CAVI; ``block``: co-parent colouring blocks; ``jacobi``:
layer-parallel CAVI; ``svi``: Pyro SVI + AutoNormal + Adam, best of the learning rates;
``exact``: one dense Cholesky solve."""


def synthetic_def(
    widths: Sequence[int],
    epsilon: float,
    *,
    parents_per_child: int | None = None,
    obs_noise_var: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> DEFParameters:
    r"""A Gaussian DEF with weights ``W = F + epsilon R`` (see the module docstring).

    Biases are ``N(0, 1)``, hidden and top noise variances 1, observed noise ``obs_noise_var``.

    Args:
        widths: ``(K_0, K_1, ..., K_L)``, observed width first.
        epsilon: weight of the non-forest part, ``>= 0`` (0 gives a forest).
        parents_per_child: parents of the non-forest part per child (``None``: all).
        obs_noise_var: noise variance of the observed layer.
        seed: seed of the random draws.
        dtype: floating dtype.
        device: device of the returned tensors.

    Returns:
        The :class:`DEFParameters`.

    Raises:
        ValueError: for fewer than two widths, a negative ``epsilon`` or a bad
            ``parents_per_child``.
    """
    widths = [int(k) for k in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must be at least two positive integers, got {widths}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be non-negative, got {epsilon}")
    if parents_per_child is not None and parents_per_child < 1:
        raise ValueError(f"parents_per_child must be positive, got {parents_per_child}")
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for l in range(len(widths) - 1):
        K_c, K_p = widths[l], widths[l + 1]
        forest = torch.zeros(K_c, K_p, dtype=dtype)
        parent = torch.randint(K_p, (K_c,), generator=gen)
        forest[torch.arange(K_c), parent] = torch.randn(K_c, generator=gen, dtype=dtype)
        p = K_p if parents_per_child is None else min(parents_per_child, K_p)
        dense = torch.randn(K_c, K_p, generator=gen, dtype=dtype) / math.sqrt(p)
        if p < K_p:
            keys = torch.rand(K_c, K_p, generator=gen)
            keep = keys.argsort(dim=1)[:, :p]
            mask = torch.zeros(K_c, K_p, dtype=dtype).scatter_(1, keep, 1.0)
            dense = dense * mask
        weights.append((forest + epsilon * dense).to(device))
    biases = [torch.randn(k, generator=gen, dtype=dtype).to(device) for k in widths]
    noise = [torch.ones(k, dtype=dtype, device=device) for k in widths]
    noise[0] = torch.full((widths[0],), obs_noise_var, dtype=dtype, device=device)
    params = DEFParameters(tuple(weights), tuple(biases), tuple(noise))
    check_parameters(params)
    return params


def sample_data(params: DEFParameters, n_rows: int, seed: int = 0) -> Tensor:
    """Draw ``n_rows`` observed rows from the DEF by ancestral sampling, ``(N, K_0)``."""
    gen = torch.Generator().manual_seed(seed)
    ref = params.biases[0]
    L = params.depth

    def noise(l: int) -> Tensor:
        eps = torch.randn(n_rows, params.widths[l], generator=gen, dtype=ref.dtype)
        return eps.to(ref.device) * params.noise_vars[l].sqrt()

    z = params.biases[L] + noise(L)
    for l in range(L - 1, -1, -1):
        z = z @ params.weights[l].T + params.biases[l] + noise(l)
    return z


def model_summary(params: DEFParameters) -> dict[str, float]:
    """Size and forest-likeness of a DEF: ``nnz``, mean and max ``n_eff`` over children."""
    n_eff = torch.cat([forest_likeness(W) for W in params.weights])
    n_eff = n_eff[n_eff > 0]
    return {
        "nnz": int(sum(int(torch.count_nonzero(W)) for W in params.weights)),
        "n_eff_mean": float(n_eff.mean()) if n_eff.numel() else 0.0,
        "n_eff_max": float(n_eff.max()) if n_eff.numel() else 0.0,
        "hidden": int(sum(params.widths[1:])),
    }


@dataclass
class MethodRun:
    """One method's run on one model.

    Attributes:
        method: method name (SVI runs carry the learning rate, ``"svi@0.01"``).
        outcome: ``"converged"`` (own stopping rule), ``"reached"`` (stopped on reaching the
            target), ``"diverged"``, ``"max_sweeps"`` or ``"max_time"``.
        sweeps: sweeps (SVI: steps) done.
        wall_time: seconds of the whole run (as counted, see the module docstring).
        final_elbo: ELBO at the end (NaN after divergence).
        best_elbo: best finite ELBO seen.
        best_bound: best finite FM bound seen.
        peak_memory_mb: peak memory growth during the run in MiB.
        times: wall time after every recorded sweep.
        elbos: ELBO after every recorded sweep.
        steps: sweep (SVI: step) count at every record.
    """

    method: str
    outcome: str = ""
    sweeps: int = 0
    wall_time: float = 0.0
    final_elbo: float = math.nan
    best_elbo: float = -math.inf
    best_bound: float = -math.inf
    peak_memory_mb: float = math.nan
    times: list[float] = field(default_factory=list)
    elbos: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def to_reach(self, target: float) -> tuple[int | None, float | None]:
        """Sweeps and wall time at which the ELBO first reached ``target`` (``None``: never)."""
        for step, t, value in zip(self.steps, self.times, self.elbos, strict=True):
            if math.isfinite(value) and value >= target:
                return step, t
        return None, None


class PeakMemory:
    """Peak memory growth of a block of code.

    On CUDA: ``torch.cuda.max_memory_allocated`` above the level at entry. On CPU the torch
    allocator is invisible to ``tracemalloc``, so the resident set size of the process is
    sampled every ``interval`` seconds from ``/proc/self/statm`` (Linux); elsewhere NaN.

    Args:
        device: the device the code runs on.
        interval: CPU sampling interval in seconds.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._peak = 0

    # NOTE: the CPU figure is the growth of the whole process's resident set, sampled, so it
    # misses allocations shorter than the interval and counts memory of other threads.
    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/statm").exists():
            self._base = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.peak_mb = peak / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_mb = (self._peak - self._base) / 2**20


@dataclass
class RunLimits:
    """When a run stops.

    Attributes:
        max_sweeps: sweep limit of the coordinate methods.
        max_time: seconds per run.
        target: stop as soon as the ELBO reaches this value (``None``: run to convergence).
        rel_change: own convergence rule, ``|Delta ELBO| <= rel_change |ELBO|`` three times.
        svi_steps: SVI step limit.
        svi_eval_every: SVI steps between closed-form evaluations.
    """

    max_sweeps: int = 2000
    max_time: float = 60.0
    target: float | None = None
    rel_change: float = 1e-12
    svi_steps: int = 5000
    svi_eval_every: int = 25


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _coordinate_step(
    method: str, params: DEFParameters, omega: float
) -> Callable[[Moments], tuple[Moments, SweepInfo]]:
    """The sweep function of a coordinate method (setup such as CAVI triangles done here)."""
    if method in ("fm", "fm-or", "fm-a", "fm-a-or"):
        rule = "fm" if method.startswith("fm-a") else "exact"
        w = omega if method.endswith("-or") else 1.0
        return lambda m: fm_sweep(params, m, rule, w)
    if method == "cavi":
        system = cavi_system(params)
        return lambda m: cavi_sweep(params, m, system)
    if method == "block":
        plan = block_plan(params)
        return lambda m: block_sweep(params, m, plan)
    if method == "jacobi":
        return lambda m: jacobi_sweep(params, m)
    raise ValueError(f"unknown coordinate method {method!r}; expected one of {BENCH_METHODS}")


def run_coordinate(
    method: str, params: DEFParameters, x: Tensor, limits: RunLimits, omega: float = 1.9
) -> MethodRun:
    """Run a sweep method from the ancestral initialisation until a stopping rule fires.

    Args:
        method: one of ``fm``, ``fm-or``, ``fm-a``, ``fm-a-or``, ``cavi``, ``block``,
            ``jacobi``.
        params: DEF parameters.
        x: data.
        limits: stopping rules.
        omega: over-relaxation of the ``-or`` variants.

    Returns:
        The :class:`MethodRun`.
    """
    device = x.device
    run = MethodRun(method)
    monitor = DivergenceMonitor()
    with PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        step = _coordinate_step(method, params, omega)
        moments = prior_moments(params, x)
        within = 0
        while True:
            moments, info = step(moments)
            _sync(device)
            elapsed = time.perf_counter() - start
            run.sweeps += 1
            previous = run.elbos[-1] if run.elbos else None
            run.steps.append(run.sweeps)
            run.times.append(elapsed)
            run.elbos.append(info.elbo)
            if math.isfinite(info.elbo):
                run.best_elbo = max(run.best_elbo, info.elbo)
            if math.isfinite(info.bound):
                run.best_bound = max(run.best_bound, info.bound)
            if monitor.update(info):
                run.outcome = "diverged"
                break
            if limits.target is not None and info.elbo >= limits.target:
                run.outcome = "reached"
                break
            small = previous is not None and abs(info.elbo - previous) <= limits.rel_change * abs(
                info.elbo
            )
            within = within + 1 if small else 0
            if within >= 3:
                run.outcome = "converged"
                break
            if run.sweeps >= limits.max_sweeps:
                run.outcome = "max_sweeps"
                break
            if elapsed >= limits.max_time:
                run.outcome = "max_time"
                break
    run.wall_time = run.times[-1]
    run.final_elbo = run.elbos[-1]
    run.peak_memory_mb = memory.peak_mb
    return run


def run_svi_method(
    params: DEFParameters,
    x: Tensor,
    limits: RunLimits,
    lr: float,
    loss: str = "meanfield",
    seed: int = 0,
) -> MethodRun:
    """Run Pyro SVI (``AutoNormal``, Adam at ``lr``) and record the closed-form ELBO.

    Steps are timed without the evaluations; the run stops at the target, after
    ``limits.svi_steps`` steps, after ``limits.max_time`` seconds of steps, or on a non-finite
    ELBO (reported as divergence).

    Returns:
        The :class:`MethodRun`, ``steps`` counting SVI steps.
    """
    device = x.device
    run = MethodRun(f"svi@{lr:g}")
    pyro.clear_param_store()
    with PeakMemory(device) as memory:
        svi = SVIBaseline(params, x, lr=lr, loss=loss, seed=seed)
        elapsed = 0.0
        while True:
            _sync(device)
            start = time.perf_counter()
            svi.step(min(limits.svi_eval_every, limits.svi_steps - svi.steps))
            _sync(device)
            elapsed += time.perf_counter() - start
            info = svi.info()
            run.steps.append(svi.steps)
            run.times.append(elapsed)
            run.elbos.append(info.elbo)
            if not math.isfinite(info.elbo):
                run.outcome = "diverged"
                break
            run.best_elbo = max(run.best_elbo, info.elbo)
            run.best_bound = max(run.best_bound, info.bound)
            if limits.target is not None and info.elbo >= limits.target:
                run.outcome = "reached"
                break
            if svi.steps >= limits.svi_steps:
                run.outcome = "max_sweeps"
                break
            if elapsed >= limits.max_time:
                run.outcome = "max_time"
                break
    run.sweeps = svi.steps
    run.wall_time = elapsed
    run.final_elbo = run.elbos[-1]
    run.peak_memory_mb = memory.peak_mb
    pyro.clear_param_store()
    return run


def run_exact(params: DEFParameters, x: Tensor, max_size: int) -> tuple[MethodRun, float | None]:
    """Exact optimum by one Cholesky solve; returns the run and ``ELBO*`` (``None``: too big)."""
    device = x.device
    run = MethodRun("exact")
    try:
        with PeakMemory(device) as memory:
            _sync(device)
            start = time.perf_counter()
            moments = exact_optimum(params, x, max_size=max_size)
            value = elbo(params, moments).sum().item()
            bound = fm_bound(params, moments).sum().item()
            _sync(device)
            elapsed = time.perf_counter() - start
    except ValueError as err:
        logger.info("no exact optimum: %s", err)
        run.outcome = "too_large"
        return run, None
    except torch.OutOfMemoryError:
        logger.warning("no exact optimum: out of memory")
        run.outcome = "out_of_memory"
        return run, None
    run.outcome = "converged"
    run.sweeps = 1
    run.steps, run.times, run.elbos = [1], [elapsed], [value]
    run.wall_time, run.final_elbo, run.best_elbo = elapsed, value, value
    run.best_bound = bound
    run.peak_memory_mb = memory.peak_mb
    return run, value


@dataclass
class BenchConfig:
    """One synthetic model of the grid.

    Attributes:
        widths: ``(K_0, ..., K_L)``.
        n_rows: data rows ``N``.
        epsilon: non-forest weight.
        parents_per_child: see :func:`synthetic_def`.
        seed: model and data seed.
    """

    widths: tuple[int, ...]
    n_rows: int
    epsilon: float
    parents_per_child: int | None = None
    seed: int = 0


@dataclass
class BenchOptions:
    """Options shared by every model of a benchmark.

    Attributes:
        methods: methods to run (see :data:`BENCH_METHODS`).
        tol: relative tolerance on the ELBO.
        repeats: timed repetitions of every run (the median time is reported).
        omega: over-relaxation of the ``-or`` variants.
        svi_lrs: learning rates tried for SVI (the best is reported as ``svi``).
        svi_loss: ``"meanfield"`` or ``"trace"``.
        exact_max_size: largest hidden size per row for the exact solve.
        obs_noise_var: observed-layer noise variance of the synthetic models.
        limits: stopping rules (``target`` is filled in per model).
        device: torch device.
        dtype: floating dtype.
        stop_at_target: stop every run once it reaches the target (when ``ELBO*`` is known).
        progress: show a progress bar.
    """

    methods: tuple[str, ...] = BENCH_METHODS
    tol: float = 1e-3
    repeats: int = 1
    omega: float = 1.9
    svi_lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    svi_loss: str = "meanfield"
    exact_max_size: int = 6000
    obs_noise_var: float = 0.5
    limits: RunLimits = field(default_factory=RunLimits)
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    stop_at_target: bool = True
    progress: bool = False


@dataclass
class BenchResult:
    """Rows of the benchmark table and the runs behind them.

    Attributes:
        rows: one dictionary per (model, method), the CSV rows.
        runs: per model index, the runs (first repeat) for the plots.
        configs: the models.
    """

    rows: list[dict] = field(default_factory=list)
    runs: list[list[MethodRun]] = field(default_factory=list)
    configs: list[BenchConfig] = field(default_factory=list)


def _check_options(options: BenchOptions) -> None:
    bad = [m for m in options.methods if m not in BENCH_METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {BENCH_METHODS}")
    if not options.tol > 0:
        raise ValueError(f"tol must be positive, got {options.tol}")
    if options.repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {options.repeats}")
    if not 0 < options.omega < 2:
        raise ValueError(f"omega must lie in (0, 2), got {options.omega}")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {options.device} requested but CUDA is not available")


def _jacobi_radius(params: DEFParameters, max_width: int = 1500) -> float:
    """Largest layer-Jacobi spectral radius over the layers (NaN for wide layers)."""
    if max(params.widths[1:]) > max_width:
        return math.nan
    return max(jacobi_spectral_radius(params, l) for l in range(1, params.depth + 1))


def _repeat(fn: Callable[[], MethodRun], repeats: int) -> tuple[MethodRun, list[float]]:
    """Run ``fn`` ``repeats`` times; return the first run and every run's wall time."""
    first = fn()
    times = [first.wall_time]
    for _ in range(repeats - 1):
        times.append(fn().wall_time)
    return first, times


def bench_model(config: BenchConfig, options: BenchOptions) -> tuple[list[dict], list[MethodRun]]:
    """Benchmark every requested method on one synthetic model.

    Args:
        config: the model.
        options: the shared options.

    Returns:
        ``(rows, runs)``: one table row per method and the runs behind them.
    """
    params = synthetic_def(
        config.widths, config.epsilon, parents_per_child=config.parents_per_child,
        obs_noise_var=options.obs_noise_var, seed=config.seed, dtype=options.dtype,
        device=options.device,
    )
    x = sample_data(params, config.n_rows, seed=config.seed + 1)
    summary = model_summary(params)
    exact_run, elbo_star = run_exact(params, x, options.exact_max_size)
    limits = RunLimits(**asdict(options.limits))
    if elbo_star is not None and options.stop_at_target:
        limits.target = elbo_star - options.tol * abs(elbo_star)
    runs: list[tuple[MethodRun, list[float]]] = []
    if "exact" in options.methods and elbo_star is not None:
        runs.append((exact_run, [exact_run.wall_time]))
    # FM with variance rule "fm" maximises the FM bound, not the ELBO: it runs to its own
    # convergence so that its best bound is FM* = max_q FM(q), the bound's gap to ELBO*.
    own_limits = RunLimits(**{**asdict(limits), "target": None})
    for method in options.methods:
        if method in ("exact", "svi"):
            continue
        logger.info("%s on %s", method, config)
        lim = own_limits if method.startswith("fm-a") else limits
        runs.append(_repeat(
            lambda m=method, lim=lim: run_coordinate(m, params, x, lim, options.omega),
            options.repeats,
        ))
    if "svi" in options.methods:
        for lr in options.svi_lrs:
            logger.info("svi lr=%g on %s", lr, config)
            runs.append(_repeat(
                lambda lr=lr: run_svi_method(params, x, limits, lr, options.svi_loss,
                                             seed=config.seed),
                options.repeats,
            ))
    best = max((r.best_elbo for r, _ in runs), default=-math.inf)
    reference = elbo_star if elbo_star is not None else best
    target = reference - options.tol * abs(reference)
    fm_star = max(
        (r.best_bound for r, _ in runs if r.method.startswith("fm-a")),
        default=max((r.best_bound for r, _ in runs if r.method.startswith("fm")),
                    default=math.nan),
    )
    radius = _jacobi_radius(params) if "jacobi" in options.methods else math.nan
    rows = []
    for run, times in runs:
        sweeps, t = run.to_reach(target)
        scale = t / run.wall_time if t is not None and run.wall_time > 0 else None
        rows.append({
            "widths": "/".join(map(str, config.widths)),
            "n_rows": config.n_rows,
            "epsilon": config.epsilon,
            "parents_per_child": config.parents_per_child or 0,
            "nnz": summary["nnz"],
            "n_eff_mean": summary["n_eff_mean"],
            "method": run.method,
            "outcome": run.outcome,
            "sweeps_to_tol": sweeps,
            "time_to_tol_s": statistics.median(times) * scale if scale is not None else None,
            "sweeps": run.sweeps,
            "wall_time_s": statistics.median(times),
            "final_elbo_per_row": run.final_elbo / config.n_rows,
            "rel_gap": (reference - run.best_elbo) / abs(reference),
            "peak_memory_mb": run.peak_memory_mb,
            "reference": "ELBO*" if elbo_star is not None else "best",
            "elbo_ref_per_row": reference / config.n_rows,
            "fm_gap_per_row": (reference - fm_star) / config.n_rows,
            "jacobi_radius": radius,
        })
    _mark_best_svi(rows)
    return rows, [r for r, _ in runs]


def _mark_best_svi(rows: list[dict]) -> None:
    """Add a row ``svi`` that copies the best SVI learning rate (first to reach, else best)."""
    svi = [r for r in rows if r["method"].startswith("svi@")]
    if not svi:
        return

    def key(row: dict) -> tuple[float, float]:
        t = row["time_to_tol_s"]
        return (t if t is not None else math.inf, row["rel_gap"])

    best = dict(min(svi, key=key))
    best["method"] = f"svi (best: {best['method'][4:]})"
    rows.append(best)


def run_bench(configs: Sequence[BenchConfig], options: BenchOptions) -> BenchResult:
    """Benchmark every method on every model.

    Args:
        configs: the models.
        options: the shared options.

    Returns:
        The :class:`BenchResult`.

    Raises:
        ValueError: for unknown methods or bad options.
    """
    _check_options(options)
    result = BenchResult()
    for config in tqdm(configs, disable=not options.progress, desc="bench"):
        rows, runs = bench_model(config, options)
        result.rows.extend(rows)
        result.runs.append(runs)
        result.configs.append(config)
    return result


@torch.no_grad()
def fm_sweep_rows(
    params: DEFParameters, moments: Moments, row_chunk: int, **kwargs
) -> tuple[Moments, SweepInfo]:
    """:func:`defbound.update.fm_sweep` applied to blocks of ``row_chunk`` data rows.

    Rows are independent given the parameters, so the result equals one sweep over all rows
    (totals summed, largest change maximised); the working set of each block stays in cache,
    which keeps the time per sweep linear in ``N`` once the ``N x K`` arrays outgrow the cache.

    Args:
        params: DEF parameters.
        moments: current moments.
        row_chunk: rows per block, at least 1.
        **kwargs: passed to :func:`defbound.update.fm_sweep`.

    Returns:
        ``(new_moments, info)``.
    """
    if row_chunk < 1:
        raise ValueError(f"row_chunk must be at least 1, got {row_chunk}")
    parts, value, bound, change = [], 0.0, 0.0, 0.0
    for start in range(0, moments.means[0].shape[0], row_chunk):
        rows = slice(start, start + row_chunk)
        sub = Moments(tuple(m[rows] for m in moments.means),
                      tuple(v[rows] for v in moments.variances))
        new, info = fm_sweep(params, sub, **kwargs)
        parts.append(new)
        value, bound = value + info.elbo, bound + info.bound
        change = max(change, info.max_change) if math.isfinite(info.max_change) else math.inf
    joined = Moments(
        tuple(torch.cat([p.means[l] for p in parts]) for l in range(params.depth + 1)),
        tuple(torch.cat([p.variances[l] for p in parts]) for l in range(params.depth + 1)),
    )
    return joined, SweepInfo(value, bound, change)


def scaling_study(
    axis: str,
    sizes: Sequence[int],
    *,
    widths: Sequence[int] = (64, 500, 200, 50),
    n_rows: int = 1000,
    epsilon: float = 0.1,
    sweeps: int = 5,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    row_chunk: int | None = None,
) -> tuple[list[dict], float]:
    r"""Median wall time of one FM sweep as the data or the model grows; fitted log-log slope.

    ``axis="n"``: ``N = size`` rows. ``axis="width"``: every hidden width multiplied by
    ``size / 100`` (dense weights, so ``nnz`` grows with the products of widths).
    ``axis="parents"``: ``size`` parents per child in the non-forest part at fixed widths.
    The slope ``b`` of ``log t = a + b log s`` is fitted by least squares against ``s = N`` or
    ``s = nnz``; ``b = 1`` is linear.

    Args:
        axis: ``"n"``, ``"width"`` or ``"parents"``.
        sizes: at least two sizes.
        widths: base widths.
        n_rows: rows when ``axis`` is not ``"n"``.
        epsilon: non-forest weight.
        sweeps: timed sweeps per size (after one warm-up sweep).
        seed: seed.
        device: torch device.
        dtype: dtype.
        row_chunk: time :func:`fm_sweep_rows` with this many rows per block instead of one
            sweep over all rows.

    Returns:
        ``(rows, slope)``.

    Raises:
        ValueError: for an unknown axis or fewer than two sizes.
    """
    if axis not in ("n", "width", "parents"):
        raise ValueError(f"axis must be 'n', 'width' or 'parents', got {axis!r}")
    if len(sizes) < 2:
        raise ValueError(f"a slope needs at least two sizes, got {list(sizes)}")
    rows = []
    dev = torch.device(device)
    for size in sizes:
        w, n, ppc = list(widths), n_rows, None
        if axis == "n":
            n = int(size)
        elif axis == "width":
            w = [widths[0]] + [max(1, round(k * size / 100)) for k in widths[1:]]
        else:
            ppc = int(size)
        params = synthetic_def(w, epsilon, parents_per_child=ppc, seed=seed, dtype=dtype,
                               device=device)
        x = sample_data(params, n, seed=seed + 1)
        moments = prior_moments(params, x)

        def sweep(m: Moments, params: DEFParameters = params) -> Moments:
            if row_chunk is None:
                return fm_sweep(params, m)[0]
            return fm_sweep_rows(params, m, row_chunk)[0]

        moments = sweep(moments)
        times = []
        for _ in range(sweeps):
            _sync(dev)
            start = time.perf_counter()
            moments = sweep(moments)
            _sync(dev)
            times.append(time.perf_counter() - start)
        summary = model_summary(params)
        dense = sum(a * b for a, b in zip(w[:-1], w[1:], strict=True))
        rows.append({
            "axis": axis, "size": int(size), "widths": "/".join(map(str, w)), "n_rows": n,
            "nnz": summary["nnz"], "dense_entries": dense, "row_chunk": row_chunk or n,
            "sweep_time_s": statistics.median(times),
        })
    xs = np.log([r["n_rows"] if axis == "n" else r["nnz"] for r in rows])
    ys = np.log([r["sweep_time_s"] for r in rows])
    slope = float(np.polyfit(xs, ys, 1)[0])
    return rows, slope


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Render rows as a GitHub markdown table with the given columns."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


TABLE_COLUMNS = (
    "widths", "n_rows", "epsilon", "n_eff_mean", "method", "outcome", "sweeps_to_tol",
    "time_to_tol_s", "sweeps", "wall_time_s", "rel_gap", "peak_memory_mb",
)


def study_table(rows: Sequence[dict]) -> list[dict]:
    """Pivot benchmark rows into the reproduction table: one row per model.

    Columns: ``epsilon``, ``n_eff``, ``ELBO* - FM*`` per row, sweeps to tolerance of every
    sweep method (``-`` when not reached), and the Jacobi outcome with its spectral radius.
    """
    out: dict[tuple, dict] = {}
    for row in rows:
        key = (row["widths"], row["n_rows"], row["epsilon"], row["parents_per_child"])
        entry = out.setdefault(key, {
            "widths": row["widths"], "epsilon": row["epsilon"],
            "n_eff": row["n_eff_mean"], "fm_gap_per_row": row["fm_gap_per_row"],
        })
        method = row["method"]
        if method == "jacobi":
            radius = row["jacobi_radius"]
            reached = row["sweeps_to_tol"]
            entry["jacobi"] = (
                f"{row['outcome']}" + (f" ({reached})" if reached is not None else "")
                + (f", rho={radius:.3g}" if radius == radius else "")
            )
        elif method in ("fm", "fm-or", "fm-a", "fm-a-or", "cavi", "block"):
            entry[method] = row["sweeps_to_tol"]
    return list(out.values())


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Write rows to CSV (columns from the union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_elbo_vs_time(path: Path, result: BenchResult, max_panels: int = 6) -> None:
    """Relative ELBO gap to the reference against wall time, one line per method, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(len(result.configs), max_panels)
    fig, axes = plt.subplots(1, count, figsize=(5 * count, 4), squeeze=False)
    for ax, config, runs in zip(axes[0], result.configs, result.runs, strict=False):
        rows = [r for r in result.rows if r["epsilon"] == config.epsilon
                and r["n_rows"] == config.n_rows]
        reference = rows[0]["elbo_ref_per_row"] * config.n_rows if rows else math.nan
        for run in runs:
            gap = (reference - np.asarray(run.elbos)) / abs(reference)
            gap = np.where(np.isfinite(gap) & (gap > 0), gap, np.nan)
            times = np.asarray(run.times)
            if run.method == "exact":
                ax.axvline(times[0], color="black", linestyle=":", label="exact (Cholesky)")
            else:
                ax.plot(times, gap, label=run.method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("(ELBO_ref - ELBO) / |ELBO_ref|")
        ax.set_title(f"eps={config.epsilon:g}, N={config.n_rows}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps_vs_epsilon(path: Path, rows: Sequence[dict]) -> None:
    """Sweeps to tolerance against epsilon for every sweep method (missing: not reached)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = [m for m in ("fm", "fm-or", "fm-a", "fm-a-or", "cavi", "block", "jacobi")
               if any(r["method"] == m for r in rows)]
    for method in methods:
        pts = sorted((r["epsilon"], r["sweeps_to_tol"]) for r in rows if r["method"] == method)
        eps = [e for e, _ in pts]
        sweeps = [s if s is not None else np.nan for _, s in pts]
        ax.plot(eps, sweeps, marker="o", label=method)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_yscale("log")
    ax.set_xlabel("epsilon (weight of the non-forest part)")
    ax.set_ylabel("sweeps to tolerance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(path: Path, rows: Sequence[dict], slope: float) -> None:
    """Time per FM sweep against N or nnz on log-log axes, with the fitted slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = rows[0]["axis"]
    xs = [r["n_rows"] if axis == "n" else r["nnz"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(xs, [r["sweep_time_s"] for r in rows], marker="o")
    ax.set_xlabel("N" if axis == "n" else "nonzero weights")
    ax.set_ylabel("seconds per FM sweep")
    ax.set_title(f"fitted slope {slope:.2f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
