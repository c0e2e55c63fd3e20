import csv
import math

import pytest
import torch

from defbound.bench import (
    BenchConfig,
    BenchOptions,
    RunLimits,
    fm_sweep_rows,
    format_table,
    model_summary,
    run_bench,
    sample_data,
    scaling_study,
    study_table,
    synthetic_def,
)
from defbound.bound import forest_likeness
from defbound.cli import main
from defbound.exact import optimal_elbo
from defbound.state import prior_moments
from defbound.update import fm_sweep


def test_synthetic_def_is_a_forest_at_epsilon_zero_and_denser_above():
    forest = synthetic_def([20, 10, 5], 0.0, seed=1)
    for W in forest.weights:
        assert torch.all((W != 0).sum(1) == 1)
        assert torch.allclose(forest_likeness(W), torch.ones(W.shape[0], dtype=W.dtype))
    dense = synthetic_def([20, 10, 5], 0.3, seed=1)
    assert model_summary(dense)["n_eff_mean"] > 1.5
    sparse = synthetic_def([20, 10, 5], 0.3, parents_per_child=2, seed=1)
    for W in sparse.weights:
        assert (W != 0).sum(1).max() <= 3  # forest parent plus at most two more
    assert model_summary(sparse)["nnz"] < model_summary(dense)["nnz"]
    for bad, match in (({"epsilon": -1.0}, "epsilon"), ({"parents_per_child": 0}, "parents")):
        kwargs = {"epsilon": 0.1, **bad}
        with pytest.raises(ValueError, match=match):
            synthetic_def([4, 3], kwargs.pop("epsilon"), **kwargs)


def test_sampled_data_has_the_model_moments():
    params = synthetic_def([3, 2], 0.5, seed=2)
    x = sample_data(params, 20000, seed=3)
    W, b = params.weights[0], params.biases
    torch.testing.assert_close(x.mean(0), W @ b[1] + b[0], rtol=0, atol=0.05)
    cov = W @ W.T + torch.diag(params.noise_vars[0])
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.04, atol=0.02)


def test_run_bench_reports_sweeps_to_elbo_star_and_jacobi_divergence():
    options = BenchOptions(
        methods=("exact", "fm", "fm-or", "fm-a", "cavi", "block", "jacobi"), tol=1e-6,
        limits=RunLimits(max_sweeps=3000, max_time=30.0),
    )
    configs = [BenchConfig((12, 12, 3), 4, eps) for eps in (0.0, 2.0)]
    result = run_bench(configs, options)
    rows = {(r["epsilon"], r["method"]): r for r in result.rows}
    params = synthetic_def((12, 12, 3), 0.0)
    star = optimal_elbo(params, sample_data(params, 4, seed=1)).sum().item()
    assert rows[(0.0, "exact")]["elbo_ref_per_row"] * 4 == pytest.approx(star, rel=1e-10)
    assert rows[(0.0, "fm")]["sweeps_to_tol"] == rows[(0.0, "cavi")]["sweeps_to_tol"]
    assert rows[(0.0, "fm")]["fm_gap_per_row"] < 1e-6  # FM* = ELBO* on a forest
    assert rows[(2.0, "fm")]["outcome"] == "reached"
    assert rows[(2.0, "jacobi")]["jacobi_radius"] > 1
    assert rows[(2.0, "jacobi")]["outcome"] == "diverged"
    assert rows[(2.0, "fm-a")]["sweeps_to_tol"] is None  # the FM variances stay biased
    assert rows[(2.0, "fm")]["fm_gap_per_row"] > 0
    table = study_table(result.rows)
    assert [row["epsilon"] for row in table] == [0.0, 2.0]
    assert table[1]["jacobi"].startswith("diverged")
    text = format_table(result.rows, ("method", "outcome", "sweeps_to_tol"))
    assert text.count("\n") == len(result.rows) + 1


def test_row_chunked_fm_sweep_equals_one_sweep_over_all_rows():
    params = synthetic_def([6, 5, 3], 0.4, seed=5)
    q = prior_moments(params, sample_data(params, 11, seed=6))
    whole, info = fm_sweep(params, q, "fm", 1.5)
    chunked, chunk_info = fm_sweep_rows(params, q, 4, variance_rule="fm", omega=1.5)
    for a, b in zip(whole.means + whole.variances, chunked.means + chunked.variances, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert chunk_info.elbo == pytest.approx(info.elbo, rel=1e-12)
    assert chunk_info.max_change == pytest.approx(info.max_change, rel=1e-12)
    with pytest.raises(ValueError, match="row_chunk"):
        fm_sweep_rows(params, q, 0)


def test_scaling_study_fits_a_slope():
    rows, slope = scaling_study("n", [50, 100, 200, 400], widths=(8, 6, 3), sweeps=2)
    assert [r["n_rows"] for r in rows] == [50, 100, 200, 400]
    assert math.isfinite(slope)
    with pytest.raises(ValueError, match="axis"):
        scaling_study("depth", [1, 2])


def test_cli_bench_quick_writes_table_csv_and_plots(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("bench.csv", "study.csv", "elbo_vs_time.png", "sweeps_vs_epsilon.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert {"exact", "fm", "fm-or", "fm-a", "cavi", "block", "jacobi", "svi@0.05"} <= methods
    assert "| method |" in printed.replace("| n_eff_mean | method |", "| method |")


def test_cli_bench_refuses_bad_options(tmp_path, capsys):
    assert main(["bench", "--quick", "--omega", "2.5", "--out", str(tmp_path)]) == 2
    assert "omega" in capsys.readouterr().err
