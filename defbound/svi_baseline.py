r"""Pyro's standard path as a baseline: SVI with an ``AutoNormal`` guide and Adam.

The guide ``q(z) = prod N(z_{l,k}; loc, scale^2)`` is the same mean-field family the closed-form
sweeps use, so its current locations and scales map one to one onto :class:`Moments`
(``m = loc``, ``v = scale^2``). Progress is measured with the closed-form ELBO of
:func:`defbound.bound.elbo` at those moments, not with the noisy Monte-Carlo loss, so SVI and the
coordinate methods are compared on one scale:

.. math::
    \mathrm{ELBO}(q) = E_q[\log p(x, z)] + H[q] \quad\text{(closed form, no sampling)}.

The training objective is Pyro's own estimator: ``TraceMeanField_ELBO`` (analytic KL terms, one
sample for the likelihood) or ``Trace_ELBO`` (all terms sampled).

.. warning::
    The ``AutoNormal`` parameters live in Pyro's global param store under
    ``"AutoNormal.locs.<site>"`` and ``"AutoNormal.scales.<site>"``; :class:`SVIBaseline` clears
    those names when it starts so two runs never share a guide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_mean
from torch import Tensor

from defbound.guide import MeanFieldGuide
from defbound.model import GaussianDEF
from defbound.state import DEFParameters, Moments, check_parameters
from defbound.update import SweepInfo, sweep_info

logger = logging.getLogger(__name__)

SVILoss = Literal["meanfield", "trace"]
SVI_LOSSES: tuple[str, ...] = ("meanfield", "trace")


def make_loss(loss: SVILoss, num_particles: int = 1) -> pyro.infer.ELBO:
    """Pyro's ELBO estimator by name: ``"meanfield"`` or ``"trace"``.

    Raises:
        ValueError: for an unknown name or ``num_particles < 1``.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be at least 1, got {num_particles}")
    if loss == "meanfield":
        return TraceMeanField_ELBO(num_particles=num_particles)
    if loss == "trace":
        return Trace_ELBO(num_particles=num_particles)
    raise ValueError(f"loss must be one of {SVI_LOSSES}, got {loss!r}")


def model_from_parameters(params: DEFParameters) -> GaussianDEF:
    """A :class:`GaussianDEF` Pyro model with ``params`` fixed (not learnable)."""
    check_parameters(params)
    ref = params.biases[0]
    return GaussianDEF(
        params.widths,
        weights=params.weights,
        biases=params.biases,
        noise_scales=[v.sqrt() for v in params.noise_vars],
        learnable=False,
        dtype=ref.dtype,
        device=ref.device,
    )


class SVIBaseline:
    """SVI on a Gaussian DEF with fixed parameters: ``AutoNormal`` guide, Adam, Pyro's loss.

    Each :meth:`step` is one stochastic gradient step of the chosen estimator;
    :meth:`moments` maps the guide's current ``loc``/``scale`` onto :class:`Moments` and
    :meth:`info` evaluates the closed-form ELBO and FM bound there.

    Example:
        >>> run = SVIBaseline(params, x, lr=0.05)
        >>> for _ in range(100):
        ...     run.step()
        >>> run.info().elbo

    Args:
        params: DEF parameters (held fixed).
        x: data, ``(N, K_0)``; its dtype and device are used.
        lr: Adam learning rate.
        loss: ``"meanfield"`` (``TraceMeanField_ELBO``) or ``"trace"`` (``Trace_ELBO``).
        num_particles: Monte-Carlo samples per step.
        init_scale: initial guide scale (the guide's locations start at the ancestral means).
        seed: seed of Pyro's random state for the run.

    Raises:
        ValueError: for a non-positive learning rate or an unknown loss.
    """

    def __init__(
        self,
        params: DEFParameters,
        x: Tensor,
        *,
        lr: float = 0.01,
        loss: SVILoss = "meanfield",
        num_particles: int = 1,
        init_scale: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        self.params = params.detach()
        self.x = x
        self.model = model_from_parameters(self.params)
        store = pyro.get_param_store()
        for name in [n for n, _ in store.named_parameters() if n.startswith("AutoNormal.")]:
            del store[name]
        pyro.set_rng_seed(seed)
        self.guide = AutoNormal(self.model, init_loc_fn=init_to_mean, init_scale=init_scale)
        self.svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": lr}), make_loss(
            loss, num_particles))
        self.steps = 0
        self.guide(x)  # create the params before the first step

    def step(self, num_steps: int = 1) -> float:
        """Run ``num_steps`` SVI steps; return the last Monte-Carlo loss (negative ELBO)."""
        value = float("nan")
        for _ in range(num_steps):
            value = self.svi.step(self.x)
            self.steps += 1
        return value

    @torch.no_grad()
    def moments(self) -> Moments:
        """The guide's current means and variances as :class:`Moments`."""
        means, variances = [self.x], [torch.zeros_like(self.x)]
        for layer in range(1, self.params.depth + 1):
            site = self.model.site_name(layer)
            means.append(getattr(self.guide.locs, site).detach().clone())
            variances.append(getattr(self.guide.scales, site).detach().clone() ** 2)
        return Moments(tuple(means), tuple(variances))

    @torch.no_grad()
    def info(self, previous: Moments | None = None) -> SweepInfo:
        """Closed-form ELBO and FM bound at the current guide; change measured from ``previous``."""
        moments = self.moments()
        change = float("nan")
        if previous is not None:
            change = max(
                (a - b).abs().max().item()
                for a, b in zip(moments.means[1:], previous.means[1:], strict=True)
            )
        return sweep_info(self.params, moments, change)


