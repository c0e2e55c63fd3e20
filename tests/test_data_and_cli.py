import json

import numpy as np
import pytest

from defbound.cli import main
from defbound.data import load_matrix, load_split, standardize_split


def test_standardize_split_drops_constant_and_near_constant_columns():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 4))
    data[:, 1] = 3.0
    data[:, 2] = 0.0
    data[5, 2] = 9.0  # non-zero in one row only: near-constant
    split = standardize_split(data, "toy", test_fraction=0.25, seed=1)
    assert list(split.kept_columns) == [0, 3]
    assert split.dropped == 2
    np.testing.assert_allclose(split.train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(split.train.std(0), 1, atol=1e-12)
    assert split.test.shape == (50, 2)
    keep_all = standardize_split(data, "toy", test_fraction=0.25, seed=1, min_variation=0)
    row_5_in_train = 5 in np.random.default_rng(1).permutation(200)[50:]
    expected = [0, 2, 3] if row_5_in_train else [0, 3]
    assert list(keep_all.kept_columns) == expected


def test_load_matrix_reads_npy_and_csv_with_header(tmp_path):
    data = np.arange(12.0).reshape(4, 3)
    np.save(tmp_path / "a.npy", data)
    np.testing.assert_array_equal(load_matrix(tmp_path / "a.npy"), data)
    (tmp_path / "b.csv").write_text("p,q,r\n" + "\n".join(",".join(map(str, r)) for r in data))
    np.testing.assert_array_equal(load_matrix(tmp_path / "b.csv"), data)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("1,2\n3,nan\n", "NaN or infinite"),
        ("1,2\n3,inf\n", "NaN or infinite"),
        ("1,2\n3,abc\n", "expected a number"),
        ("", "empty"),
    ],
)
def test_bad_csv_is_refused_with_a_clear_message(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_matrix(path)


def test_load_matrix_checks_shape_and_columns(tmp_path):
    np.save(tmp_path / "v.npy", np.ones(5))
    with pytest.raises(ValueError, match="2-D"):
        load_matrix(tmp_path / "v.npy")
    np.save(tmp_path / "m.npy", np.ones((5, 3)))
    with pytest.raises(ValueError, match="expected 4 columns, got 3"):
        load_matrix(tmp_path / "m.npy", expected_columns=4)
    (tmp_path / "m.txt").write_text("1")
    with pytest.raises(ValueError, match=".npy or .csv"):
        load_matrix(tmp_path / "m.txt")
    with pytest.raises(FileNotFoundError):
        load_matrix(tmp_path / "missing.csv")


def test_mnist_subset_loads_offline():
    split = load_split("mnist", test_fraction=0.2, seed=0)
    assert split.train.shape[0] == 4000 and split.test.shape[0] == 1000
    assert 300 < split.train.shape[1] < 784


def test_cli_fit_on_digits_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fit", "--widths", "6", "2", "--max-sweeps", "15", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out log-likelihood per row" in printed and "factor_analysis_2" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sweeps"] == 15 and metrics["widths"][1:] == [6, 2]
    assert metrics["heldout_loglik_per_row"] < 0
    assert (out / "bound.png").stat().st_size > 1000
    assert (out / "params.pt").exists()
    # a second run into the same folder must not silently overwrite it
    assert main(["fit", "--max-sweeps", "2", "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "fit",
                "--widths",
                "6",
                "2",
                "--max-sweeps",
                "20",
                "--out",
                str(out),
                "--quiet",
                "--resume",
            ]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["sweeps"] == 20


def test_cli_rejects_bad_input_before_writing_anything(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,nan,6\n7,8,9\n")
    out = tmp_path / "never"
    assert main(["fit", "--data", str(bad), "--out", str(out), "--quiet"]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not out.exists()
    assert main(["fit", "--widths", "0", "--out", str(out), "--quiet"]) == 2
    assert main(["fit", "--omega", "2", "--out", str(out), "--quiet"]) == 2
    assert main(["fit", "--data", str(tmp_path / "nope.npy"), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_cli_fits_a_users_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(120, 2))
    data = z @ rng.normal(size=(2, 5)) + 0.3 * rng.normal(size=(120, 5))
    path = tmp_path / "mine.csv"
    np.savetxt(path, data, delimiter=",", header="a,b,c,d,e", comments="")
    out = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--data",
                str(path),
                "--widths",
                "2",
                "--max-sweeps",
                "200",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    fa = metrics["baselines"]["factor_analysis_2"]["heldout_loglik_per_row"]
    assert abs(metrics["heldout_loglik_per_row"] - fa) < 0.05 * abs(fa)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--widths", "6", "2", "--max-sweeps", "3", "--out", str(out), "--quiet",
                 "--no-baseline"]) == 0
    history = (out / "fit_history.json").read_text()
    assert main(["fit", "--widths", "5", "--max-sweeps", "6", "--out", str(out), "--quiet",
                 "--resume", "--no-baseline"]) == 2
    assert "another model or data" in capsys.readouterr().err
    assert (out / "fit_history.json").read_text() == history
    (out / "checkpoint.pt").write_bytes(b"junk")
    assert main(["fit", "--widths", "6", "2", "--max-sweeps", "6", "--out", str(out), "--quiet",
                 "--resume", "--no-baseline"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_cli_refuses_bad_paths_devices_and_values(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    np.save(tmp_path / "huge.npy", np.random.default_rng(0).normal(size=(50, 3)) * 1e200)
    np.save(tmp_path / "cplx.npy", np.ones((5, 2)) * (1 + 2j))
    cases = [
        (["--out", ""], "empty string"),
        (["--out", str(a_file)], "not a folder"),
        (["--out", str(a_file / "sub")], "below a file"),
        (["--device", "banana"], "not a torch device"),
        (["--data", str(folder)], "not a file"),
        (["--data", str(tmp_path / "huge.npy")], "too large to standardize"),
        (["--data", str(tmp_path / "cplx.npy")], "real numbers"),
    ]
    for extra, match in cases:
        argv = ["fit", "--max-sweeps", "2", "--quiet", "--out", str(tmp_path / "o"), *extra]
        assert main(argv) == 2, extra
        assert match in capsys.readouterr().err, extra
