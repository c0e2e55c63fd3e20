"""The forest-mixture bound and the exact mean-field ELBO as ``pyro.infer.ELBO`` objectives.

Both are computed in closed form from the model and guide traces: no sampling, no variance in
the estimate. They apply to models written with :func:`defbound.def_layer` (all sites Gaussian,
one chain of layers, the bottom observed) and a mean-field Normal guide, and refuse anything else
with a message saying why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor

from defbound.bound import elbo, fm_bound
from defbound.state import DEFParameters, Moments
from defbound.structure import DEFStructure, extract_structure, guide_moments


def model_and_guide_state(
    model: Callable, guide: Callable, *args, **kwargs
) -> tuple[DEFStructure, Moments]:
    """Trace ``guide`` and ``model`` and read the DEF and q off the traces.

    Returns:
        ``(structure, moments)``; both are attached to the autograd graph of the params.
    """
    model_trace, guide_trace = _traces(model, guide, args, kwargs)
    structure = extract_structure(model_trace)
    return structure, guide_moments(structure, guide_trace)


def _traces(model: Callable, guide: Callable, args: tuple, kwargs: dict):
    # The closed form needs the model's structure and parameters, not its latent values, so the
    # model is traced on its own: ``poutine.replay`` would overwrite each site's ``infer`` dict
    # (where def_layer records the structure) with the guide's.
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    return model_trace, guide_trace


class _ClosedFormObjective(ELBO):
    """Shared plumbing: ``loss``, ``differentiable_loss`` and ``loss_and_grads`` of ``-value``."""

    def _value(self, params: DEFParameters, moments: Moments) -> Tensor:
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):  # noqa: D102 - required by the base class
        return _traces(model, guide, args, kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """Negative objective as a differentiable scalar (sum over data rows)."""
        structure, moments = model_and_guide_state(model, guide, *args, **kwargs)
        return -self._value(structure.params, moments).sum()

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Negative objective as a float."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Negative objective as a float, after back-propagating it into the params."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()


class FMBound(_ClosedFormObjective):
    r"""Negative collapsed forest-mixture bound ``-FM*(q)`` as a Pyro loss.

    .. math::
        \mathrm{FM}^*(q) = \mathrm{ELBO}(q) - \sum_{l<L}\sum_k
        \frac{(\sum_j |W_{kj}|\sqrt{v_j})^2 - \sum_j W_{kj}^2 v_j}{2\sigma^2_{l,k}}
        \;\le\; \mathrm{ELBO}(q) \;\le\; \log p(x).

    Usable as ``SVI(model, guide, optim, loss=FMBound())`` to learn weights and q by gradient.
    The closed-form parallel updates of :func:`defbound.fit` maximise the same objective.

    .. warning:: Only for Gaussian DEFs written with :func:`defbound.def_layer` and a mean-field
        Normal guide; other models raise ``ValueError``. On dense models the bound is loose
        (its gap grows with the number of effective parents per child): report the exact ELBO
        (:class:`MeanFieldELBO`) next to it.
    """

    def _value(self, params: DEFParameters, moments: Moments) -> Tensor:
        return fm_bound(params, moments)


class MeanFieldELBO(_ClosedFormObjective):
    r"""Negative exact ELBO of a mean-field Normal guide for a Gaussian DEF, in closed form.

    .. math:: \mathrm{ELBO}(q) = E_q[\log p(x, z)] + H[q].

    Equals the expectation of Pyro's ``Trace_ELBO`` estimate for the same model and guide.
    """

    def _value(self, params: DEFParameters, moments: Moments) -> Tensor:
        return elbo(params, moments)
