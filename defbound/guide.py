"""Mean-field Normal guide whose parameters live in Pyro's param store."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import constraints, transform_to

from defbound.state import Moments, prior_moments
from defbound.structure import DEFStructure, extract_structure


class MeanFieldGuide:
    """Mean-field Normal guide ``q(z) = prod_{l,k} N(z_{l,k}; m_{l,k}, v_{l,k})`` for a DEF.

    One location and one scale per data row and hidden unit, stored as Pyro params
    ``"{prefix}.loc.{site}"`` and ``"{prefix}.scale.{site}"`` (scale constrained positive). The
    sites are discovered by tracing the model on the first call; locations start at the
    ancestral prior means and scales at the layer's noise scale.

    Example:
        >>> guide = MeanFieldGuide(model)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), FMBound())

    Args:
        model: a Pyro model built from :func:`defbound.def_layer`, called with the data.
        prefix: prefix of the param names.
    """

    def __init__(self, model: Callable, prefix: str = "q") -> None:
        self.model = model
        self.prefix = prefix
        self._sites: dict[str, int] | None = None  # hidden site -> width
        self._plate: str | None = None
        self._rows = 0

    @property
    def site_names(self) -> tuple[str, ...]:
        """Hidden site names, bottom to top (empty before the guide is set up)."""
        return tuple(self._sites or ())

    def loc_name(self, site: str) -> str:
        """Param-store name of a site's location."""
        return f"{self.prefix}.loc.{site}"

    def scale_name(self, site: str) -> str:
        """Param-store name of a site's scale."""
        return f"{self.prefix}.scale.{site}"

    def _setup(self, *args, **kwargs) -> None:
        with poutine.block():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        structure = extract_structure(trace)
        init = prior_moments(structure.params.detach(), structure.data)
        self._sites = {}
        plates = set()
        for layer, name in enumerate(structure.latent_names, start=1):
            frames = [f for f in trace.nodes[name]["cond_indep_stack"] if f.dim == -1]
            plates.add(frames[0].name if frames else None)
            self._sites[name] = int(init.means[layer].shape[-1])
            mean, var = init.means[layer], init.variances[layer]
            pyro.param(self.loc_name(name), lambda m=mean: m.clone())
            pyro.param(
                self.scale_name(name),
                lambda v=var: v.sqrt().clone(),
                constraint=constraints.positive,
            )
        if len(plates) > 1:
            raise ValueError(
                f"the hidden layers sit in different data plates {sorted(map(str, plates))}; "
                "put every layer inside one pyro.plate over the data rows"
            )
        self._plate = plates.pop()
        self._rows = int(structure.data.shape[0])

    def __call__(self, *args, **kwargs) -> dict[str, Tensor]:
        """Sample every hidden layer from q; returns the samples by site name."""
        if self._sites is None:
            self._setup(*args, **kwargs)
        samples = {}
        with contextlib.ExitStack() as stack:
            if self._plate is not None:
                stack.enter_context(pyro.plate(self._plate, self._rows, dim=-1))
            for name in reversed(self._sites):  # top-down, the model's order
                loc = pyro.param(self.loc_name(name))
                scale = pyro.param(self.scale_name(name), constraint=constraints.positive)
                samples[name] = pyro.sample(name, dist.Normal(loc, scale).to_event(1))
        return samples

    def ensure_setup(self, *args, **kwargs) -> None:
        """Create the params (if not yet there) without sampling."""
        if self._sites is None:
            self._setup(*args, **kwargs)

    def moments(self, structure: DEFStructure) -> Moments:
        """Current means and variances of q, ``means[0]`` the data of ``structure``."""
        x = structure.data
        means, variances = [x], [torch.zeros_like(x)]
        for name in structure.latent_names:
            means.append(pyro.param(self.loc_name(name)))
            variances.append(pyro.param(self.scale_name(name)) ** 2)
        return Moments(tuple(means), tuple(variances))

    @torch.no_grad()
    def set_moments(self, structure: DEFStructure, moments: Moments) -> None:
        """Write means and variances into the param store in place.

        The unconstrained tensors are updated with ``copy_``, so an optimiser that holds them
        keeps working on the new values.
        """
        store = pyro.get_param_store()
        unconstrained = dict(store.named_parameters())
        for layer, name in enumerate(structure.latent_names, start=1):
            unconstrained[self.loc_name(name)].copy_(moments.means[layer])
            positive = transform_to(constraints.positive)
            unconstrained[self.scale_name(name)].copy_(positive.inv(moments.variances[layer].sqrt()))

    def sample_posterior(self, num_draws: int, generator: torch.Generator | None = None) -> dict:
        """Independent draws from q, ``{site: (num_draws, N, K)}``."""
        draws = {}
        for name in self._sites or {}:
            loc = pyro.param(self.loc_name(name)).detach()
            scale = pyro.param(self.scale_name(name)).detach()
            noise = torch.randn(
                (num_draws, *loc.shape), generator=generator, dtype=loc.dtype, device="cpu"
            ).to(loc.device)
            draws[name] = loc + scale * noise
        return draws
