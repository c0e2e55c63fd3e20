import pytest
import torch

from defbound import exact
from defbound.blocks import (
    block_plan,
    block_sweep,
    check_partition,
    colour_partition,
    coparent_graph,
    exact_optimum,
    greedy_colouring,
    hidden_precision,
    is_independent,
)
from defbound.bound import elbo
from defbound.cavi import cavi_sweep, exact_variances
from defbound.state import prior_moments
from tests.conftest import random_data, random_moments, random_params


def _run(step, params, q, sweeps):
    for _ in range(sweeps):
        q, info = step(params, q)
    return q, info


@pytest.mark.parametrize("seed,density", [(0, 0.3), (1, 0.5), (2, 1.0)])
def test_colour_blocks_share_no_child_and_cover_every_unit_once(seed, density):
    params = random_params([30, 12, 8], seed=seed, density=density)
    partition = colour_partition(params)
    for layer, blocks in enumerate(partition, start=1):
        W = params.weights[layer - 1]
        units = torch.cat(blocks).sort().values
        assert torch.equal(units, torch.arange(params.widths[layer]))
        for index in blocks:
            parents_per_child = (W[:, index] != 0).sum(1)
            assert parents_per_child.max() <= 1
    assert is_independent(params, partition)


def test_greedy_colouring_is_proper_on_random_graphs():
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        a = torch.rand(40, 40, generator=g) < 0.2
        adjacency = a | a.T
        adjacency.fill_diagonal_(False)
        colours = greedy_colouring(adjacency)
        i, j = torch.nonzero(adjacency, as_tuple=True)
        assert torch.all(colours[i] != colours[j])
        assert colours.max() <= adjacency.sum(1).max()  # greedy uses at most max degree + 1


def test_coparent_graph_on_a_forest_has_no_edges_and_one_block():
    params = random_params([10, 6, 3], seed=5, forest=True)
    for W in params.weights:
        assert not coparent_graph(W).any()
    assert all(len(blocks) == 1 for blocks in colour_partition(params))


def test_hidden_precision_equals_the_dense_joint_system():
    params = random_params([5, 4, 3, 2], seed=6)
    x = random_data(params, 3)
    torch.testing.assert_close(
        hidden_precision(params), exact.joint_system(params, x).precision, rtol=0, atol=1e-12
    )


def test_exact_optimum_matches_the_reference_and_elbo_star():
    params = random_params([6, 5, 3], seed=7)
    x = random_data(params, 4)
    q = exact_optimum(params, x)
    ref = exact.optimal_mean_field(params, x)
    for a, b in zip(q.means + q.variances, ref.means + ref.variances, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(elbo(params, q), exact.optimal_elbo(params, x), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="max_size"):
        exact_optimum(params, x, max_size=4)


@pytest.mark.parametrize("density", [0.4, 1.0])
def test_colour_block_ascent_reaches_the_exact_optimum_monotonically(density):
    params = random_params([12, 8, 5], seed=8, density=density)
    x = random_data(params, 3)
    plan = block_plan(params)
    q = prior_moments(params, x)
    values = []
    for _ in range(400):
        q, info = block_sweep(params, q, plan)
        values.append(info.elbo)
    assert min(b - a for a, b in zip(values, values[1:], strict=False)) >= -1e-9
    target = exact.posterior_mean(params, x)
    for layer, m in enumerate(target, start=1):
        torch.testing.assert_close(q.means[layer], m, rtol=0, atol=1e-8)
    assert values[-1] == pytest.approx(exact.optimal_elbo(params, x).sum().item(), abs=1e-8)


def test_singleton_blocks_in_index_order_equal_sequential_cavi():
    params = random_params([7, 5, 4], seed=9)
    x = random_data(params, 3)
    q = exact_variances(params, random_moments(params, x))
    singletons = [[[j] for j in range(k)] for k in params.widths[1:]]
    blocks, _ = block_sweep(params, q, block_plan(params, singletons))
    cavi, _ = cavi_sweep(params, q)
    for a, b in zip(blocks.means, cavi.means, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_user_blocks_with_co_parents_are_solved_jointly():
    """One hidden layer, the whole layer as one block: one sweep is the exact optimum."""
    params = random_params([6, 4], seed=10)
    x = random_data(params, 3)
    plan = block_plan(params, [[[0, 1, 2, 3]]])
    assert not is_independent(params, plan.partition)
    q, _ = block_sweep(params, random_moments(params, x), plan)
    torch.testing.assert_close(q.means[1], exact.posterior_mean(params, x)[0], rtol=0, atol=1e-10)
    partial = block_plan(params, [[[0, 2], [1], [3]]])
    q = _run(lambda p, m: block_sweep(p, m, partial), params, random_moments(params, x), 200)[0]
    torch.testing.assert_close(q.means[1], exact.posterior_mean(params, x)[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "partition,match",
    [
        ([[[0, 1, 2]]], "each of the 2 hidden layers"),
        ([[[0, 1], [1, 2]], [[0, 1]]], r"units \[1\] are in more than one block"),
        ([[[0, 1]], [[0, 1]]], r"units \[2\] are in no block"),
        ([[[0, 1, 2, 3]], [[0, 1]]], r"unit indices \[3\] outside 0..2"),
        ([[[0, 1, 2], []], [[0, 1]]], "block 1 is empty"),
    ],
)
def test_bad_partitions_are_refused_with_a_clear_message(partition, match):
    params = random_params([4, 3, 2], seed=11)
    with pytest.raises(ValueError, match=match):
        check_partition(params, partition)
    with pytest.raises(ValueError, match=match):
        block_plan(params, partition)
