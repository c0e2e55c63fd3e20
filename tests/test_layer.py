import pyro
import pytest
import torch
from pyro import poutine

from defbound import def_layer
from defbound.layer import SITE_KEY

f64 = torch.float64


def _trace(fn):
    return poutine.trace(fn).get_trace()


def test_def_layer_samples_the_stated_distribution_and_records_structure():
    W = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], dtype=f64)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=f64)
    b = torch.tensor([0.1, 0.2, 0.3], dtype=f64)
    parent = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=f64)

    def fn():
        with pyro.plate("data", 2):
            return def_layer(
                "c",
                parent=parent,
                parent_name="p",
                weights=W,
                mask=mask,
                bias=b,
                noise_scale=torch.tensor([1.0, 2.0, 3.0], dtype=f64),
            )

    site = _trace(fn).nodes["c"]
    torch.testing.assert_close(site["fn"].base_dist.loc, parent @ (W * mask).T + b)
    torch.testing.assert_close(
        site["fn"].base_dist.scale[0], torch.tensor([1.0, 2.0, 3.0], dtype=f64)
    )
    record = site["infer"][SITE_KEY]
    assert record["parent"] == "p" and record["weights"] is W and record["mask"] is mask
    assert site["fn"].event_shape == (3,) and site["fn"].batch_shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_scale": 0.0}, "noise_scale must be positive"),
        ({"noise_scale": torch.tensor([1.0, -1.0, 1.0])}, "noise_scale must be positive"),
        ({"noise_scale": torch.ones(2)}, "noise_scale has 2 entries"),
        ({"mask": torch.ones(2, 3)}, "mask has shape"),
        ({"mask": torch.full((3, 2), 0.5)}, "only 0 and 1"),
        ({"weights": torch.ones(3, 5)}, "weights have shape"),
        ({"weights": torch.tensor([[1.0, float("nan")]] * 3)}, "non-finite"),
        ({"parent_name": None}, "needs parent_name"),
        ({"obs": torch.ones(2, 4)}, r"expected \(N, 3\)"),
        ({"obs": torch.ones(0, 3)}, "empty"),
        ({"obs": torch.tensor([[1.0, float("inf"), 0.0]] * 2)}, "NaN or infinite"),
    ],
)
def test_def_layer_refuses_bad_arguments(kwargs, match):
    args = {
        "parent": torch.ones(2, 2),
        "parent_name": "p",
        "weights": torch.ones(3, 2),
        "bias": torch.zeros(3),
        "noise_scale": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        def_layer("c", **args)


def test_top_layer_takes_no_weights():
    with pytest.raises(ValueError, match="top layer"):
        def_layer("t", bias=torch.zeros(2), noise_scale=1.0, weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="bias must be a vector"):
        def_layer("t", bias=torch.zeros(2, 2), noise_scale=1.0)
