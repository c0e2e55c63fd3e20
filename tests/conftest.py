import pyro
import pytest
import torch

from defbound.state import DEFParameters, Moments


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def random_params(widths, seed=0, forest=False, density=1.0, dtype=torch.float64):
    """Random Gaussian DEF parameters; ``forest`` keeps one parent per child."""
    g = torch.Generator().manual_seed(seed)
    weights = []
    for l in range(len(widths) - 1):
        W = torch.randn(widths[l], widths[l + 1], generator=g, dtype=dtype)
        if forest:
            keep = torch.zeros_like(W)
            parent = torch.randint(widths[l + 1], (widths[l],), generator=g)
            keep[torch.arange(widths[l]), parent] = 1
            W = W * keep
        elif density < 1:
            W = W * (torch.rand(W.shape, generator=g, dtype=dtype) < density)
        weights.append(W)
    biases = [torch.randn(k, generator=g, dtype=dtype) for k in widths]
    noise = [0.3 + torch.rand(k, generator=g, dtype=dtype) for k in widths]
    return DEFParameters(tuple(weights), tuple(biases), tuple(noise))


def random_moments(params, x, seed=1):
    g = torch.Generator().manual_seed(seed)
    N = x.shape[0]
    means = [x] + [torch.randn(N, k, generator=g, dtype=x.dtype) for k in params.widths[1:]]
    variances = [torch.zeros_like(x)] + [
        0.05 + torch.rand(N, k, generator=g, dtype=x.dtype) for k in params.widths[1:]
    ]
    return Moments(tuple(means), tuple(variances))


def random_data(params, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, params.widths[0], generator=g, dtype=params.biases[0].dtype) * 2


def star_params(k, dtype=torch.float64):
    """K parents with unit prior variance sharing one child (unit noise, w = 1)."""
    return DEFParameters(
        (torch.ones(1, k, dtype=dtype),),
        (torch.zeros(1, dtype=dtype), torch.zeros(k, dtype=dtype)),
        (torch.ones(1, dtype=dtype), torch.ones(k, dtype=dtype)),
    )