def guide_moments(guide: MeanFieldGuide, x: Tensor) -> Moments:
    """Current moments of a :class:`MeanFieldGuide` (set up on ``x``), detached."""
    means, variances = [x], [torch.zeros_like(x)]
    for site in guide.site_names:
        means.append(pyro.param(guide.loc_name(site)).detach().clone())
        variances.append(pyro.param(guide.scale_name(site)).detach().clone() ** 2)
    return Moments(tuple(means), tuple(variances))


def guide_svi(
    model: Callable,
    guide: MeanFieldGuide,
    x: Tensor,
    lr: float,
    loss: SVILoss = "meanfield",
) -> SVI:
    """SVI that moves only the guide's params (model params get learning rate 0).

    Used as the E-step of variational EM with ``method="svi"``: a batch of Adam steps on the
    Monte-Carlo ELBO in place of a closed-form sweep.

    Args:
        model: the Pyro model.
        guide: its :class:`MeanFieldGuide`, already set up.
        x: data.
        lr: Adam learning rate of the guide params.
        loss: ``"meanfield"`` or ``"trace"``.

    Returns:
        A :class:`pyro.infer.SVI` whose ``step(x)`` takes one E-step gradient step.
    """
    guide.ensure_setup(x)
    own = {n for s in guide.site_names for n in (guide.loc_name(s), guide.scale_name(s))}

    def per_param(name: str, _param: Tensor) -> dict[str, float]:
        return {"lr": lr if name in own else 0.0}

    return SVI(model, guide, pyro.optim.Adam(per_param), loss=make_loss(loss))


def run_svi(
    params: DEFParameters,
    x: Tensor,
    *,
    steps: int,
    lr: float = 0.01,
    loss: SVILoss = "meanfield",
    eval_every: int = 10,
    seed: int = 0,
) -> tuple[Moments, list[SweepInfo], list[float]]:
    """Run SVI for ``steps`` steps and record the closed-form ELBO every ``eval_every`` steps.

    Args:
        params: DEF parameters (held fixed).
        x: data.
        steps: number of SVI steps.
        lr: Adam learning rate.
        loss: ``"meanfield"`` or ``"trace"``.
        eval_every: steps between ELBO evaluations.
        seed: Pyro seed.

    Returns:
        ``(moments, infos, times)``: final moments, one record per evaluation, and the
        training wall time (evaluation excluded) at each evaluation.
    """
    run = SVIBaseline(params, x, lr=lr, loss=loss, seed=seed)
    infos, times, elapsed = [], [], 0.0
    previous = run.moments()
    while run.steps < steps:
        start = time.perf_counter()
        run.step(min(eval_every, steps - run.steps))
        elapsed += time.perf_counter() - start
        infos.append(run.info(previous))
        times.append(elapsed)
        previous = run.moments()
    logger.info("SVI lr=%g: %d steps, ELBO %.6g", lr, run.steps, infos[-1].elbo)
    return previous, infos, times
