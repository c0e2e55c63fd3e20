"""PNG figures of growth runs: accuracy against parameter count, predicted against actual change.

Both functions take the JSON-serialisable records written by the ``grow`` and ``bench``
commands (`nas.growing.loop.GrowthResult.history` and ``final``), use matplotlib's ``Agg``
backend and write one PNG each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_params(
    runs: Mapping[str, Sequence[Mapping]],
    path: str | os.PathLike,
    *,
    metric: str = "test_acc",
    title: str = "",
) -> None:
    """Final accuracy against parameter count, one marker series per method.

    Args:
        runs: ``{method: [final record, ...]}`` (one record per seed); each record has
            ``"params"`` and ``metric``. Methods with several records get mean and standard
            deviation bars.
        path: Output PNG.
        metric: Which accuracy to plot.
        title: Figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, records in runs.items():
        params = np.array([r["params"] for r in records], dtype=float)
        values = 100 * np.array([r[metric] for r in records], dtype=float)
        ax.errorbar(params.mean(), values.mean(),
                    xerr=params.std() if len(records) > 1 else None,
                    yerr=values.std() if len(records) > 1 else None,
                    fmt="o", capsize=3, label=method)
        if len(records) > 1:
            ax.scatter(params, values, s=8, alpha=0.35)
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(title or "accuracy against parameter count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_predicted_vs_actual(
    pairs: Sequence[tuple[float, float]], path: str | os.PathLike, *, title: str = ""
) -> None:
    """Scatter of predicted against actual loss change with the identity line.

    Args:
        pairs: ``(predicted, actual)`` loss changes, one per candidate.
        path: Output PNG.
        title: Figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    if pairs:
        predicted, actual = np.array(pairs, dtype=float).T
        ax.scatter(predicted, actual, s=12, alpha=0.6)
        low = float(min(predicted.min(), actual.min()))
        high = float(max(predicted.max(), actual.max()))
        ax.plot([low, high], [low, high], color="grey", lw=1, ls="--")
    ax.set_xlabel("predicted loss change")
    ax.set_ylabel("actual loss change (held-out)")
    ax.set_title(title or "Gauss-Newton prediction")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prediction_pairs(history: Sequence[Mapping]) -> list[tuple[float, float]]:
    """All ``(predicted, actual)`` pairs of the candidates in a run's history."""
    return [
        (c["predicted_change"], c["actual_change"])
        for record in history
        for c in record.get("candidates", [])
        if c.get("predicted_change") is not None and c.get("actual_change") is not None
    ]
