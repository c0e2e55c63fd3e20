"""Search-compute bookkeeping: example passes and wall time, split into training and search.

A *forward pass* counts one example through the network once, a *backward pass* one example's
vector-Jacobian product back through it (a training step on a batch of ``b`` examples counts
``b`` of each). Growth methods differ in what their search costs: statistics passes (GN, TINY,
GradMax), candidate training (Firefly), training several children (NASH-style search).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass


@dataclass
class ComputeCounter:
    """Running totals of example passes and seconds.

    Attributes:
        train_forward: Forward example passes of ordinary training.
        train_backward: Backward example passes of ordinary training.
        search_forward: Forward example passes spent choosing and learning new units.
        search_backward: Backward example passes spent on the search.
        search_seconds: Wall time of the search.
        train_seconds: Wall time of ordinary training.
    """

    train_forward: int = 0
    train_backward: int = 0
    search_forward: int = 0
    search_backward: int = 0
    search_seconds: float = 0.0
    train_seconds: float = 0.0

    @property
    def search_passes(self) -> int:
        """Forward plus backward example passes of the search."""
        return self.search_forward + self.search_backward

    @property
    def train_passes(self) -> int:
        """Forward plus backward example passes of training."""
        return self.train_forward + self.train_backward

    def add_search(self, forward: int, backward: int) -> None:
        """Count ``forward`` and ``backward`` example passes as search."""
        self.search_forward += int(forward)
        self.search_backward += int(backward)

    def add_train(self, examples: int) -> None:
        """Count one training step on ``examples`` examples (a forward and a backward each)."""
        self.train_forward += int(examples)
        self.train_backward += int(examples)

    @contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        """Add the wall time of the block to ``search_seconds`` or ``train_seconds``."""
        if kind not in ("search", "train"):
            raise ValueError(f"kind must be 'search' or 'train', got {kind!r}")
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            if kind == "search":
                self.search_seconds += elapsed
            else:
                self.train_seconds += elapsed

    def as_dict(self) -> dict[str, float]:
        """All totals, including ``search_passes`` and ``train_passes``."""
        return {**asdict(self), "search_passes": self.search_passes,
                "train_passes": self.train_passes}
