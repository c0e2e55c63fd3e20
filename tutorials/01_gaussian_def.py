# %% [markdown]
# # Gaussian deep exponential families with the forest-mixture bound
#
# This walkthrough writes a two-layer Gaussian DEF as an ordinary Pyro model, fits it to
# scikit-learn's 8x8 digits with closed-form forest-mixture (FM) sweeps, checks the result
# against the exact answer, and looks at the posterior with ArviZ.
#
# Run it as a script (`python tutorials/01_gaussian_def.py`) or open it as a notebook
# (jupytext understands the `# %%` cells). `DEFBOUND_TUTORIAL_SMALL=1` shrinks it for CI.

# %%
import os

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import torch

from defbound import FMBound, MeanFieldELBO, MeanFieldGuide, def_layer, fit
from defbound.data import load_split
from defbound.exact import log_likelihood, optimal_elbo
from defbound.inference_data import to_inference_data

SMALL = os.environ.get("DEFBOUND_TUTORIAL_SMALL") == "1"
OUT = os.environ.get("DEFBOUND_TUTORIAL_OUT", "runs/tutorial_01")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
pyro.clear_param_store()

# %% [markdown]
# ## Data
# Standardized digits with a fixed train/test split. Near-constant pixels are dropped (see the
# README for why).

# %%
split = load_split("digits", test_fraction=0.2, seed=0)
x = torch.tensor(split.train[:300] if SMALL else split.train)
x_test = torch.tensor(split.test)
D = x.shape[1]
print(f"{x.shape[0]} training rows, {D} columns")

# %% [markdown]
# ## The model, in plain Pyro
# `def_layer` samples one Gaussian layer given its parent and records on the site what the
# bound needs. The weights, biases and noise scales are ordinary `pyro.param`s, so both the
# closed-form M-step of `fit` and `SVI` can learn them.

# %%
K1, K2 = 12, 3
g = torch.Generator().manual_seed(0)
W1_init = torch.randn(K1, K2, generator=g, dtype=torch.float64) / K2**0.5
W0_init = torch.randn(D, K1, generator=g, dtype=torch.float64) / K1**0.5
positive = torch.distributions.constraints.positive


def model(x):
    W1 = pyro.param("W1", W1_init.clone())
    W0 = pyro.param("W0", W0_init.clone())
    b2 = pyro.param("b2", torch.zeros(K2, dtype=torch.float64))
    b1 = pyro.param("b1", torch.zeros(K1, dtype=torch.float64))
    b0 = pyro.param("b0", torch.zeros(D, dtype=torch.float64))
    s2 = pyro.param("s2", torch.ones(K2, dtype=torch.float64), constraint=positive)
    s1 = pyro.param("s1", torch.ones(K1, dtype=torch.float64), constraint=positive)
    s0 = pyro.param("s0", torch.ones(D, dtype=torch.float64), constraint=positive)
    with pyro.plate("data", x.shape[0]):
        z2 = def_layer("z2", bias=b2, noise_scale=s2)
        z1 = def_layer("z1", parent=z2, parent_name="z2", weights=W1, bias=b1, noise_scale=s1)
        def_layer("x", parent=z1, parent_name="z1", weights=W0, bias=b0, noise_scale=s0, obs=x)


guide = MeanFieldGuide(model)

# %% [markdown]
# ## Fit: FM sweeps for the local latents, closed-form M-step for the parameters

# %%
result = fit(model, x, guide, max_sweeps=60 if SMALL else 800, tol=1e-7, progress=not SMALL)
n = x.shape[0]
print(f"{result.sweeps} sweeps ({result.stop_reason}) in {result.wall_time[-1]:.1f} s")
print(f"ELBO per row {result.elbo[-1] / n:.3f}, FM bound per row {result.bound[-1] / n:.3f}")

# %% [markdown]
# The same quantities as Pyro losses (closed form, no sampling):

# %%
print("FMBound loss:", FMBound().loss(model, guide, x) / n)
print("MeanFieldELBO loss:", MeanFieldELBO().loss(model, guide, x) / n)

# %% [markdown]
# ## Check against the exact answer
# A Gaussian DEF is linear-Gaussian, so the exact evidence and the best possible mean-field ELBO
# are available. After enough sweeps the fitted q sits at ELBO* for the fitted parameters (each
# sweep does one E-step pass and then moves the parameters, so a short run stays a little below).

# %%
from defbound.elbo import model_and_guide_state

structure, moments = model_and_guide_state(model, guide, x)
params = structure.params.detach()
elbo_star = optimal_elbo(params, x).sum().item() / n
print(f"ELBO* per row {elbo_star:.4f}; reached {result.elbo[-1] / n:.4f}")
print(f"held-out log-likelihood per row: {log_likelihood(params, x_test).mean().item():.3f}")

# %% [markdown]
# ## Posterior with ArviZ

# %%
idata = to_inference_data(guide, x, result, num_draws=100 if SMALL else 500)
print(az.summary(idata, var_names=["z2"], kind="stats").head())
az.plot_posterior(idata, var_names=["z2"], coords={"row": [0]})
plt.savefig(os.path.join(OUT, "posterior_z2_row0.png"), dpi=100)
plt.close("all")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(idata.fit_trace["elbo"] / n, label="ELBO")
ax.plot(idata.fit_trace["bound"] / n, "--", label="FM bound")
ax.set_xlabel("sweep")
ax.set_ylabel("nats per row")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "bound_per_sweep.png"), dpi=100)
print("plots written to", OUT)
