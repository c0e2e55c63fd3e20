"""Where the budget went: kept PET parameters per layer and module type, and a plot of them.

Module names of BERT-style encoders map to a layer index (``layer.<i>.``; ``"emb"`` for the
embeddings) and a module type: ``query``, ``key``, ``value``, ``attn_out`` (attention output
projection), ``ffn_in``, ``ffn_out``, ``attn_ln``, ``ffn_ln`` and ``emb_ln`` (LayerNorms). Other
names keep their last two components as the type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from nas.pet.supernet import LoraBiasLinear, PetSupernet

_TYPES = (
    (r"attention\.self\.query$", "query"),
    (r"attention\.self\.key$", "key"),
    (r"attention\.self\.value$", "value"),
    (r"attention\.output\.dense$", "attn_out"),
    (r"attention\.output\.LayerNorm$", "attn_ln"),
    (r"intermediate\.dense$", "ffn_in"),
    (r"output\.dense$", "ffn_out"),
    (r"output\.LayerNorm$", "ffn_ln"),
    (r"embeddings\.LayerNorm$", "emb_ln"),
)
TYPE_ORDER = tuple(t for _, t in _TYPES)


def module_location(name: str) -> tuple[str, str]:
    """``(layer, module_type)`` of a module name (module docstring).

    Args:
        name: full module name, e.g. ``"bert.encoder.layer.3.attention.self.query"``.

    Returns:
        the layer as a string (``"3"``, ``"emb"`` or ``"other"``) and the module type.
    """
    match = re.search(r"layer\.(\d+)\.", name)
    layer = match.group(1) if match else ("emb" if "embeddings" in name else "other")
    for pattern, kind in _TYPES:
        if re.search(pattern, name):
            return layer, kind
    return layer, ".".join(name.split(".")[-2:])


def budget_allocation(supernet: PetSupernet) -> list[dict[str, Any]]:
    """Kept PET parameters of a supernet, one row per module and kind.

    A LoRA row counts ``nnz(M_A) + nnz(M_B)`` of the module, a bias row ``nnz(M_b)``; modules
    with nothing kept are left out.

    Args:
        supernet: the (pruned) supernet.

    Returns:
        rows ``{"module", "layer", "type", "kind" ("bias" or "lora"), "params", "rank"}``
        (``rank``: live LoRA components; 0 for bias rows).
    """
    rows = []
    ranks = supernet.ranks()
    for name, mod in supernet.pet_modules():
        layer, kind = module_location(name)
        if mod.mask_bias is not None and bool(mod.mask_bias.any()):
            n = int(mod.mask_bias.bool().sum())
            rows.append(
                {
                    "module": name,
                    "layer": layer,
                    "type": kind,
                    "kind": "bias",
                    "params": n,
                    "rank": 0,
                }
            )
        if isinstance(mod, LoraBiasLinear) and mod.rank > 0:
            n = int(mod.mask_A.bool().sum() + mod.mask_B.bool().sum())
            if n:
                rows.append(
                    {
                        "module": name,
                        "layer": layer,
                        "type": kind,
                        "kind": "lora",
                        "params": n,
                        "rank": ranks[name],
                    }
                )
    return rows


def summarise_allocation(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Totals of allocation rows by layer, by module type and by kind.

    Args:
        rows: rows from :func:`budget_allocation` (possibly several runs concatenated).

    Returns:
        ``{"layer": {...}, "type": {...}, "kind": {...}, "layer_kind": {"3/bias": ...}}``.
    """
    out: dict[str, dict[str, int]] = {"layer": {}, "type": {}, "kind": {}, "layer_kind": {}}
    for r in rows:
        for key, value in (
            ("layer", r["layer"]),
            ("type", r["type"]),
            ("kind", r["kind"]),
            ("layer_kind", f"{r['layer']}/{r['kind']}"),
        ):
            out[key][value] = out[key].get(value, 0) + int(r["params"])
    return out


def _layer_key(layer: str) -> tuple[int, int]:
    if layer == "emb":
        return (0, -1)
    return (1, int(layer)) if layer.isdigit() else (2, 0)


def plot_allocation(
    rows: Iterable[Mapping[str, Any]], path: str, title: str = "PET budget by layer"
) -> None:
    """Save a PNG of the kept parameters per layer, stacked by module type, bias and LoRA apart.

    Args:
        rows: rows from :func:`budget_allocation` (several runs: values are summed, so divide
            beforehand for means).
        path: output file.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    layers = sorted({r["layer"] for r in rows}, key=_layer_key) or ["0"]
    types = [t for t in TYPE_ORDER if any(r["type"] == t for r in rows)]
    types += sorted({r["type"] for r in rows} - set(types))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, kind in zip(axes, ("bias", "lora"), strict=True):
        bottom = [0.0] * len(layers)
        for i, t in enumerate(types):
            heights = [
                sum(
                    r["params"]
                    for r in rows
                    if r["kind"] == kind and r["type"] == t and r["layer"] == layer
                )
                for layer in layers
            ]
            if any(heights):
                ax.bar(layers, heights, bottom=bottom, label=t, color=cmap(i % 10))
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(f"{kind} parameters kept")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("parameters")
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
