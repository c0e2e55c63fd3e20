"""Deep exponential families in Pyro, fitted with the forest-mixture (FM) bound.

The public API: write a model with :func:`def_layer` (or use :class:`GaussianDEF`), pair it with
a :class:`MeanFieldGuide`, and either :func:`fit` it by closed-form sweeps and variational EM or
train it with ``pyro.infer.SVI(model, guide, optim, loss=FMBound())``.
"""

from defbound.bound import elbo, fm_bound, fm_gap
from defbound.elbo import FMBound, MeanFieldELBO
from defbound.fit import FitResult, fit
from defbound.guide import MeanFieldGuide
from defbound.layer import def_layer
from defbound.model import GaussianDEF
from defbound.state import DEFParameters, Moments

__version__ = "0.1.0"

__all__ = [
    "DEFParameters",
    "FMBound",
    "FitResult",
    "GaussianDEF",
    "MeanFieldELBO",
    "MeanFieldGuide",
    "Moments",
    "def_layer",
    "elbo",
    "fit",
    "fm_bound",
    "fm_gap",
]
