r"""Importance scores of PET units: first-order loss change and a diagonal-Fisher variant.

Removing a group ``G`` of PET entries (setting them to zero, i.e. "no update") changes the loss by

.. math::

    \Delta L_G \approx -g_G^\top \theta_G
    \quad\text{(first order)},\qquad
    \Delta L_G \approx -g_G^\top \theta_G + \tfrac12 \sum_{i \in G} F_{ii} \theta_i^2
    \quad\text{(with the diagonal empirical Fisher)},

with ``g`` the mean gradient over the scoring batches and ``F_ii`` the mean over examples of the
squared per-example gradient. A positive score means removal is predicted to raise the loss, so
units with high scores are kept.

For a LoRA component ``k`` the group is row ``k`` of ``A`` alone: the update ``s b_k a_k^T`` is
linear in ``a_k``, so zeroing that row removes the component and the first-order term is exact in
that direction. By the identity ``sum_j (dL/dA)_kj A_kj = sum_i (dL/dB)_ik B_ik = s b_k^T G_W a_k``
the B-column gives the same first-order value; summing both factors would count it twice.
Under the balanced initialisation with ``offset="component"`` a pruned component also drops its
offset share, so the removed update is ``s (b_k a_k^T - b0_k a0_k^T)``, linear in the pair
``(a_k, a0_k)``; its score adds the same sum over row ``k`` of the offset ``A0`` (the gradient with
respect to ``A0`` is taken for scoring only; the offset is never trained).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import nn
from torch.nn import functional

from nas.pet.supernet import LoraBiasLinear, PetSupernet, Unit

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Reduce = Literal["signed", "abs", "squared"]


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of a Hugging Face classifier on a batch with a ``labels`` entry.

    Args:
        model: model returning an output with ``logits`` (and possibly ``loss``).
        batch: keyword inputs of the model, including ``labels`` of shape ``(n,)``.

    Returns:
        scalar loss ``-(1/n) sum_i log p(y_i | x_i)``.

    Raises:
        KeyError: if the batch has no ``labels``.
    """
    if "labels" not in batch:
        raise KeyError("classification_loss needs a 'labels' entry in the batch")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return functional.cross_entropy(logits, batch["labels"])


def _scored_tensors(supernet: PetSupernet) -> list[tuple[str, torch.Tensor]]:
    out = [(n, p) for n, p, _ in supernet.pet_parameters()]
    for name, mod in supernet.lora_modules():
        if mod.offset_A is not None and mod.offset_mode == "component":
            out.append((f"{name}.offset_A", mod.offset_A))
    return out


def _accumulate(
    supernet: PetSupernet, items: Iterable[tuple[Batch, float]], loss_fn: LossFn, square: bool
) -> dict[str, torch.Tensor]:
    """``sum_items w * g`` (or ``w * g^2``) over ``(batch, w)`` items, offsets included."""
    tensors = _scored_tensors(supernet)
    offsets = [t for n, t in tensors if n.endswith(".offset_A")]
    total = {n: torch.zeros_like(t) for n, t in tensors}
    try:
        for t in offsets:
            t.requires_grad_(True)
        for item, weight in items:
            loss = loss_fn(supernet, item)
            grads = torch.autograd.grad(loss, [t for _, t in tensors], allow_unused=True)
            for (n, _), g in zip(tensors, grads, strict=True):
                if g is not None:
                    total[n] += weight * (g.detach() ** 2 if square else g.detach())
    finally:
        for t in offsets:
            t.requires_grad_(False)
    return total


