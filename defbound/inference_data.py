"""Convert a fitted DEF and its guide into an ArviZ ``InferenceData``."""

from __future__ import annotations

import arviz as az
import numpy as np
import torch
import xarray as xr
from torch import Tensor

from defbound.fit import FitResult
from defbound.guide import MeanFieldGuide


def to_inference_data(
    guide: MeanFieldGuide,
    x: Tensor,
    result: FitResult | None = None,
    num_draws: int = 200,
    seed: int = 0,
) -> az.InferenceData:
    """Posterior draws of every hidden layer from the fitted guide, as one chain.

    Groups: ``posterior`` (``{site}`` with dims ``chain, draw, row, {site}_unit``),
    ``observed_data`` (``x`` with dims ``row, x_unit``) and, with ``result``, ``fit_trace``
    (``elbo``, ``bound`` and ``wall_time`` per sweep, totals over rows). ``az.summary`` and
    ArviZ's plots work on the posterior group.

    Args:
        guide: a set-up :class:`MeanFieldGuide` (for example after :func:`defbound.fit`).
        x: the data the guide was fitted to, ``(N, K_0)``.
        result: optional fit record to attach.
        num_draws: draws from q.
        seed: seed of the draws.

    Returns:
        The ``InferenceData``.

    Raises:
        ValueError: if the guide has not been set up or ``num_draws < 1``.
    """
    if not guide.site_names:
        raise ValueError("the guide has no parameters yet: fit it (or call it once) first")
    if num_draws < 1:
        raise ValueError(f"num_draws must be at least 1, got {num_draws}")
    gen = torch.Generator().manual_seed(seed)
    draws = guide.sample_posterior(num_draws, generator=gen)
    posterior = {name: value.cpu().numpy()[None] for name, value in draws.items()}
    dims = {name: ["row", f"{name}_unit"] for name in posterior}
    dims["x"] = ["row", "x_unit"]
    idata = az.from_dict(
        posterior=posterior, observed_data={"x": x.detach().cpu().numpy()}, dims=dims
    )
    if result is not None and result.sweeps:
        trace = xr.Dataset(
            {
                key: ("sweep", np.asarray(getattr(result, key)))
                for key in ("elbo", "bound", "wall_time")
            },
            coords={"sweep": np.arange(1, result.sweeps + 1)},
        )
        idata.add_groups({"fit_trace": trace})
    return idata
