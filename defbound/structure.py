"""Read a Gaussian DEF's layer chain and parameters off a Pyro model trace."""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from defbound.layer import SITE_KEY
from defbound.state import DEFParameters, Moments


@dataclass(frozen=True)
class DEFStructure:
    """A Gaussian DEF found in a model trace: a chain of layers from the data to the top.

    Attributes:
        names: sample site names, ``names[0]`` the observed site, ``names[L]`` the top.
        params: parameters with masks applied, still attached to the autograd graph.
        data: the observed value ``x`` of shape ``(N, K_0)``.
        weights: raw (unmasked) weight tensors as passed to ``def_layer``, ``L`` of them.
        masks: ``L`` masks or ``None``.
        biases: raw bias tensors, ``L + 1``.
        noise_scales: raw noise-scale tensors, ``L + 1``.
    """

    names: tuple[str, ...]
    params: DEFParameters
    data: Tensor
    weights: tuple[Tensor, ...]
    masks: tuple[Tensor | None, ...]
    biases: tuple[Tensor, ...]
    noise_scales: tuple[Tensor, ...]

    @property
    def latent_names(self) -> tuple[str, ...]:
        """Hidden site names, bottom (layer 1) to top (layer L)."""
        return self.names[1:]


def extract_structure(trace: poutine.Trace) -> DEFStructure:
    """Find the DEF chain in a model trace and check that the FM bound applies to it.

    Every sample site (plates aside) must come from :func:`defbound.def_layer`; exactly one is
    observed and it is the bottom of a single chain from one top layer.

    Args:
        trace: a trace of the model (for example replayed against a guide).

    Returns:
        The :class:`DEFStructure`.

    Raises:
        ValueError: naming the site when a site is not a Gaussian DEF layer, names a parent that
            is not in the model, the layers do not form one chain, or the observed site is missing
            or not at the bottom.
    """
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if SITE_KEY not in site["infer"]:
            raise ValueError(
                f"site {name!r} ({type(site['fn']).__name__}) is not a Gaussian DEF layer: the "
                "FM bound applies only to models whose sample sites are all made by "
                "defbound.def_layer"
            )
        if site["scale"] != 1.0:
            raise ValueError(
                f"site {name!r} is scaled by {site['scale']}: subsampled or scaled data is not "
                "supported by the closed-form bound; pass all rows"
            )
        sites[name] = site
    if not sites:
        raise ValueError("the model has no defbound.def_layer sites")
    names = _chain(sites)
    return _collect(sites, names)


def _chain(sites: dict) -> tuple[str, ...]:
    children: dict[str, list[str]] = {name: [] for name in sites}
    tops = []
    for name, site in sites.items():
        parent = site["infer"][SITE_KEY]["parent"]
        if parent is None:
            tops.append(name)
        elif parent not in sites:
            raise ValueError(
                f"layer {name!r} names parent {parent!r}, which is not a DEF sample site of the "
                f"model (sites: {sorted(sites)})"
            )
        else:
            children[parent].append(name)
    if len(tops) != 1:
        raise ValueError(f"expected exactly one top layer (no parent), found {sorted(tops)}")
    chain = [tops[0]]
    while children[chain[-1]]:
        kids = children[chain[-1]]
        if len(kids) > 1:
            raise ValueError(
                f"layer {chain[-1]!r} has several child layers {sorted(kids)}; only a single "
                "chain of layers (one child layer per layer) is supported"
            )
        chain.append(kids[0])
    if len(chain) != len(sites):
        stray = sorted(set(sites) - set(chain))
        raise ValueError(f"layers {stray} are not on the chain below the top {tops[0]!r}")
    if len(chain) < 2:
        raise ValueError("a DEF needs at least one hidden layer above the observed layer")
    bottom = sites[chain[-1]]
    if not bottom["is_observed"]:
        raise ValueError(f"the bottom layer {chain[-1]!r} must be observed (pass obs=x)")
    observed_above = [n for n in chain[:-1] if sites[n]["is_observed"]]
    if observed_above:
        raise ValueError(f"only the bottom layer may be observed, also observed: {observed_above}")
    return tuple(reversed(chain))


def _collect(sites: dict, names: tuple[str, ...]) -> DEFStructure:
    records = [sites[n]["infer"][SITE_KEY] for n in names]
    L = len(names) - 1
    scales = tuple(r["noise_scale"] for r in records)
    params = DEFParameters(
        weights=tuple(records[l]["effective_weights"] for l in range(L)),
        biases=tuple(r["bias"] for r in records),
        noise_vars=tuple(s**2 for s in scales),
    )
    data = sites[names[0]]["value"]
    return DEFStructure(
        names=names,
        params=params,
        data=data,
        weights=tuple(records[l]["weights"] for l in range(L)),
        masks=tuple(records[l]["mask"] for l in range(L)),
        biases=tuple(r["bias"] for r in records),
        noise_scales=scales,
    )


def guide_moments(structure: DEFStructure, guide_trace: poutine.Trace) -> Moments:
    """Means and variances of q for every hidden layer, read from a mean-field guide trace.

    Args:
        structure: the model's DEF structure.
        guide_trace: trace of a guide with a ``Normal(loc, scale).to_event(1)`` site for every
            hidden layer (``Normal`` without ``to_event`` is accepted too).

    Returns:
        :class:`Moments` with ``means[0]`` the data.

    Raises:
        ValueError: when a hidden site has no guide site, or the guide site is not Normal or has
            the wrong shape.
    """
    x = structure.data
    means, variances = [x], [torch.zeros_like(x)]
    for name in structure.latent_names:
        if name not in guide_trace.nodes:
            raise ValueError(
                f"latent site {name!r} has no guide site: the guide must sample every hidden "
                "layer of the model"
            )
        fn = guide_trace.nodes[name]["fn"]
        base = fn.base_dist if isinstance(fn, dist.Independent) else fn
        if not isinstance(base, dist.Normal):
            raise ValueError(
                f"guide site {name!r} is {type(base).__name__}; the closed-form bound needs a "
                "mean-field Normal guide"
            )
        expected = (x.shape[0], _width(structure, name))
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        if tuple(loc.shape) != expected:
            raise ValueError(
                f"guide site {name!r} has shape {tuple(loc.shape)}, expected {expected}"
            )
        means.append(loc)
        variances.append(scale**2)
    return Moments(tuple(means), tuple(variances))


def _width(structure: DEFStructure, name: str) -> int:
    return int(structure.params.biases[structure.names.index(name)].shape[0])
