"""Variational EM for Gaussian DEFs: closed-form sweeps over the local latents, then an M-step."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyro
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import transform_to
from tqdm.auto import tqdm

from defbound.atomic_io import save_torch, write_json
from defbound.blocks import block_plan, block_sweep
from defbound.cavi import cavi_sweep, jacobi_sweep
from defbound.guide import MeanFieldGuide
from defbound.mstep import Learnable, closed_form_mstep
from defbound.state import DEFParameters, Moments
from defbound.structure import DEFStructure, extract_structure
from defbound.svi_baseline import guide_moments, guide_svi
from defbound.update import Schedule, SweepInfo, VarianceRule, fm_sweep, sweep_info

logger = logging.getLogger(__name__)

Method = Literal["fm", "cavi", "jacobi", "block", "svi"]
MStep = Literal["closed-form", "svi", "none"]
METHODS: tuple[str, ...] = ("fm", "cavi", "jacobi", "block", "svi")
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "fit_history.json"


@dataclass
class FitResult:
    """What a fit did, sweep by sweep (totals over data rows).

    Attributes:
        elbo: exact ELBO after every sweep (E-step and M-step).
        bound: collapsed FM bound after every sweep.
        max_change: largest change of any mean in each sweep.
        wall_time: seconds since the start of the fit after every sweep.
        n_rows: number of data rows (divide totals by it for per-row figures).
        converged: whether the stopping rule was met.
        stop_reason: ``"converged"``, ``"max_sweeps"`` or ``"diverged"``.
        config: the options of the fit.
    """

    elbo: list[float] = field(default_factory=list)
    bound: list[float] = field(default_factory=list)
    max_change: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    n_rows: int = 0
    converged: bool = False
    stop_reason: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def sweeps(self) -> int:
        """Number of sweeps done."""
        return len(self.elbo)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        out = asdict(self)
        out["sweeps"] = self.sweeps
        out["elbo_per_row"] = self.elbo[-1] / self.n_rows if self.elbo else None
        out["bound_per_row"] = self.bound[-1] / self.n_rows if self.bound else None
        return out


@dataclass
class _Snapshot:
    store: dict
    sweeps: int


def fit(
    model: Callable[[Tensor], Any],
    x: Tensor,
    guide: MeanFieldGuide | None = None,
    *,
    method: Method = "fm",
    mstep: MStep = "closed-form",
    max_sweeps: int = 1000,
    tol: float = 1e-7,
    patience: int = 3,
    mean_tol: float | None = None,
    variance_rule: VarianceRule = "exact",
    omega: float = 1.0,
    schedule: Schedule = "layerwise",
    min_noise_var: float = 1e-6,
    svi_steps: int = 20,
    svi_lr: float = 0.01,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    callback: Callable[[int, FitResult], None] | None = None,
    partition: Sequence[Sequence[Sequence[int]]] | None = None,
    estep_svi_steps: int = 20,
    estep_svi_lr: float = 0.05,
    estep_svi_loss: str = "meanfield",
) -> FitResult:
    """Fit a Gaussian DEF by variational EM with closed-form parallel E-step sweeps.

    Every sweep (1) updates the guide's means and variances layer by layer with ``method``
    (``"fm"``: the forest-mixture closed form of :func:`defbound.update.layer_update`, every
    variable of a layer at once; ``"cavi"``: sequential single-variable CAVI; ``"jacobi"``:
    layer-parallel CAVI, which may diverge; ``"block"``: block coordinate ascent over the
    co-parent colouring or ``partition``; ``"svi"``: ``estep_svi_steps`` Adam steps of Pyro's
    SVI on the guide's params), then (2) re-estimates the model's learnable
    parameters (Pyro params passed to :func:`defbound.def_layer`) by the closed-form M-step of
    :func:`defbound.mstep.closed_form_mstep`, or by ``svi_steps`` Adam steps on ``-FM*``
    (``mstep="svi"``), or leaves them alone (``"none"``: pure inference). It stops when
    ``|ELBO_t - ELBO_{t-1}| <= tol |ELBO_t|`` (and, with ``mean_tol``, no mean moved by more
    than ``mean_tol`` in the sweep) for ``patience`` sweeps in a row, when the
    sweep limit is reached, or when the iterates become non-finite (the guide then keeps the
    last finite state).

    Args:
        model: Pyro model built from :func:`defbound.def_layer`, called as ``model(x)``.
        x: data, ``(N, K_0)``; its device and dtype are used throughout.
        guide: the mean-field guide (created if omitted); its params are updated in place.
        method: E-step method.
        mstep: M-step kind.
        max_sweeps: sweep limit (counting sweeps restored from a checkpoint).
        tol: relative ELBO tolerance.
        patience: sweeps in a row within ``tol`` needed to stop.
        mean_tol: optional bound on the largest change of any mean for convergence; the ELBO
            is flat to rounding near its optimum, so use this when the means themselves must be
            accurate.
        variance_rule: ``"exact"`` (``1/Lambda_jj``, the ELBO optimum) or ``"fm"``
            (``1/D``, the FM bound's own maximiser); FM method only.
        omega: over-relaxation of the FM mean step, in ``(0, 2)``.
        schedule: ``"layerwise"`` or ``"odd-even"`` (FM method only).
        min_noise_var: floor on learned noise variances.
        svi_steps: Adam steps per sweep for ``mstep="svi"``.
        svi_lr: Adam learning rate for ``mstep="svi"``.
        progress: show a tqdm progress bar with the current bound.
        checkpoint_dir: where to keep ``checkpoint.pt`` (param store + history), written
            atomically every ``checkpoint_every`` sweeps, at the end and on interruption.
        checkpoint_every: sweeps between checkpoints.
        resume: continue from ``checkpoint_dir``'s checkpoint if there is one.
        callback: called as ``callback(sweep, result)`` after every sweep.
        partition: user blocks for ``method="block"`` (see
            :func:`defbound.blocks.check_partition`); default: co-parent colouring.
        estep_svi_steps: SVI steps per E-step for ``method="svi"``.
        estep_svi_lr: Adam learning rate of those steps.
        estep_svi_loss: ``"meanfield"`` (``TraceMeanField_ELBO``) or ``"trace"``
            (``Trace_ELBO``) for ``method="svi"``.

    Returns:
        The :class:`FitResult`.

    Raises:
        ValueError: for unknown options, bad data, or a model the bound does not apply to.
    """
    _check_options(method, mstep, max_sweeps, tol, patience, omega)
    _check_data(x)
    if mstep != "none" and x.shape[0] < 2:
        raise ValueError(
            f"learning parameters needs at least 2 data rows, got {x.shape[0]} (pass "
            "mstep='none' for inference only)"
        )
    guide = guide if guide is not None else MeanFieldGuide(model)
    guide.ensure_setup(x)
    if mstep != "none" and x.shape[0] > 1 and bool((x.std(0) == 0).any()):
        warnings.warn(
            "some data columns are constant: their noise variance collapses to min_noise_var "
            "and the ELBO is then dominated by that floor; drop constant columns first",
            stacklevel=2,
        )
    result = FitResult(n_rows=int(x.shape[0]))
    result.config = {
        "method": method, "mstep": mstep, "max_sweeps": max_sweeps, "tol": tol,
        "patience": patience, "mean_tol": mean_tol, "variance_rule": variance_rule, "omega": omega,
        "schedule": schedule, "min_noise_var": min_noise_var,
    }
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    elapsed = 0.0
    if resume and ckpt is not None and ckpt.exists():
        required = {n for s in guide.site_names for n in (guide.loc_name(s), guide.scale_name(s))}
        elapsed = _restore(ckpt, result, required)
        logger.info("resumed from %s after %d sweeps", ckpt, result.sweeps)

    estep_svi = None
    if method == "svi":
        if estep_svi_steps < 1:
            raise ValueError(f"estep_svi_steps must be at least 1, got {estep_svi_steps}")
        estep_svi = guide_svi(model, guide, x, estep_svi_lr, estep_svi_loss)

    def step(params: DEFParameters, moments: Moments) -> tuple[Moments, SweepInfo]:
        if method == "block":
            return block_sweep(params, moments, block_plan(params, partition))
        if method == "svi":
            for _ in range(estep_svi_steps):
                estep_svi.step(x)
            new = guide_moments(guide, x)
            change = max(
                (a - b).abs().max().item()
                for a, b in zip(new.means[1:], moments.means[1:], strict=True)
            )
            return new, sweep_info(params, new, change)
        if method == "fm":
            return fm_sweep(params, moments, variance_rule, omega, schedule)
        if method == "cavi":
            return cavi_sweep(params, moments)
        return jacobi_sweep(params, moments)

    snapshot = _snapshot(result) if ckpt is not None else None
    start = time.perf_counter() - elapsed
    within = 0
    bar = tqdm(total=max_sweeps, initial=result.sweeps, disable=not progress, desc=method)
    try:
        while result.sweeps < max_sweeps:
            structure, names = _trace_structure(model, x)
            params = structure.params.detach()
            moments, info = step(params, _detached(guide.moments(structure)))
            if not _finite(moments):
                result.stop_reason = "diverged"
                logger.warning("%s iterates became non-finite at sweep %d", method, result.sweeps)
                break
            guide.set_moments(structure, moments)
            params = _maximise(
                model, guide, x, structure, names, moments, mstep, min_noise_var, svi_steps, svi_lr
            )
            value, bound, _ = sweep_info(params, moments, info.max_change)
            previous = result.elbo[-1] if result.elbo else None
            result.elbo.append(value)
            result.bound.append(bound)
            result.max_change.append(info.max_change)
            result.wall_time.append(time.perf_counter() - start)
            bar.update(1)
            n = result.n_rows
            bar.set_postfix(elbo=f"{value / n:.4f}", bound=f"{bound / n:.4f}")
            if not math.isfinite(value):
                result.stop_reason = "diverged"
                break
            if ckpt is not None:
                snapshot = _snapshot(result)
                if result.sweeps % checkpoint_every == 0:
                    _save(ckpt, snapshot, result)
            if callback is not None:
                callback(result.sweeps, result)
            small = previous is not None and abs(value - previous) <= tol * abs(value)
            if small and (mean_tol is None or info.max_change <= mean_tol):
                within += 1
                if within >= patience:
                    result.converged = True
                    result.stop_reason = "converged"
                    break
            else:
                within = 0
        else:
            result.stop_reason = "max_sweeps"
    except KeyboardInterrupt:
        if ckpt is not None:
            _save(ckpt, snapshot, result)
            logger.warning("interrupted: last complete sweep saved to %s", ckpt)
        raise
    finally:
        bar.close()
    if result.stop_reason == "" and result.sweeps >= max_sweeps:
        result.stop_reason = "max_sweeps"
    if ckpt is not None:
        _save(ckpt, _snapshot(result), result)
    logger.info(
        "%s: %d sweeps, stop=%s, ELBO/row=%.6g", method, result.sweeps, result.stop_reason,
        result.elbo[-1] / result.n_rows if result.elbo else float("nan"),
    )
    return result


def _check_options(method, mstep, max_sweeps, tol, patience, omega) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mstep not in ("closed-form", "svi", "none"):
        raise ValueError(f"mstep must be 'closed-form', 'svi' or 'none', got {mstep!r}")
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be at least 1, got {max_sweeps}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    if not 0 < omega < 2:
        raise ValueError(f"omega must lie in (0, 2), got {omega}")


def _check_data(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"data must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"data must be a matrix (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"data is empty: shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"data has {int((~torch.isfinite(x)).sum())} NaN or infinite values")
    if not x.is_floating_point():
        raise ValueError(f"data must be a floating-point tensor, got dtype {x.dtype}")


def _trace_structure(model: Callable, x: Tensor) -> tuple[DEFStructure, dict[int, str]]:
    """The model's DEF structure and a map from param tensor ids to param-store names."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(x)
    names = {id(s["value"]): n for n, s in trace.nodes.items() if s["type"] == "param"}
    return extract_structure(trace), names


def _detached(moments: Moments) -> Moments:
    return Moments(
        tuple(m.detach() for m in moments.means), tuple(v.detach() for v in moments.variances)
    )


def _finite(moments: Moments) -> bool:
    return all(bool(torch.isfinite(m).all()) for m in moments.means[1:])


def _maximise(
    model: Callable,
    guide: MeanFieldGuide,
    x: Tensor,
    structure: DEFStructure,
    names: dict[int, str],
    moments: Moments,
    mstep: str,
    min_noise_var: float,
    svi_steps: int,
    svi_lr: float,
) -> DEFParameters:
    """Run the M-step; return the parameters now in force."""
    params = structure.params.detach()
    if mstep == "none" or not names:
        return params
    if mstep == "svi":
        _svi_mstep(model, guide, x, set(names.values()), svi_steps, svi_lr)
        return _trace_structure(model, x)[0].params.detach()
    learn = Learnable(
        weights=tuple(id(w) in names for w in structure.weights),
        biases=tuple(id(b) in names for b in structure.biases),
        noise=tuple(id(s) in names for s in structure.noise_scales),
    )
    new = closed_form_mstep(params, moments, learn, structure.masks, min_noise_var)
    for flag, raw, value in zip(learn.weights, structure.weights, new.weights, strict=True):
        if flag:
            _write_param(names[id(raw)], value)
    for flag, raw, value in zip(learn.biases, structure.biases, new.biases, strict=True):
        if flag:
            _write_param(names[id(raw)], value)
    for flag, raw, value in zip(learn.noise, structure.noise_scales, new.noise_vars, strict=True):
        if flag:
            _write_param(names[id(raw)], value.sqrt().expand_as(raw))
    return new


def _write_param(name: str, value: Tensor) -> None:
    """Write a constrained value into the param store, in place on the unconstrained tensor."""
    store = pyro.get_param_store()
    constraint = store.get_state()["constraints"][name]
    unconstrained = dict(store.named_parameters())[name]
    with torch.no_grad():
        unconstrained.copy_(transform_to(constraint).inv(value))


def _svi_mstep(model, guide, x, model_params: set[str], steps: int, lr: float) -> None:
    """Adam steps on ``-FM*`` that move only the model's params (guide params get lr 0)."""
    from defbound.elbo import FMBound

    def per_param(name: str, _param: Tensor) -> dict[str, float]:
        return {"lr": lr if name in model_params else 0.0}

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam(per_param), loss=FMBound())
    for _ in range(steps):
        svi.step(x)


def _snapshot(result: FitResult) -> _Snapshot:
    """Copy of the param store after a complete sweep, to save if the run is interrupted."""
    state = pyro.get_param_store().get_state()
    params = {k: v.detach().clone() for k, v in state["params"].items()}
    return _Snapshot({"params": params, "constraints": state["constraints"]}, result.sweeps)


def _save(path: Path, snapshot: _Snapshot, result: FitResult) -> None:
    """Write a checkpoint and the history so far atomically (temporary file, then rename)."""
    history = result.to_dict()
    for key in ("elbo", "bound", "max_change", "wall_time"):
        history[key] = history[key][: snapshot.sweeps]
    history["sweeps"] = snapshot.sweeps
    save_torch(path, {"param_store": snapshot.store, "result": history})
    write_json(path.with_name(HISTORY_FILE), history)


def _restore(path: Path, result: FitResult, required: set[str]) -> float:
    """Load a checkpoint into the param store after checking it belongs to this model and data."""
    try:
        state = torch.load(path, weights_only=False)
        saved_params = state["param_store"]["params"]
    except Exception as err:  # any unreadable file gets the same message
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}): {err}") from err
    store = pyro.get_param_store()
    current = {name: tuple(store[name].shape) for name in store}
    saved = {name: tuple(value.shape) for name, value in saved_params.items()}
    # every saved param must exist now with its shape, and every param of this fit must be saved
    names = set(saved) | set(required)
    differ = sorted(n for n in names if current.get(n) != saved.get(n))
    if differ:
        raise ValueError(
            f"checkpoint {path} was written for another model or data: parameters {differ[:6]} "
            f"differ in name or shape (checkpoint {[saved.get(n) for n in differ[:6]]}, now "
            f"{[current.get(n) for n in differ[:6]]}); resume with the same model and data"
        )
    store.set_state(state["param_store"])
    saved = state["result"]
    for key in ("elbo", "bound", "max_change", "wall_time"):
        getattr(result, key).extend(saved[key])
    return result.wall_time[-1] if result.wall_time else 0.0
