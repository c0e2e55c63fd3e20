r"""PET supernet: a frozen encoder with bias deltas and masked LoRA factors on its modules.

Every target linear map ``y = W0 x + b0`` becomes

.. math::

    y = W_0 x + (b_0 + M_b \odot \delta b)
        + s \, \big[(M_B \odot B)(M_A \odot A) - B_0 Z A_0\big] x,

with ``A`` of shape ``(r_max, d_in)``, ``B`` of shape ``(d_out, r_max)``, scaling
``s = alpha / r_max`` and a frozen offset ``B_0 A_0`` that is present only under the balanced
initialisation (it equals the initial factors, so the function at the start is exactly the
pre-trained one). ``Z = diag(z)`` switches the offset of component ``k`` off together with the
component (``z_k = 0`` once row ``k`` of ``M_A`` or column ``k`` of ``M_B`` is all zero), so a
pruned component means "no update" again; with ``offset="frozen"`` ``Z = I`` always and a pruned
component leaves ``-s b0_k a0_k^T`` behind. Every target LayerNorm gets
``bias = b0 + M_b * delta_b``. The masks ``M`` are 0/1 buffers; a structured unit is a whole bias
vector or one LoRA rank-1 component (row ``k`` of ``A`` with column ``k`` of ``B``), an
unstructured unit a single entry.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional

logger = logging.getLogger(__name__)

BERT_LORA_TARGETS = (
    r"(^|\.)layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)$"
)
"""Regex for the six per-layer matrices of a BERT/RoBERTa encoder (Wq, Wk, Wv, Wo, W_in, W_out)."""

BERT_HEAD_MODULES = ("classifier", "score")
"""Names of task heads (trained, not pruned, left out of the budget)."""


@dataclass
class SupernetConfig:
    """Options of a PET supernet.

    Args:
        r_max: LoRA rank attached to every target matrix (``>= 1``).
        lora_alpha: LoRA ``alpha``; the scaling is ``s = lora_alpha / r_max``.
        lora_targets: regex searched in full module names; matching ``nn.Linear`` modules get LoRA
            and a bias delta (when they have a bias).
        layernorm_biases: whether every ``nn.LayerNorm`` outside the head gets a bias delta.
        head_modules: top-level-name components of head modules; these are neither wrapped nor
            frozen.
        init: ``"balanced"`` draws ``A`` and ``B`` with the same per-entry std and subtracts the
            frozen initial product (exact pre-trained function at the start, both factors scored
            fairly); ``"standard"`` is the usual LoRA start (``A`` Gaussian, ``B = 0``, no offset).
        init_std: per-entry std of the factors; ``None`` means ``(d_in * d_out) ** -0.25`` for
            ``"balanced"`` (geometric mean of ``1/sqrt(d_in)`` and ``1/sqrt(d_out)``) and
            ``1/sqrt(d_in)`` for ``A`` under ``"standard"``.
        offset: under ``"balanced"``: ``"component"`` (default) drops the offset share
            ``b0_k a0_k^T`` of a component once it is pruned, so pruning everything gives back the
            pre-trained model; ``"frozen"`` keeps the whole offset ``B0 A0`` whatever is pruned.
        seed: seed of the factor initialisation.

    Raises:
        ValueError: on a non-positive rank, alpha or std, or an unknown ``init``.
    """

    r_max: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = BERT_LORA_TARGETS
    layernorm_biases: bool = True
    head_modules: tuple[str, ...] = BERT_HEAD_MODULES
    init: Literal["balanced", "standard"] = "balanced"
    init_std: float | None = None
    offset: Literal["component", "frozen"] = "component"
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.r_max) != self.r_max or self.r_max < 1:
            raise ValueError(f"r_max must be a positive integer, got {self.r_max!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.init not in ("balanced", "standard"):
            raise ValueError(f"init must be 'balanced' or 'standard', got {self.init!r}")
        if self.offset not in ("component", "frozen"):
            raise ValueError(f"offset must be 'component' or 'frozen', got {self.offset!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"init_std must be > 0 or None, got {self.init_std!r}")
        self.head_modules = tuple(self.head_modules)

    @property
    def scaling(self) -> float:
        """LoRA scaling ``s = lora_alpha / r_max``."""
        return self.lora_alpha / self.r_max


class Unit(NamedTuple):
    """A structured prunable unit.

    Attributes:
        kind: ``"bias"`` (a whole bias-delta vector) or ``"lora"`` (one rank-1 component).
        module: full module name in the wrapped model.
        index: component index ``k`` for ``"lora"``, ``-1`` for ``"bias"``.
        cost: parameters the unit costs: ``|b|`` or ``d_in + d_out``.
    """

    kind: str
    module: str
    index: int
    cost: int


class LoraBiasLinear(nn.Module):
    """A frozen ``nn.Linear`` with a masked bias delta and masked rank-``r`` LoRA factors.

    Computes ``W0 x + b0 + M_b*db + s * [(M_B*B)(M_A*A) - B0 Z A0] x`` (module docstring); the
    offset buffers ``offset_A``, ``offset_B`` are ``None`` without the balanced initialisation.

    Args:
        base: the pre-trained linear layer (frozen in place).
        rank: LoRA rank ``r`` (0 for a bias delta only).
        scaling: LoRA scaling ``s``.
        tune_bias: whether to add a bias delta (ignored when ``base`` has no bias).
        offset_mode: ``"component"`` (``Z`` follows the masks) or ``"frozen"`` (``Z = I``).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scaling: float,
        tune_bias: bool,
        offset_mode: str = "component",
    ) -> None:
        super().__init__()
        self.offset_mode = offset_mode
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = scaling
        w = base.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        self.register_buffer("mask_A", torch.ones(rank, base.in_features, **kw))
        self.register_buffer("mask_B", torch.ones(base.out_features, rank, **kw))
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)
        if tune_bias and base.bias is not None:
            self.bias_delta = nn.Parameter(torch.zeros(base.out_features, **kw))
            self.register_buffer("mask_bias", torch.ones(base.out_features, **kw))
        else:
            self.bias_delta = None
            self.register_buffer("mask_bias", None)

    @property
    def in_features(self) -> int:
        """Input width ``d_in``."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output width ``d_out``."""
        return self.base.out_features

    def effective_bias(self) -> torch.Tensor | None:
        """Bias ``b0 + M_b * delta_b`` (or ``b0`` when no delta is attached)."""
        if self.bias_delta is None:
            return self.base.bias
        return self.base.bias + self.mask_bias * self.bias_delta

    def component_alive(self) -> torch.Tensor:
        """Component indicator ``z`` (bool, length ``r``).

        ``z_k`` is true when row ``k`` of ``M_A`` and column ``k`` of ``M_B`` both have an unmasked
        entry.
        """
        return self.mask_A.bool().any(dim=1) & self.mask_B.bool().any(dim=0)

    def active_offset_A(self) -> torch.Tensor | None:
        """``Z A0``: the offset rows still in use (all rows with ``offset_mode="frozen"``)."""
        if self.offset_A is None or self.offset_mode == "frozen":
            return self.offset_A
        return self.offset_A * self.component_alive().to(self.offset_A.dtype)[:, None]

    def delta_weight(self) -> torch.Tensor:
        """Weight update ``s * [(M_B*B)(M_A*A) - B0 Z A0]`` of shape ``(d_out, d_in)``."""
        delta = (self.lora_B * self.mask_B) @ (self.lora_A * self.mask_A)
        if self.offset_A is not None:
            delta = delta - self.offset_B @ self.active_offset_A()
        return self.scaling * delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer; the offset is subtracted before adding, so it cancels exactly."""
        y = functional.linear(x, self.base.weight, self.effective_bias())
        if self.rank == 0:
            return y
        hidden = functional.linear(x, self.lora_A * self.mask_A)
        lora = functional.linear(hidden, self.lora_B * self.mask_B)
        if self.offset_A is not None:
            offset = functional.linear(functional.linear(x, self.active_offset_A()), self.offset_B)
            lora = lora - offset
        return y + self.scaling * lora


class BiasDeltaLayerNorm(nn.Module):
    """A frozen ``nn.LayerNorm`` whose bias is ``b0 + M_b * delta_b``.

    Args:
        base: the pre-trained LayerNorm (frozen in place; must have a bias).
    """

    def __init__(self, base: nn.LayerNorm) -> None:
        super().__init__()
        if base.bias is None:
            raise ValueError("BiasDeltaLayerNorm needs a LayerNorm with a bias")
        self.base = base
        self.base.requires_grad_(False)
        kw = {"device": base.bias.device, "dtype": base.bias.dtype}
        self.bias_delta = nn.Parameter(torch.zeros_like(base.bias, **kw))
        self.register_buffer("mask_bias", torch.ones_like(base.bias, **kw))

    def effective_bias(self) -> torch.Tensor:
        """Bias ``b0 + M_b * delta_b``."""
        return self.base.bias + self.mask_bias * self.bias_delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer norm with the shifted bias."""
        b = self.base
        return functional.layer_norm(x, b.normalized_shape, b.weight, self.effective_bias(), b.eps)