def pet_gradients(
    supernet: PetSupernet, batches: Iterable[Batch], loss_fn: LossFn = classification_loss
) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss with respect to every PET parameter.

    ``g = (1/T) sum_t dL_t/dtheta`` over the ``T`` batches (each batch weighted equally). With
    per-component offsets (balanced init) it also holds ``"<module>.offset_A"``, the gradient with
    respect to the offset rows ``Z A0``.

    Args:
        supernet: the supernet (its current values and masks are used).
        batches: iterable of batches for ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> scalar``.

    Returns:
        parameter name (as in ``supernet.pet_parameters()``) -> gradient tensor.

    Raises:
        ValueError: if ``batches`` is empty.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("pet_gradients got no batches")
    total = _accumulate(supernet, ((b, 1.0) for b in batches), loss_fn, square=False)
    return {n: g / len(batches) for n, g in total.items()}


def _single_examples(batch: Batch) -> Iterable[Batch]:
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot split a batch whose tensors have leading sizes {sorted(sizes)}")
    for i in range(sizes.pop()):
        yield {
            k: v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()
        }


def _examples(batches: Iterable[Batch], limit: int | None) -> list[Batch]:
    out: list[Batch] = []
    for batch in batches:
        for example in _single_examples(batch):
            if limit is not None and len(out) >= limit:
                return out
            out.append(example)
    return out


def _label_expectation(
    supernet: PetSupernet, examples: list[Batch]
) -> Iterable[tuple[Batch, float]]:
    """Every example once per class ``c``, weighted by the model's ``p(c | x)``."""
    for example in examples:
        inputs = {k: v for k, v in example.items() if k != "labels"}
        with torch.no_grad():
            logits = supernet(**inputs).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            probs = torch.softmax(logits, dim=-1)[0]
        labels = example["labels"]
        for c in range(probs.numel()):
            yield {**example, "labels": torch.full_like(labels, c)}, float(probs[c])


def fisher_diagonal(
    supernet: PetSupernet,
    batches: Iterable[Batch],
    loss_fn: LossFn = classification_loss,
    max_examples: int | None = None,
    kind: Literal["empirical", "true"] = "empirical",
) -> dict[str, torch.Tensor]:
    r"""Diagonal Fisher of the PET parameters, empirical or true (exact over the classes).

    .. math::

        F^{emp}_{ii} = \frac1N \sum_n \Big(\frac{\partial \ell_n(y_n)}{\partial \theta_i}\Big)^2,
        \qquad
        F^{true}_{ii} = \frac1N \sum_n \sum_c p_\theta(c \mid x_n)
            \Big(\frac{\partial \ell_n(c)}{\partial \theta_i}\Big)^2,

    with ``l_n(c)`` the loss of example ``n`` alone with label ``c``. The empirical Fisher needs
    one backward pass per example but vanishes on examples the model already fits (``g_n -> 0``
    near interpolation), where the loss curvature does not; the true Fisher (the Gauss-Newton
    matrix of the cross-entropy) needs one backward pass per example and class.

    Args:
        supernet: the supernet.
        batches: batches that are split into single examples along dimension 0.
        loss_fn: ``loss_fn(model, batch) -> scalar``; for ``kind="true"`` it must read the class
            from ``batch["labels"]`` and the model must return ``logits``.
        max_examples: stop after this many examples (``None``: use all).
        kind: ``"empirical"`` (observed labels) or ``"true"`` (expectation over the classes).

    Returns:
        parameter name -> diagonal Fisher of the parameter's shape (offset rows included as in
        :func:`pet_gradients`).

    Raises:
        ValueError: if there are no examples or ``kind`` is unknown.
    """
    # NOTE: a per-example loop. defbound.curvature.diagonal_fisher vectorises with vmap, which
    # the transformers attention-mask code does not support (data-dependent branches), and it
    # differentiates parameters only, while the offset rows here are buffers.
    if kind not in ("empirical", "true"):
        raise ValueError(f"kind must be 'empirical' or 'true', got {kind!r}")
    examples = _examples(batches, max_examples)
    if not examples:
        raise ValueError("fisher_diagonal got no examples")
    if kind == "empirical":
        items: Iterable[tuple[Batch, float]] = ((e, 1.0) for e in examples)
    else:
        items = _label_expectation(supernet, examples)
    total = _accumulate(supernet, items, loss_fn, square=True)
    return {n: f / len(examples) for n, f in total.items()}


