"""Tests for the PET search pipeline, its baselines, the benchmark and the ``pet`` command."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import copy
import itertools
import json

import pytest
import torch
from peft import PeftModel

import nas.pet.search as search_module
from nas.pet import baselines
from nas.pet.allocation import budget_allocation, module_location, summarise_allocation
from nas.pet.benchmark import BenchConfig, format_table, run_benchmark, summarise
from nas.pet.cli import main
from nas.pet.data import split_dataframe, tiny_bert, word_tokenizer
from nas.pet.export import export_peft
from nas.pet.search import CHECKPOINT, SearchConfig, run_search
from nas.pet.selection import Unit, architecture_cost, exact_select, greedy_select
from nas.pet.training import TrainConfig, encode, evaluate

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TRAIN = TrainConfig(steps=6, batch_size=8, max_length=24, eval_batch_size=64)


def _texts(n, seed=0):
    """Short labelled sentences: the label decides which of two word lists fills the template."""
    gen = torch.Generator().manual_seed(seed)
    good = ["great", "moving", "funny", "smart", "warm", "lovely"]
    bad = ["dull", "boring", "clumsy", "flat", "tedious", "awful"]
    subjects = ["the film", "this movie", "the story", "the cast", "the script"]
    rows = []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=gen))
        words = good if label else bad
        w = words[int(torch.randint(0, len(words), (1,), generator=gen))]
        s = subjects[int(torch.randint(0, len(subjects), (1,), generator=gen))]
        rows.append({"text": f"{s} is {w} and {s} stays {w} .", "label": label})
    return rows


@pytest.fixture(scope="module")
def corpus():
    import pandas as pd

    df = pd.DataFrame(_texts(160))
    ds = split_dataframe(df, validation_fraction=0.2, test_fraction=0.2, seed=0)
    tok = word_tokenizer(ds["train"]["text"], max_vocab=64)
    data = {s: encode(ds[s], tok, TRAIN.max_length) for s in ds}
    return df, tok, data


def _model(tok, seed=0):
    return tiny_bert(len(tok.get_vocab()), hidden_size=16, layers=2, heads=2, seed=seed)


def _config(budget, **kw):
    return SearchConfig(budget=budget, train=TRAIN, search_steps=4, score_batches=2, **kw)


def _units(spec):
    return {Unit("bias", f"m{i}", -1, c): s for i, (c, s) in enumerate(spec)}


# ---------------------------------------------------------------------------------------------
# selection


def test_exact_select_equals_brute_force_knapsack():
    gen = torch.Generator().manual_seed(3)
    for trial in range(30):
        n = 7
        costs = [int(c) for c in torch.randint(1, 6, (n,), generator=gen) * 16]
        scores = [float(s) for s in torch.randn(n, generator=gen)]
        units = _units(zip(costs, scores, strict=True))
        budget = int(torch.randint(16, sum(costs), (1,), generator=gen))
        sel = exact_select(units, budget)
        best_cost = max(
            sum(c for c, k in zip(costs, keep, strict=True) if k)
            for keep in itertools.product([0, 1], repeat=n)
            if sum(c for c, k in zip(costs, keep, strict=True) if k) <= budget
        )
        best_score = max(
            sum(s for s, k in zip(scores, keep, strict=True) if k)
            for keep in itertools.product([0, 1], repeat=n)
            if sum(c for c, k in zip(costs, keep, strict=True) if k) == best_cost
        )
        assert sel.cost == best_cost, trial
        assert sel.cost == sum(u.cost for u in sel.kept)
        assert sel.score == pytest.approx(best_score, abs=1e-12), trial


def test_exact_select_fills_a_budget_greedy_leaves_slack():
    # greedy takes the best ratio (cost 3) and then nothing fits; 2 + 2 meets 4 exactly.
    units = _units([(3, 3.3), (2, 2.0), (2, 2.0)])
    assert greedy_select(units, 4).cost == 3
    sel = exact_select(units, 4)
    assert sel.cost == 4
    assert sel.score == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------
# pipeline


def _peft_lora_count(peft_model):
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"score": "fisher", "fisher_examples": 8},
        {"schedule": "iterative", "rounds": 3, "round_steps": 2},
    ],
)
def test_search_meets_budget_exactly_and_exports(corpus, tmp_path, options):
    _, tok, data = corpus
    budget = 37 * 16  # every unit cost is a multiple of 16
    result, net = run_search(_model(tok), data, _config(budget, **options))

    assert result.n_params == budget
    assert architecture_cost(net) == budget
    assert result.details["architecture_cost"] == budget
    assert sum(r["params"] for r in result.details["allocation"]) == budget
    assert result.details["structured"]
    assert set(result.metrics) == {"validation", "test"}
    assert 0.0 <= result.accuracy <= 1.0

    summary = export_peft(net, tmp_path / "adapter")
    assert summary.n_params == budget
    assert summary.n_offset == 0  # retrain="reinit" leaves no balanced-init offset
    if summary.bias_mode != "beft":
        loaded = PeftModel.from_pretrained(net.pristine_copy(), str(tmp_path / "adapter")).eval()
        assert _peft_lora_count(loaded) == summary.n_lora
        batch = {k: v[:6] for k, v in data["test"]._asdict().items() if k != "labels"}
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(**batch).logits, net(**batch).logits, atol=1e-5, rtol=1e-5
            )


def test_unstructured_search_meets_budget(corpus):
    _, tok, data = corpus
    result, net = run_search(_model(tok), data, _config(1001, structured=False))
    assert result.n_params == 1001
    assert net.count_parameters() == 1001
    assert result.method == "search-unstructured"


def test_retrain_reinit_starts_from_pretrained_function(corpus):
    _, tok, data = corpus
    model = _model(tok)
    before = evaluate(copy.deepcopy(model), data["test"])
    cfg = _config(400)
    trained = search_module.train_supernet(copy.deepcopy(model), data["train"], cfg)
    net = copy.deepcopy(trained[0])
    search_module.prune_supernet(net, data["train"], cfg)
    search_module.reinitialise(net, trained[1]["head_init"], seed=1)
    after = evaluate(net, data["test"])
    assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)
    assert net.count_parameters() == 400


def test_budget_larger_than_supernet_is_refused(corpus):
    _, tok, data = corpus
    with pytest.raises(ValueError, match="exceeds the supernet"):
        run_search(_model(tok), data, _config(10**7))


def test_search_config_rejects_bad_options():
    with pytest.raises(ValueError, match="budget"):
        SearchConfig(budget=0)
    with pytest.raises(ValueError, match="score"):
        SearchConfig(budget=10, score="second")
    with pytest.raises(ValueError, match="rounds"):
        SearchConfig(budget=10, schedule="iterative", rounds=1)


def test_resume_after_interruption_gives_the_same_result(corpus, tmp_path, monkeypatch):
    _, tok, data = corpus
    cfg = _config(400)
    reference, _ = run_search(_model(tok), data, cfg, checkpoint_dir=tmp_path / "ref")

    calls = []
    real_fit = search_module.fit

    def failing_fit(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if kwargs.get("desc") == "retrain":
            raise KeyboardInterrupt("simulated interruption")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(search_module, "fit", failing_fit)
    with pytest.raises(KeyboardInterrupt):
        run_search(_model(tok), data, cfg, checkpoint_dir=tmp_path / "run")
    assert calls == ["supernet", "retrain"]
    payload = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert payload["stage"] == "prune"

    def counting_fit(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real_fit(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(search_module, "fit", counting_fit)
    resumed, _ = run_search(_model(tok), data, cfg, checkpoint_dir=tmp_path / "run")
    assert calls == ["retrain"]  # the supernet stage was not repeated
    assert resumed.details["ranks"] == reference.details["ranks"]
    assert resumed.details["biases"] == reference.details["biases"]
    assert resumed.metrics["test"]["loss"] == pytest.approx(
        reference.metrics["test"]["loss"], rel=1e-6
    )
    with open(tmp_path / "run" / "search_result.json") as fh:
        assert json.load(fh)["n_params"] == 400

    with pytest.raises(ValueError, match="other search options"):
        run_search(_model(tok), data, _config(432), checkpoint_dir=tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# baselines


def _changed(before, after):
    return {n for n, p in after.items() if not torch.equal(p, before[n])}


def test_bitfit_trains_exactly_the_biases(corpus):
    _, tok, data = corpus
    model = _model(tok)
    budget = baselines.bitfit_budget(model)
    h, f = 16, 32
    assert budget == 2 * (4 * h + f + h + 2 * h) + h  # 6 linear + 2 LayerNorm biases, + embeddings
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = baselines.run_bitfit(model, data, TRAIN)
    after = {n: p.detach() for n, p in model.named_parameters()}
    changed = _changed(before, after)
    allowed = {n for n, _ in baselines.bitfit_parameters(model)} | {
        n for n in after if n.startswith("classifier.")
    }
    assert changed <= allowed
    assert any(n.endswith("query.bias") for n in changed)
    assert result.n_params == budget
    assert result.head_params == sum(p.numel() for n, p in after.items() if "classifier" in n)


def test_lora_qv_counts_and_freezes(corpus):
    _, tok, data = corpus
    model = _model(tok)
    budget = baselines.lora_budget(model, r=8)
    assert budget == 2 * 2 * 8 * (16 + 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = baselines.run_lora(model, data, TRAIN)
    assert result.method == "lora-qv"
    assert result.n_params == budget
    after = {
        n.replace(".base_layer.", ".").replace(".original_module.", "."): p.detach()
        for n, p in model.named_parameters()
    }
    assert set(before) <= set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert not changed  # the pre-trained weights and the original head stay untouched
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 and all(bool(p.abs().sum() > 0) for p in lora_b)


def test_adalora_ends_within_one_triplet_of_the_budget(corpus):
    _, tok, data = corpus
    budget = 300
    result = baselines.run_adalora(_model(tok), data, TRAIN, budget=budget, init_r=6)
    triplet = 16 + 16 + 1
    assert budget - triplet < result.n_params <= budget
    assert sum(result.details["ranks"].values()) == budget // triplet


def test_adalora_trains_at_its_own_learning_rate(corpus, monkeypatch):
    _, tok, data = corpus
    seen = []
    original = baselines.fit

    def spy(*args, **kwargs):
        seen.append(kwargs.get("lr"))
        return original(*args, **kwargs)

    monkeypatch.setattr(baselines, "fit", spy)
    baselines.run_adalora(_model(tok), data, TRAIN, budget=300, init_r=6)
    own = TrainConfig(**{**TRAIN.__dict__, "adalora_lr": 0.0125})
    baselines.run_adalora(_model(tok), data, own, budget=300, init_r=6)
    assert seen == [TRAIN.lr, 0.0125]
    with pytest.raises(ValueError, match="adalora_lr must be > 0"):
        TrainConfig(adalora_lr=-1.0)


def test_adalora_refuses_a_budget_below_one_triplet(corpus):
    _, tok, data = corpus
    with pytest.raises(ValueError, match="triplet"):
        baselines.run_adalora(_model(tok), data, TRAIN, budget=10)


@pytest.mark.parametrize("score", ["random", "magnitude"])
def test_pruning_baselines_meet_the_budget(corpus, score):
    _, tok, data = corpus
    result, net = run_search(_model(tok), data, _config(400, score=score))
    assert result.n_params == 400
    assert architecture_cost(net) == 400


def test_random_pruning_depends_on_the_seed(corpus):
    _, tok, data = corpus
    archs = []
    for seed in (0, 1):
        result, _ = run_search(_model(tok), data, _config(400, score="random", seed=seed))
        archs.append((result.details["ranks"], result.details["biases"]))
    assert archs[0] != archs[1]


def test_full_finetuning_counts_every_weight(corpus):
    _, tok, data = corpus
    model = _model(tok)
    total = sum(p.numel() for p in model.parameters())
    result = baselines.run_full(model, data, TRAIN)
    assert result.n_params + result.head_params == total
    assert result.budget is None


def test_benchmark_runs_every_method_at_equal_budget_and_resumes(corpus, tmp_path):
    _, tok, data = corpus
    cfg = BenchConfig(
        budgets=("bitfit", 448),
        seeds=(0,),
        train=TRAIN,
        search=SearchConfig(budget=1, search_steps=3, score_batches=2, eval_splits=("test",)),
    )
    records = run_benchmark(lambda seed: _model(tok, seed), data, cfg, tmp_path)
    by = {(r["method"], r["budget_label"]): r for r in records}
    bitfit = by[("bitfit", "bitfit")]["n_params"]
    for method in ("search", "random", "magnitude"):
        assert by[(method, "bitfit")]["n_params"] == bitfit
        assert by[(method, 448)]["n_params"] == 448
    assert by[("adalora", "bitfit")]["n_params"] <= bitfit
    assert ("full", None) in by
    assert ("lora-qv", 448) not in by  # a numeric budget has no hand-designed method
    again = run_benchmark(lambda seed: _model(tok, seed), data, cfg, tmp_path)
    assert len(again) == len(records)  # everything was read back, nothing re-run
    summary = summarise(records)
    assert "search" in format_table(summary)
    assert sum(summary["allocation"]["bitfit"]["kind"].values()) == bitfit


# ---------------------------------------------------------------------------------------------
# allocation


def test_module_location_names_layers_and_types():
    assert module_location("bert.encoder.layer.3.attention.self.query") == ("3", "query")
    assert module_location("bert.encoder.layer.0.output.dense") == ("0", "ffn_out")
    assert module_location("bert.encoder.layer.5.attention.output.LayerNorm") == ("5", "attn_ln")
    assert module_location("bert.embeddings.LayerNorm") == ("emb", "emb_ln")


def test_allocation_sums_to_the_parameter_count(corpus):
    _, tok, data = corpus
    result, net = run_search(_model(tok), data, _config(400))
    rows = budget_allocation(net)
    summary = summarise_allocation(rows)
    assert sum(summary["layer"].values()) == net.count_parameters() == 400
    assert sum(summary["type"].values()) == 400
    # a component costs d_in + d_out: 16 + 16 in attention, 16 + 32 in the FFN
    cost = {"query": 32, "key": 32, "value": 32, "attn_out": 32, "ffn_in": 48, "ffn_out": 48}
    lora = sum(r["rank"] * cost[r["type"]] for r in rows if r["kind"] == "lora")
    assert lora == summary["kind"].get("lora", 0)


# ---------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    _, tok, _ = corpus
    path = tmp_path_factory.mktemp("tiny_model")
    _model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_file(corpus, tmp_path_factory):
    df, _, _ = corpus
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    df.rename(columns={"text": "review", "label": "sentiment"}).to_csv(path, index=False)
    return str(path)


def _cli(tmp_path, model_dir, data_file, *extra):
    out = tmp_path / "out"
    argv = [
        "search",
        "--model",
        model_dir,
        "--data",
        data_file,
        "--text-column",
        "review",
        "--label-column",
        "sentiment",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--max-length",
        "24",
        "--score-batches",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    return out, argv + list(extra)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "lots"], "budget must be a positive integer"),
        (["--budget", "0"], "budget must be a positive integer"),
        (["--budget", "100000000"], "exceeds the supernet"),
        (["--text-column", "body"], "missing column"),
        (["--steps", "-3"], "positive integer"),
        (["--adalora-lr", "0"], "--adalora-lr must be > 0"),
        (["--model", "/nonexistent/model"], "existing local model folder"),
    ],
)
def test_cli_rejects_bad_input_before_writing(
    tmp_path, model_dir, data_file, capsys, extra, message
):
    out, argv = _cli(tmp_path, model_dir, data_file, *extra)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_missing_data_file_and_non_empty_out(tmp_path, model_dir, data_file, capsys):
    out, argv = _cli(tmp_path, model_dir, str(tmp_path / "missing.csv"))
    with pytest.raises(SystemExit):
        main(argv)
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()

    out.mkdir()
    (out / "old.txt").write_text("keep me")
    _, argv = _cli(tmp_path, model_dir, data_file)
    with pytest.raises(SystemExit):
        main(argv)
    assert "not empty" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["old.txt"]


def test_cli_search_writes_metrics_adapter_and_plot(tmp_path, model_dir, data_file, capsys):
    out, argv = _cli(tmp_path, model_dir, data_file, "--budget", "bitfit")
    assert main(argv) == 0
    with open(out / "metrics.json") as fh:
        metrics = json.load(fh)
    assert metrics["n_params"] == metrics["budget"] == metrics["export"]["n_params"]
    assert metrics["budget_label"] == "bitfit"
    assert (out / "adapter" / "adapter_config.json").is_file()
    with open(out / "budget.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in capsys.readouterr().out
    # resuming with another budget is refused with the differing option named, no traceback
    _, argv = _cli(tmp_path, model_dir, data_file, "--budget", "400", "--resume")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "other search options (budget:" in capsys.readouterr().err


def test_dtype_is_passed_through(corpus):
    _, tok, data = corpus
    result, net = run_search(_model(tok), data, _config(400, dtype="float64"))
    assert {p.dtype for _, p, _ in net.pet_parameters()} == {torch.float64}
    assert net.model.classifier.weight.dtype == torch.float64
    assert result.n_params == 400


def test_cli_bench_writes_table_and_plots(tmp_path, model_dir, data_file, capsys):
    out, argv = _cli(tmp_path, model_dir, data_file)
    argv[0] = "bench"
    argv += [
        "--seeds",
        "0",
        "--budgets",
        "bitfit",
        "--methods",
        "search",
        "hand",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    with open(out / "metrics.json") as fh:
        rows = json.load(fh)["summary"]["rows"]
    assert {(r["method"], r["budget"]) for r in rows} == {
        ("search", "bitfit"),
        ("bitfit", "bitfit"),
    }
    assert len({tuple(r["n_params"]) for r in rows}) == 1  # equal budget
    assert (out / "budget_bitfit.png").is_file()
    assert "| bitfit | search |" in (out / "table.md").read_text()
    assert "search" in capsys.readouterr().out


def test_cli_bench_rejects_unknown_methods(tmp_path, model_dir, data_file, capsys):
    out, argv = _cli(tmp_path, model_dir, data_file)
    argv[0] = "bench"
    with pytest.raises(SystemExit):
        main([*argv, "--methods", "search", "prefix"])
    assert "unknown --methods" in capsys.readouterr().err
    assert not out.exists()