PetModule = LoraBiasLinear | BiasDeltaLayerNorm


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _is_head(name: str, heads: tuple[str, ...]) -> bool:
    return any(part in heads for part in name.split("."))


class PetSupernet(nn.Module):
    """A frozen encoder with every candidate PET block attached, plus masks to prune them.

    The wrapped modules are replaced in ``model`` in place; only PET parameters (``lora_A``,
    ``lora_B``, ``bias_delta``) and head parameters stay trainable.

    Args:
        model: a Hugging Face encoder with a classification head (e.g.
            ``AutoModelForSequenceClassification``) or any ``nn.Module`` with matching names.
        config: the supernet options.

    Raises:
        ValueError: if no module matches the targets.

    Example:
        >>> net = PetSupernet(model, SupernetConfig(r_max=4))  # doctest: +SKIP
        >>> logits = net(input_ids=ids, attention_mask=mask).logits  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: SupernetConfig | None = None) -> None:
        super().__init__()
        if any(isinstance(m, LoraBiasLinear | BiasDeltaLayerNorm) for m in model.modules()):
            raise ValueError(
                "the model already carries PET wrappers; build the supernet from the "
                "pre-trained model (see PetSupernet.pristine_copy)"
            )
        self.config = config or SupernetConfig()
        self.model = model
        pattern = re.compile(self.config.lora_targets)
        heads = self.config.head_modules
        for p in model.parameters():
            p.requires_grad_(False)
        for name, mod in model.named_modules():
            if _is_head(name, heads):
                for p in mod.parameters():
                    p.requires_grad_(True)
        targets: list[tuple[str, nn.Module]] = []
        for name, mod in list(model.named_modules()):
            if not name or _is_head(name, heads):
                continue
            if isinstance(mod, nn.Linear) and pattern.search(name):
                targets.append(
                    (
                        name,
                        LoraBiasLinear(
                            mod,
                            self.config.r_max,
                            self.config.scaling,
                            tune_bias=True,
                            offset_mode=self.config.offset,
                        ),
                    )
                )
            elif (
                isinstance(mod, nn.LayerNorm)
                and self.config.layernorm_biases
                and mod.bias is not None
            ):
                targets.append((name, BiasDeltaLayerNorm(mod)))
        if not targets:
            raise ValueError(
                f"no module of the model matches lora_targets="
                f"{self.config.lora_targets!r} and no LayerNorm bias is tuned"
            )
        if not any(isinstance(w, LoraBiasLinear) for _, w in targets):
            warnings.warn(
                f"no nn.Linear matches lora_targets={self.config.lora_targets!r}; the "
                "supernet has LayerNorm bias deltas only. Pass lora_targets matching "
                "this model's module names",
                stacklevel=2,
            )
        for name, wrapper in targets:
            _set_submodule(model, name, wrapper)
        self._init_factors()
        logger.info(
            "PET supernet: %d wrapped modules, %d PET parameters",
            len(targets),
            self.count_parameters(),
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model with the same arguments and return its output."""
        return self.model(*args, **kwargs)

    def pet_modules(self) -> Iterator[tuple[str, PetModule]]:
        """Yield ``(name, module)`` for every wrapped module, in model order.

        Names are those of the original modules (relative to ``self.model``).
        """
        for name, mod in self.model.named_modules():
            if isinstance(mod, LoraBiasLinear | BiasDeltaLayerNorm):
                yield name, mod

    def lora_modules(self) -> Iterator[tuple[str, LoraBiasLinear]]:
        """Yield ``(name, module)`` for the wrapped linear maps with LoRA rank ``> 0``."""
        for name, mod in self.pet_modules():
            if isinstance(mod, LoraBiasLinear) and mod.rank > 0:
                yield name, mod

    def pet_parameters(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        """Yield ``(name, parameter, mask)`` for every PET parameter.

        Names are ``"<module>.lora_A"``, ``"<module>.lora_B"`` and ``"<module>.bias_delta"``.
        """
        for name, mod in self.pet_modules():
            if isinstance(mod, LoraBiasLinear) and mod.rank > 0:
                yield f"{name}.lora_A", mod.lora_A, mod.mask_A
                yield f"{name}.lora_B", mod.lora_B, mod.mask_B
            if mod.bias_delta is not None:
                yield f"{name}.bias_delta", mod.bias_delta, mod.mask_bias

    def head_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield the trainable head parameters (not part of the budget)."""
        for name, p in self.model.named_parameters():
            if p.requires_grad and _is_head(name, self.config.head_modules):
                yield name, p

    def _init_factors(self) -> None:
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        for _, mod in self.lora_modules():
            d_in, d_out = mod.in_features, mod.out_features
            kw = {"dtype": mod.lora_A.dtype}
            if self.config.init == "balanced":
                std = self.config.init_std or (d_in * d_out) ** -0.25
                a = torch.randn(mod.rank, d_in, generator=gen, **kw) * std
                b = torch.randn(d_out, mod.rank, generator=gen, **kw) * std
            else:
                std = self.config.init_std or 1.0 / math.sqrt(d_in)
                a = torch.randn(mod.rank, d_in, generator=gen, **kw) * std
                b = torch.zeros(d_out, mod.rank, **kw)
            with torch.no_grad():
                mod.lora_A.copy_(a)
                mod.lora_B.copy_(b)
            if self.config.init == "balanced":
                mod.offset_A = mod.lora_A.detach().clone()
                mod.offset_B = mod.lora_B.detach().clone()

    # ----------------------------------------------------------------------------------------
    # units and masks

    def units(self) -> list[Unit]:
        """All structured units in a stable order (model order, then component index).

        Returns:
            one ``Unit`` per bias-delta vector and per LoRA rank-1 component.
        """
        out: list[Unit] = []
        for name, mod in self.pet_modules():
            if mod.bias_delta is not None:
                out.append(Unit("bias", name, -1, mod.bias_delta.numel()))
            if isinstance(mod, LoraBiasLinear):
                cost = mod.in_features + mod.out_features
                out.extend(Unit("lora", name, k, cost) for k in range(mod.rank))
        return out

    def alive_units(self) -> list[Unit]:
        """Structured units with at least one unmasked entry (a component needs both factors)."""
        alive = []
        for u in self.units():
            mod = self.model.get_submodule(u.module)
            if u.kind == "bias":
                ok = bool(mod.mask_bias.any())
            else:
                ok = bool(mod.mask_A[u.index].any()) and bool(mod.mask_B[:, u.index].any())
            if ok:
                alive.append(u)
        return alive

    @torch.no_grad()
    def keep_units(self, keep: list[Unit] | set[Unit]) -> None:
        """Set the masks to keep exactly the given structured units (all others masked).

        Args:
            keep: units to keep; every other bias vector and component is switched off.

        Raises:
            ValueError: if a unit does not belong to this supernet.
        """
        known = set(self.units())
        keep = set(keep)
        unknown = keep - known
        if unknown:
            raise ValueError(f"units not in this supernet: {sorted(unknown)[:3]}")
        for _, mod in self.pet_modules():
            if mod.mask_bias is not None:
                mod.mask_bias.zero_()
            if isinstance(mod, LoraBiasLinear):
                mod.mask_A.zero_()
                mod.mask_B.zero_()
        for u in keep:
            mod = self.model.get_submodule(u.module)
            if u.kind == "bias":
                mod.mask_bias.fill_(1)
            else:
                mod.mask_A[u.index].fill_(1)
                mod.mask_B[:, u.index].fill_(1)
        self.apply_masks_()

    @torch.no_grad()
    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Set unstructured masks by parameter name (as in ``pet_parameters``).

        Args:
            masks: parameter name -> 0/1 (or bool) tensor of the parameter's shape; names not
                given are left unchanged.

        Raises:
            KeyError: for an unknown parameter name.
            ValueError: for a shape mismatch.
        """
        params = {n: m for n, _, m in self.pet_parameters()}
        for name, new in masks.items():
            if name not in params:
                raise KeyError(f"unknown PET parameter {name!r}")
            if tuple(new.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(new.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            params[name].copy_(new.to(params[name]))
        self.apply_masks_()

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean copies of all masks by parameter name."""
        return {n: m.detach().bool().clone() for n, _, m in self.pet_parameters()}

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero every masked PET entry in place (``theta <- M * theta``).

        Call after each optimizer step (or use :meth:`enforce_masks`): Adam momentum and weight
        decay would otherwise revive masked entries.
        """
        for _, p, m in self.pet_parameters():
            p.mul_(m)

    def enforce_masks(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every ``optimizer.step()``.

        Args:
            optimizer: an optimizer over (some of) this supernet's parameters.

        Returns:
            the hook handle (``handle.remove()`` detaches it).
        """
        return optimizer.register_step_post_hook(lambda *_: self.apply_masks_())

    def ranks(self) -> dict[str, int]:
        """Live LoRA rank per module: components whose A-row and B-column are both non-empty."""
        out = {}
        for name, mod in self.lora_modules():
            a_alive = mod.mask_A.bool().any(dim=1)
            b_alive = mod.mask_B.bool().any(dim=0)
            out[name] = int((a_alive & b_alive).sum())
        return out

    def tuned_biases(self) -> dict[str, int]:
        """Bias-delta vectors with at least one unmasked entry: module name -> unmasked count."""
        out = {}
        for name, mod in self.pet_modules():
            if mod.mask_bias is not None and bool(mod.mask_bias.any()):
                out[name] = int(mod.mask_bias.bool().sum())
        return out

    def count_parameters(self) -> int:
        """Number of unmasked PET entries, ``nnz(M_A) + nnz(M_B) + nnz(M_b)`` (head excluded)."""
        return sum(int(m.bool().sum()) for _, _, m in self.pet_parameters())

    def head_parameter_count(self) -> int:
        """Number of trainable head parameters (reported, not budgeted)."""
        return sum(p.numel() for _, p in self.head_parameters())

    # ----------------------------------------------------------------------------------------
    # function-preserving transforms and copies

    @torch.no_grad()
    def rebalance_(self) -> None:
        """Equalise the norms of the two factors of every component without changing ``BA``.

        For each component ``k``: ``a_k <- a_k * sqrt(|b_k| / |a_k|)``, ``b_k <- b_k *
        sqrt(|a_k| / |b_k|)`` (norms of the masked factors). Components with a zero factor are
        left alone (they cannot be balanced without changing the function).
        """
        for _, mod in self.lora_modules():
            a = mod.lora_A * mod.mask_A
            b = mod.lora_B * mod.mask_B
            na = a.norm(dim=1)
            nb = b.norm(dim=0)
            ok = (na > 0) & (nb > 0)
            c = torch.where(ok, torch.sqrt(nb / torch.where(ok, na, 1)), torch.ones_like(na))
            mod.lora_A.mul_(c[:, None])
            mod.lora_B.mul_(1.0 / c[None, :])

    def pristine_copy(self) -> nn.Module:
        """Deep copy of the model with every wrapper replaced by its frozen base module.

        The head keeps its current (trained) values; no PET update is applied.
        """
        clone = copy.deepcopy(self.model)
        for name, mod in list(clone.named_modules()):
            if isinstance(mod, LoraBiasLinear | BiasDeltaLayerNorm):
                _set_submodule(clone, name, mod.base)
        return clone

    @torch.no_grad()
    def merged_copy(self) -> nn.Module:
        """Deep copy of the model with the masked PET update merged into plain modules.

        ``W = W0 + s [(M_B*B)(M_A*A) - B0 A0]`` and ``b = b0 + M_b * delta_b``.
        """
        clone = copy.deepcopy(self.model)
        for name, mod in list(clone.named_modules()):
            if isinstance(mod, LoraBiasLinear | BiasDeltaLayerNorm):
                base = mod.base
                if isinstance(mod, LoraBiasLinear) and mod.rank > 0:
                    base.weight.add_(mod.delta_weight())
                if mod.bias_delta is not None:
                    base.bias.copy_(mod.effective_bias())
                _set_submodule(clone, name, base)
        return clone
