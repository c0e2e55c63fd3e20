"""Architecture search for parameter-efficient fine-tuning (PET) by pruning a PET supernet.

Pipeline: wrap a frozen encoder in a :class:`PetSupernet` (bias deltas and LoRA factors with
masks), train it, score every unit (:mod:`nas.pet.scores`), prune to a parameter budget
(:mod:`nas.pet.selection`), then export the result to ``peft`` or our own format
(:mod:`nas.pet.export`). Offline data and the MiniLM encoder live in :mod:`nas.pet.data`.
The end-to-end pipeline with checkpoints is :func:`run_search` (:mod:`nas.pet.search`), the
baselines at equal budget are in :mod:`nas.pet.baselines`, the benchmark in
:mod:`nas.pet.benchmark` and the ``pet`` command line in :mod:`nas.pet.cli`.
"""

from nas.pet.allocation import budget_allocation, plot_allocation, summarise_allocation
from nas.pet.baselines import (
    bitfit_budget,
    lora_budget,
    run_adalora,
    run_bitfit,
    run_full,
    run_lora,
)
from nas.pet.export import (
    PeftExport,
    export_peft,
    load_unstructured,
    peft_config,
    save_unstructured,
    to_peft_model,
)
from nas.pet.scores import (
    classification_loss,
    component_score_from_b,
    entry_scores,
    first_order_scores,
    fisher_diagonal,
    magnitude_scores,
    pet_gradients,
    random_scores,
    second_order_scores,
    unit_scores,
)
from nas.pet.search import (
    SearchConfig,
    compact,
    prune_supernet,
    reinitialise,
    run_search,
    train_supernet,
)
from nas.pet.selection import (
    PruneInfo,
    Selection,
    architecture_cost,
    exact_select,
    geometric_budgets,
    greedy_select,
    is_structured,
    prune_structured,
    prune_unstructured,
    select_entries,
)
from nas.pet.supernet import (
    BERT_LORA_TARGETS,
    BiasDeltaLayerNorm,
    LoraBiasLinear,
    PetSupernet,
    SupernetConfig,
    Unit,
)
from nas.pet.training import PetResult, TrainConfig, encode, evaluate, fit

__all__ = [
    "BERT_LORA_TARGETS",
    "PetResult",
    "SearchConfig",
    "TrainConfig",
    "bitfit_budget",
    "budget_allocation",
    "compact",
    "encode",
    "evaluate",
    "exact_select",
    "fit",
    "lora_budget",
    "plot_allocation",
    "prune_supernet",
    "reinitialise",
    "run_adalora",
    "run_bitfit",
    "run_full",
    "run_lora",
    "run_search",
    "summarise_allocation",
    "train_supernet",
    "BiasDeltaLayerNorm",
    "LoraBiasLinear",
    "PeftExport",
    "PetSupernet",
    "PruneInfo",
    "Selection",
    "SupernetConfig",
    "Unit",
    "architecture_cost",
    "classification_loss",
    "component_score_from_b",
    "entry_scores",
    "export_peft",
    "first_order_scores",
    "fisher_diagonal",
    "geometric_budgets",
    "greedy_select",
    "is_structured",
    "load_unstructured",
    "magnitude_scores",
    "peft_config",
    "pet_gradients",
    "prune_structured",
    "prune_unstructured",
    "random_scores",
    "save_unstructured",
    "second_order_scores",
    "select_entries",
    "to_peft_model",
    "unit_scores",
]