def entry_scores(
    supernet: PetSupernet,
    grads: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-entry loss-change estimates ``-g_i theta_i (+ 1/2 F_ii theta_i^2)``.

    Masked entries score exactly 0 (their value and gradient are zero).

    Args:
        supernet: the supernet whose current (masked) values are scored.
        grads: mean gradients from :func:`pet_gradients`.
        fisher: optional diagonal Fisher from :func:`fisher_diagonal`.

    Returns:
        parameter name -> tensor of per-entry scores.
    """
    out = {}
    for name, p, mask in supernet.pet_parameters():
        theta = p.detach() * mask
        s = -grads[name] * theta
        if fisher is not None:
            s = s + 0.5 * fisher[name] * theta**2
        out[name] = s
    return out


def _reduce(x: torch.Tensor, reduce: Reduce) -> float:
    if reduce == "signed":
        return float(x)
    if reduce == "abs":
        return float(x.abs())
    if reduce == "squared":
        return float(x**2)
    raise ValueError(f"reduce must be 'signed', 'abs' or 'squared', got {reduce!r}")


def unit_scores(
    supernet: PetSupernet,
    grads: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor] | None = None,
    reduce: Reduce = "signed",
) -> dict[Unit, float]:
    """Score of every structured unit: the estimated loss change from removing it.

    Bias vector ``b``: ``-g_b^T delta_b (+ 1/2 sum F delta_b^2)``. LoRA component ``k``:
    the same sum over row ``k`` of ``A``, plus over row ``k`` of the offset ``A0`` when the offset
    is per component (see the module docstring).

    Args:
        supernet: the supernet.
        grads: mean gradients from :func:`pet_gradients`.
        fisher: optional diagonal Fisher (second-order variant).
        reduce: ``"signed"`` keeps ``Delta L``; ``"abs"`` and ``"squared"`` score ``|Delta L|``
            and ``Delta L^2`` (Taylor-pruning practice).

    Returns:
        unit -> score, for every unit of ``supernet.units()``.
    """
    entries = entry_scores(supernet, grads, fisher)
    out = {}
    for u in supernet.units():
        if u.kind == "bias":
            total = entries[f"{u.module}.bias_delta"].sum()
        else:
            total = entries[f"{u.module}.lora_A"][u.index].sum()
            total = total + _offset_term(supernet, u.module, u.index, grads, fisher)
        out[u] = _reduce(total, reduce)
    return out


def _offset_term(
    supernet: PetSupernet,
    module: str,
    index: int,
    grads: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor | float:
    key = f"{module}.offset_A"
    if key not in grads:
        return 0.0
    mod = supernet.model.get_submodule(module)
    theta = mod.active_offset_A()[index]
    term = -(grads[key][index] * theta).sum()
    if fisher is not None:
        term = term + 0.5 * (fisher[key][index] * theta**2).sum()
    return term


def component_score_from_b(
    supernet: PetSupernet, grads: Mapping[str, torch.Tensor], module: str, index: int
) -> float:
    """First-order component score from column ``k`` of ``B``: ``-sum_i g_{B,ik} B_ik``.

    Equal to the A-row score by the LoRA identity; exposed to check it. The offset share (if
    any) is added as in :func:`unit_scores`.

    Args:
        supernet: the supernet.
        grads: mean gradients.
        module: module name of a LoRA-wrapped linear map.
        index: component index ``k``.

    Returns:
        the score.

    Raises:
        TypeError: if ``module`` carries no LoRA factors.
    """
    mod = supernet.model.get_submodule(module)
    if not isinstance(mod, LoraBiasLinear) or mod.rank == 0:
        raise TypeError(f"module {module!r} carries no LoRA factors")
    theta = (mod.lora_B.detach() * mod.mask_B)[:, index]
    total = -(grads[f"{module}.lora_B"][:, index] * theta).sum()
    return float(total + _offset_term(supernet, module, index, grads, None))


def first_order_scores(
    supernet: PetSupernet,
    batches: Iterable[Batch],
    loss_fn: LossFn = classification_loss,
    reduce: Reduce = "signed",
) -> dict[Unit, float]:
    """Structured first-order scores ``-g_G^T theta_G`` from the mean gradient over ``batches``.

    Args:
        supernet: the supernet.
        batches: scoring batches.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        reduce: see :func:`unit_scores`.

    Returns:
        unit -> score.
    """
    return unit_scores(supernet, pet_gradients(supernet, batches, loss_fn), reduce=reduce)


def second_order_scores(
    supernet: PetSupernet,
    batches: list[Batch],
    loss_fn: LossFn = classification_loss,
    reduce: Reduce = "signed",
    max_examples: int | None = None,
    kind: Literal["empirical", "true"] = "empirical",
) -> dict[Unit, float]:
    """Structured scores ``-g_G^T theta_G + 1/2 sum_{i in G} F_ii theta_i^2``.

    Args:
        supernet: the supernet.
        batches: scoring batches (a list: it is read twice, for ``g`` and for ``F``).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        reduce: see :func:`unit_scores`.
        max_examples: cap on the examples used for the Fisher.
        kind: Fisher kind, see :func:`fisher_diagonal`.

    Returns:
        unit -> score.
    """
    grads = pet_gradients(supernet, batches, loss_fn)
    fisher = fisher_diagonal(supernet, batches, loss_fn, max_examples, kind=kind)
    return unit_scores(supernet, grads, fisher, reduce=reduce)


def magnitude_scores(supernet: PetSupernet) -> dict[Unit, float]:
    r"""Magnitude baseline: the norm of the update that removing a unit takes away.

    Bias vector: ``|M_b * delta_b|_2``. LoRA component ``k``: the Frobenius norm of the removed
    rank-1 update, ``|b_k a_k^T - b0_k a0_k^T|_F`` with per-component offsets (``|b_k| |a_k|``
    otherwise), from masked factors; the common scaling ``s`` is omitted. Uses

    .. math::

        \|u v^T - p q^T\|_F^2 = \|u\|^2 \|v\|^2 + \|p\|^2 \|q\|^2 - 2 (u^T p)(v^T q).

    Args:
        supernet: the supernet.

    Returns:
        unit -> score (no gradient involved).
    """
    out = {}
    for u in supernet.units():
        mod = supernet.model.get_submodule(u.module)
        if u.kind == "bias":
            out[u] = float((mod.bias_delta * mod.mask_bias).detach().norm())
            continue
        a = (mod.lora_A * mod.mask_A).detach()[u.index]
        b = (mod.lora_B * mod.mask_B).detach()[:, u.index]
        sq = (b @ b) * (a @ a)
        if mod.offset_A is not None and mod.offset_mode == "component":
            a0 = mod.active_offset_A()[u.index]
            b0 = mod.offset_B[:, u.index]
            sq = sq + (b0 @ b0) * (a0 @ a0) - 2 * (b @ b0) * (a @ a0)
        out[u] = float(sq.clamp_min(0).sqrt())
    return out


def random_scores(supernet: PetSupernet, seed: int = 0) -> dict[Unit, float]:
    """Random baseline: i.i.d. uniform scores, reproducible from ``seed``.

    Multiplied by the unit cost, so greedy selection by score per parameter picks units
    uniformly at random regardless of their size.

    Args:
        supernet: the supernet.
        seed: seed of the draw.

    Returns:
        unit -> score.
    """
    units = supernet.units()
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand(len(units), generator=gen, dtype=torch.float64)
    return {u: float(d) * u.cost for u, d in zip(units, draws, strict=True)}
