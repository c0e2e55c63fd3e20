"""Growing networks with Gauss-Newton-learned morphisms, baselines and the growth loop."""

from nas.growing.baselines import (
    FireflyGrowth,
    GradMaxGrowth,
    NashSearch,
    RandomGrowth,
    TinyGrowth,
)
from nas.growing.candidates import Candidate, GrowthContext, GrowthStep, select_candidates
from nas.growing.gauss_newton import GaussNewtonConfig, GaussNewtonGrowth, learn_morphism
from nas.growing.loop import GrowthConfig, GrowthResult, run_growth, train_static
from nas.growing.seeds import NetworkSpec, widths_of

__all__ = [
    "Candidate",
    "FireflyGrowth",
    "GaussNewtonConfig",
    "GaussNewtonGrowth",
    "GradMaxGrowth",
    "GrowthConfig",
    "GrowthContext",
    "GrowthResult",
    "GrowthStep",
    "NashSearch",
    "NetworkSpec",
    "RandomGrowth",
    "TinyGrowth",
    "learn_morphism",
    "run_growth",
    "select_candidates",
    "train_static",
    "widths_of",
]
