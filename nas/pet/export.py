"""Export of searched PET architectures: structured results to ``peft``, unstructured to our format.

Structured result -> one ``peft`` adapter on the *pristine* backbone, normally LoRA:

* ``target_modules``: full names of the matrices with live rank ``r_m > 0`` (rank 0 = not
  wrapped; peft rejects ``r <= 0``);
* ``rank_pattern[m] = r_m`` and ``alpha_pattern[m] = s * r_m`` so peft's scaling
  ``alpha_m / r_m`` equals the supernet's ``s``;
* weights ``lora_A = (M_A*A)[K]``, ``lora_B = (M_B*B)[:, K]`` with ``K`` the live components;
* biases: peft's LoRA has no per-vector bias selection (``bias`` is ``"none"``, ``"all"`` or
  ``"lora_only"``). When any bias vector is tuned, the export uses ``bias="all"`` and stores the
  updated biases ``b0 + delta_b`` (untuned biases keep ``b0``), so the function is exact; the
  tuned vectors are listed in ``PeftExport.biases``. Retraining that config trains all biases.
* biases only (no live LoRA component, e.g. an S-BitFit result): a ``BeftConfig`` on the linear
  maps whose bias is tuned (``beft_bias = M_b * delta_b``, exact per vector), with tuned
  LayerNorms carried as ``modules_to_save`` (peft also stores and trains their weights).

Under the balanced initialisation the supernet's update is ``s[(M_B B)(M_A A) - B0 Z A0]``, which
is not a rank-``r_m`` LoRA. ``offset="absorb"`` appends the offset rows with a negated ``B0``, as
peft's PiSSA-to-LoRA conversion does: rank ``2 r_m`` with per-component offsets, ``r_m + r_max``
with a frozen one. ``offset="error"`` (default) refuses. Retraining a found architecture from the
standard LoRA start (``B = 0``) avoids the offset altogether.

Unstructured result -> ``pet_config.json`` (supernet options) + ``pet_state.pt``
(``torch.save`` of masks, the unmasked values, offsets and the head).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Literal, NamedTuple

import torch
from torch import nn

from nas.pet.supernet import LoraBiasLinear, PetSupernet, SupernetConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class PeftExport(NamedTuple):
    """Summary of a structured export.

    Attributes:
        config: the ``peft`` config written (``LoraConfig``, or ``BeftConfig`` for biases only).
        ranks: module name -> searched rank ``r_m`` of every exported LoRA module.
        biases: names of modules whose bias vector is tuned.
        n_lora: ``sum_m r_m (d_in + d_out)``.
        n_bias: ``sum_b |b|`` over tuned bias vectors.
        n_params: ``n_lora + n_bias``, the architecture's budget count.
        n_offset: extra LoRA parameters written to absorb the balanced-init offset (0 without).
        bias_mode: ``"none"``, ``"lora_all"`` (LoRA with ``bias="all"``) or ``"beft"``.
    """

    config: object
    ranks: dict[str, int]
    biases: list[str]
    n_lora: int
    n_bias: int
    n_params: int
    n_offset: int
    bias_mode: str


def _live_components(mod: LoraBiasLinear) -> torch.Tensor:
    alive = mod.mask_A.bool().any(dim=1) & mod.mask_B.bool().any(dim=0)
    return torch.nonzero(alive).flatten()


def _offset_rank(mod: LoraBiasLinear, r: int) -> int:
    if mod.offset_A is None:
        return 0
    return r if mod.offset_mode == "component" else mod.rank


def _head_names(supernet: PetSupernet) -> list[str]:
    names = {n.split(".")[-1] for n, _ in supernet.model.named_modules()}
    return [h for h in supernet.config.head_modules if h in names]


def peft_config(
    supernet: PetSupernet, offset: Literal["error", "absorb"] = "error", task_type: str = "SEQ_CLS"
):
    """Build the ``peft`` config of the supernet's current structured architecture.

    With at least one live LoRA component: a ``LoraConfig`` (module docstring). With biases only:
    a ``BeftConfig`` on the linear maps whose bias is tuned, plus the tuned LayerNorms as
    ``modules_to_save`` (peft then also trains and stores their weights).

    Args:
        supernet: a supernet with structured masks.
        offset: how to treat a balanced-init offset (module docstring).
        task_type: peft task type of the adapter.

    Returns:
        ``(config, ranks)`` with ``ranks`` the searched rank per exported LoRA module.

    Raises:
        ValueError: if the masks are not structured, an offset is present with
            ``offset="error"``, or nothing expressible would be exported.
    """
    from peft import BeftConfig, LoraConfig

    from nas.pet.selection import is_structured

    if offset not in ("error", "absorb"):
        raise ValueError(f"offset must be 'error' or 'absorb', got {offset!r}")
    if not is_structured(supernet):
        raise ValueError(
            "masks are not structured (partial bias vectors or LoRA components); "
            "use save_unstructured instead"
        )
    has_offset = any(
        _offset_rank(m, int(_live_components(m).numel())) > 0 for _, m in supernet.lora_modules()
    )
    if has_offset and offset == "error":
        raise ValueError(
            "the supernet uses the balanced init, whose offset B0 Z A0 a rank-r_m "
            "LoRA cannot express; pass offset='absorb' (offset rows appended to the "
            "adapter) or retrain the architecture from the standard LoRA start"
        )
    s = supernet.config.scaling
    ranks, rank_pattern, alpha_pattern = {}, {}, {}
    for name, mod in supernet.lora_modules():
        r = int(_live_components(mod).numel())
        total = r + _offset_rank(mod, r)
        if total == 0:
            continue
        ranks[name] = r
        key = re.escape(name)
        rank_pattern[key] = total
        alpha_pattern[key] = s * total
    biases = list(supernet.tuned_biases())
    heads = _head_names(supernet)
    if ranks:
        r_default = max(rank_pattern.values())
        config = LoraConfig(
            r=r_default,
            lora_alpha=s * r_default,
            target_modules=sorted(ranks),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            lora_dropout=0.0,
            bias="all" if biases else "none",
            modules_to_save=heads or None,
            task_type=task_type,
        )
        return config, ranks
    linear = [n for n in biases if isinstance(supernet.model.get_submodule(n), LoraBiasLinear)]
    norms = [n for n in biases if n not in linear]
    if not linear:
        raise ValueError(
            "nothing expressible in peft: no LoRA component and no linear-layer bias "
            "survived; use save_unstructured"
        )
    config = BeftConfig(
        target_modules=sorted(linear), modules_to_save=(heads + norms) or None, task_type=task_type
    )
    return config, ranks


@torch.no_grad()
def to_peft_model(
    supernet: PetSupernet, offset: Literal["error", "absorb"] = "error", task_type: str = "SEQ_CLS"
):
    """Build a ``peft`` model on a pristine copy of the backbone carrying the searched update.

    Args:
        supernet: a supernet with structured masks.
        offset: see :func:`peft_config`.
        task_type: peft task type.

    Returns:
        ``(peft_model, summary)`` with ``summary`` a :class:`PeftExport`.
    """
    from peft import get_peft_model

    config, ranks = peft_config(supernet, offset=offset, task_type=task_type)
    biases = list(supernet.tuned_biases())
    n_bias = sum(supernet.model.get_submodule(n).bias_delta.numel() for n in biases)
    base = supernet.pristine_copy()
    beft = not ranks
    for name in biases:
        wrapper = supernet.model.get_submodule(name)
        if not (beft and isinstance(wrapper, LoraBiasLinear)):
            base.get_submodule(name).bias.copy_(wrapper.effective_bias())
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    if beft:
        # NOTE: peft may rewrite config.target_modules into shorter suffixes, so iterate over
        # our own module names.
        for name in biases:
            wrapper = supernet.model.get_submodule(name)
            if not isinstance(wrapper, LoraBiasLinear):
                continue
            delta = wrapper.mask_bias * wrapper.bias_delta
            inner.get_submodule(name).beft_bias["default"].copy_(delta.reshape(1, -1))
        summary = PeftExport(config, {}, biases, 0, n_bias, n_bias, 0, "beft")
        return peft_model, summary
    n_lora = n_offset = 0
    for name in ranks:
        mod = supernet.model.get_submodule(name)
        idx = _live_components(mod)
        a = (mod.lora_A * mod.mask_A)[idx]
        b = (mod.lora_B * mod.mask_B)[:, idx]
        n_lora += len(idx) * (mod.in_features + mod.out_features)
        if mod.offset_A is not None:
            rows = idx if mod.offset_mode == "component" else torch.arange(mod.rank)
            a = torch.cat([a, mod.offset_A[rows]], dim=0)
            b = torch.cat([b, -mod.offset_B[:, rows]], dim=1)
            n_offset += len(rows) * (mod.in_features + mod.out_features)
        layer = inner.get_submodule(name)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    mode = "lora_all" if biases else "none"
    summary = PeftExport(config, ranks, biases, n_lora, n_bias, n_lora + n_bias, n_offset, mode)
    return peft_model, summary


def export_peft(
    supernet: PetSupernet,
    directory: str | os.PathLike,
    offset: Literal["error", "absorb"] = "error",
    task_type: str = "SEQ_CLS",
) -> PeftExport:
    """Write the structured architecture and its weights as a ``peft`` LoRA adapter.

    Load it with ``peft.PeftModel.from_pretrained(pristine_base, directory)``.

    Args:
        supernet: a supernet with structured masks.
        directory: output folder (created).
        offset: see :func:`peft_config`.
        task_type: peft task type.

    Returns:
        the export summary.
    """
    peft_model, summary = to_peft_model(supernet, offset=offset, task_type=task_type)
    peft_model.save_pretrained(str(directory))
    logger.info(
        "exported peft adapter to %s: %d LoRA + %d bias parameters",
        directory,
        summary.n_lora,
        summary.n_bias,
    )
    return summary


def save_unstructured(supernet: PetSupernet, directory: str | os.PathLike) -> None:
    """Save masks, unmasked values, offsets and head of a (possibly unstructured) supernet.

    Files: ``pet_config.json`` (supernet options and format version) and ``pet_state.pt``.

    Args:
        supernet: the supernet.
        directory: output folder (created).
    """
    os.makedirs(directory, exist_ok=True)
    state: dict[str, dict[str, torch.Tensor]] = {
        "masks": {},
        "values": {},
        "offsets": {},
        "head": {},
    }
    for name, p, m in supernet.pet_parameters():
        mask = m.bool().cpu()
        state["masks"][name] = mask
        state["values"][name] = p.detach().cpu()[mask].clone()
    for name, mod in supernet.lora_modules():
        if mod.offset_A is not None:
            state["offsets"][f"{name}.offset_A"] = mod.offset_A.cpu().clone()
            state["offsets"][f"{name}.offset_B"] = mod.offset_B.cpu().clone()
    for name, p in supernet.head_parameters():
        state["head"][name] = p.detach().cpu().clone()
    torch.save(state, os.path.join(directory, "pet_state.pt"))
    meta = {"format_version": FORMAT_VERSION, "supernet": dataclasses.asdict(supernet.config)}
    with open(os.path.join(directory, "pet_config.json"), "w") as fh:
        json.dump(meta, fh, indent=2)


@torch.no_grad()
def load_unstructured(model: nn.Module, directory: str | os.PathLike) -> PetSupernet:
    """Rebuild a supernet saved by :func:`save_unstructured` on a pristine model.

    Args:
        model: the pre-trained model of the same architecture (wrapped in place).
        directory: folder written by :func:`save_unstructured`.

    Returns:
        the supernet with the saved masks, values, offsets and head.

    Raises:
        ValueError: on an unknown format version or mismatching parameter names.
    """
    with open(os.path.join(directory, "pet_config.json")) as fh:
        meta = json.load(fh)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"unsupported format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    cfg = dict(meta["supernet"])
    cfg["head_modules"] = tuple(cfg["head_modules"])
    supernet = PetSupernet(model, SupernetConfig(**cfg))
    state = torch.load(os.path.join(directory, "pet_state.pt"), map_location="cpu")
    params = {n: (p, m) for n, p, m in supernet.pet_parameters()}
    if set(params) != set(state["masks"]):
        missing = sorted(set(params) ^ set(state["masks"]))[:3]
        raise ValueError(f"saved PET parameters do not match the model, e.g. {missing}")
    for name, (p, m) in params.items():
        mask = state["masks"][name].to(p.device)
        m.copy_(mask.to(m.dtype))
        p.zero_()
        p[mask] = state["values"][name].to(p)
    for name, mod in supernet.lora_modules():
        if f"{name}.offset_A" in state["offsets"]:
            mod.offset_A = state["offsets"][f"{name}.offset_A"].to(mod.lora_A)
            mod.offset_B = state["offsets"][f"{name}.offset_B"].to(mod.lora_B)
        else:
            mod.offset_A = None
            mod.offset_B = None
    heads = dict(supernet.head_parameters())
    for name, value in state["head"].items():
        heads[name].copy_(value.to(heads[name]))
    return supernet
