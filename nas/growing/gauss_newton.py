r"""Learn a candidate's fan-in and fan-out from the Gauss-Newton model of the loss.

For ``k`` new units at a site with fan-in :math:`A` (bias included as a last column when the
producer has a bias), fan-out :math:`B`, and per-example statistics from
`nas.growing.statistics.collect_site_statistics`, the loss change is modelled as

.. math::
    m(A, b) = c(A)^\top b + \tfrac12 b^\top M(A)\, b,\qquad b = \mathrm{vec}(B)

    c(A) = \tfrac1n \sum_i \sum_l g_{il} \otimes U_{il}(A),\qquad
    M(A) = \tfrac1n \sum_i \Phi_i(A)^\top \Phi_i(A),\qquad
    (\Phi_i)_{k,(q,m)} = \sum_l (S_i^\top J_i)_{k q l}\, U_{i m l}(A)

where :math:`U_i(A)` are the consumer features of the new activations :math:`s_i = \sigma(A h_i)`
(`nas.growing.sites.consumer_features`; for a linear consumer :math:`U_i = s_i`),
:math:`g_{il}` the back-propagated gradient at the consumer output and :math:`S_i^\top J_i` the
whitened output Jacobian, so :math:`\Phi_i^\top \Phi_i` is the per-example GGN in ``b``. ``b``
is laid out as PyTorch's row-major ``B.flatten()``.

* **Fan-out, closed form** (`fan_out_closed_form`): :math:`b^*(A) = -(M + \lambda D)^{-1} c`,
  predicted change :math:`m^*(A) = -\tfrac12 c^\top (M + \lambda D)^{-1} c \le 0`.
* **Function-space damping** (default): :math:`\lambda\, b^\top D b = \lambda \tfrac1n \sum_i
  \lVert \delta_i \rVert^2` with :math:`D = I_q \otimes \tfrac1n \sum_i U_i U_i^\top`; the score
  is then invariant to :math:`A \to \alpha A,\ B \to B/\alpha` for positively homogeneous
  activations. ``damping_kind="parameter"`` uses :math:`D = I`.
* **Fan-in** (`learn_morphism`): starts from the top-``k`` generalised eigenvectors of
  :math:`(C \bar G^{-1} C^\top, \Sigma_h)` (`eigen_fan_in`, the closed form for a linearised
  activation and shared curvature :math:`\bar G`), then maximises the reduced objective
  :math:`F(A) = -m^*(A)` by Adam; by the envelope theorem the gradient of :math:`m^*` is the
  partial gradient of :math:`m(A, b)` at fixed :math:`b = b^*(A)` (variable projection). Rows of
  ``A`` are kept at a fixed norm (new pre-activations as large as the existing ones).
* **Scores**: :math:`b^*` is learned on one set of examples and the model is evaluated on
  held-out examples, :math:`\mathrm{score} = -m_{\mathrm{val}}(A^*, b^*)` in loss units: an
  in-sample decrease grows with the number of parameters even for noise.

* **Growth method** (`GaussNewtonGrowth`): one statistics pass per round, candidates at every
  site, a Levenberg-Marquardt check of each candidate's step on the true loss, selection by
  held-out score per added parameter.

With ``curvature="identity"`` every :math:`G_i` is replaced by the identity (so :math:`M = D`):
this is the TINY-like model (`nas.growing.baselines`).


Exactness: when the consumer is the output layer, :math:`J_i = I`; for squared error
:math:`m(A, b)` equals the true loss change for every ``b`` and for cross-entropy it is off by
:math:`O(\lVert b \rVert^3)`. Deeper sites drop the second-order term of the downstream network
(the Gauss-Newton approximation) and are exact to first order only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional

from defbound.curvature import damped_solve, generalized_eigh, per_example_loss
from nas.growing.candidates import (
    Candidate,
    GrowthContext,
    GrowthStep,
    grow_with,
    measure_actual_changes,
)
from nas.growing.sites import (
    Increment,
    IncrementHook,
    NormStatistics,
    Site,
    consumer_features,
    growth_sites,
    new_activations,
    norm_statistics,
    pre_activations,
)
from nas.growing.statistics import SiteStatistics, collect_site_statistics

logger = logging.getLogger(__name__)

DampingKind = Literal["function", "parameter"]
Curvature = Literal["ggn", "identity"]


@dataclass(frozen=True)
class GaussNewtonConfig:
    r"""Options of `learn_morphism`.

    Attributes:
        damping: :math:`\lambda \ge 0`. The default 1.0 was chosen on validation accuracy
            (MNIST-5k MLP and digits CNN benchmarks); at 0.1 the inserted fan-out overshoots on
            convolutional nets with batch norm and the predicted change ranks candidates worse.
        damping_kind: ``"function"`` (:math:`D = I_q \otimes \Sigma_U`) or ``"parameter"``
            (:math:`D = I`).
        curvature: ``"ggn"`` or ``"identity"`` (TINY-like model).
        init: ``"eigen"`` (generalised eigenvectors, random start where they do not apply) or
            ``"random"``.
        fan_in_steps: Adam steps on the reduced objective (0: keep the start).
        fan_in_lr: Adam step size for unit-norm rows, divided by :math:`\sqrt{p}`.
        restarts: Random starts tried (best kept) when the eigen start does not apply.
    """

    damping: float = 1.0
    damping_kind: DampingKind = "function"
    curvature: Curvature = "ggn"
    init: Literal["eigen", "random"] = "eigen"
    fan_in_steps: int = 30
    fan_in_lr: float = 0.1
    restarts: int = 4

    def __post_init__(self) -> None:
        if not math.isfinite(self.damping) or self.damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if self.damping_kind not in ("function", "parameter"):
            raise ValueError(f"damping_kind must be 'function' or 'parameter', got "
                             f"{self.damping_kind!r}")
        if self.curvature not in ("ggn", "identity"):
            raise ValueError(f"curvature must be 'ggn' or 'identity', got {self.curvature!r}")
        if self.init not in ("eigen", "random"):
            raise ValueError(f"init must be 'eigen' or 'random', got {self.init!r}")
        if self.fan_in_steps < 0 or self.restarts < 1 or self.fan_in_lr <= 0:
            raise ValueError("fan_in_steps must be >= 0, restarts >= 1 and fan_in_lr > 0")


@dataclass(frozen=True)
class QuadraticTerms:
    r"""The GN model of one fan-in: :math:`m(b) = c^\top b + \frac12 b^\top M b`.

    Attributes:
        gradient: ``c``, shape ``(d,)``.
        curvature: ``M``, shape ``(d, d)``.
        damping_matrix: ``D``, shape ``(d, d)``.
        norm: Batch-norm statistics used for the new channels (or ``None``).
    """

    gradient: Tensor
    curvature: Tensor
    damping_matrix: Tensor
    norm: NormStatistics | None

    def value(self, b: Tensor) -> Tensor:
        """Undamped model value :math:`m(b)`."""
        return self.gradient @ b + 0.5 * b @ (self.curvature @ b)


@dataclass
class LearnedMorphism:
    r"""Fan-in and fan-out of ``k`` new units at a site, with their predicted loss change.

    Attributes:
        site_index: Top-level index of the site.
        k: Number of new units.
        fan_in: ``A``, shape ``site.fan_in_shape(k)``.
        bias: New biases, ``(k,)``, or ``None``.
        fan_out: ``B``, shape ``site.fan_out_shape(k)``.
        norm: Batch-norm statistics for the new channels, or ``None``.
        linear_term: :math:`c_{\mathrm{val}}^\top b^*` on the held-out examples.
        quadratic_term: :math:`b^{*\top} M_{\mathrm{val}} b^*` on the held-out examples.
        fit_change: :math:`m(b^*)` on the fitting examples (undamped).
        objective: Values of :math:`F(A)` along the fan-in refinement.
        init: Which start was used (``"eigen"`` or ``"random"``).
        damping: The :math:`\lambda` of the fan-out solve.
    """

    site_index: int
    k: int
    fan_in: Tensor
    bias: Tensor | None
    fan_out: Tensor
    norm: NormStatistics | None
    linear_term: float
    quadratic_term: float
    fit_change: float
    objective: list[float] = field(default_factory=list)
    init: str = "eigen"
    damping: float = 0.0

    def predicted_change(self, scale: float = 1.0) -> float:
        r"""Held-out predicted loss change with fan-out :math:`\eta B^*`.

        :math:`\eta c^\top b^* + \tfrac12 \eta^2 b^{*\top} M b^*`.
        """
        return scale * self.linear_term + 0.5 * scale**2 * self.quadratic_term

    @property
    def score(self) -> float:
        r"""Predicted held-out decrease :math:`-m_{\mathrm{val}}(b^*)` (loss units)."""
        return -self.predicted_change(1.0)


# ------------------------------------------------------------------------------------------------
# The quadratic model for a fixed fan-in


def quadratic_terms(
    site: Site,
    stats: SiteStatistics,
    fan_in: Tensor,
    bias: Tensor | None,
    *,
    norm: NormStatistics | None = None,
    curvature: Curvature = "ggn",
    damping_kind: DampingKind = "function",
) -> QuadraticTerms:
    r"""Build ``c``, ``M`` and ``D`` of the GN model for the fan-in ``(A, a)`` (differentiable).

    Args:
        site: The site.
        stats: Its statistics (``n`` examples).
        fan_in: ``A``, shape ``site.fan_in_shape(k)``, float64.
        bias: ``a``, ``(k,)`` or ``None``.
        norm: Batch-norm statistics for the new channels; default: the batch statistics of the
            new pre-activations on these examples (sites with a batch norm).
        curvature: ``"ggn"`` or ``"identity"`` (:math:`G_i = I`, so :math:`M = I_q \otimes
            \Sigma_U`).
        damping_kind: ``"function"`` or ``"parameter"``.

    Returns:
        `QuadraticTerms`.
    """
    n = stats.num_examples
    z = pre_activations(site, stats.inputs, fan_in, bias)
    if norm is None:
        norm = norm_statistics(site, z)
    features = consumer_features(site, new_activations(site, z, norm))
    q = stats.gradients.shape[1]
    m = features.shape[1]

    gradient = torch.einsum("nql,nml->qm", stats.gradients, features).reshape(-1) / n
    feature_cov = torch.einsum("nml,nkl->mk", features, features) / n
    eye_q = torch.eye(q, dtype=features.dtype, device=features.device)
    function_damping = torch.kron(eye_q, feature_cov)
    if curvature == "identity":
        curv = function_damping
    else:
        phi = torch.einsum("nkql,nml->nkqm", stats.whitened_jacobians, features)
        phi = phi.reshape(-1, q * m)
        curv = phi.T @ phi / n
    if damping_kind == "function":
        damping_matrix = function_damping
    else:
        damping_matrix = torch.eye(q * m, dtype=features.dtype, device=features.device)
    return QuadraticTerms(gradient, curv, damping_matrix, norm)


def damped_curvature(terms: QuadraticTerms, damping: float) -> Tensor:
    r"""The damped curvature :math:`M + \lambda D + \epsilon I`.

    :math:`\epsilon = 10^{-9} \cdot \mathrm{tr}(M + D)/d` only guards against exactly singular
    matrices (a new unit that is zero on every example makes a zero row in both ``M`` and
    ``D``); it changes no well-posed solution noticeably.
    """
    d = terms.gradient.numel()
    base = terms.curvature + damping * terms.damping_matrix
    trace = (terms.curvature + terms.damping_matrix).detach().diagonal().sum()
    ridge = 1e-9 * float(trace) / d
    eye = torch.eye(d, dtype=base.dtype, device=base.device)
    return base + max(ridge, 1e-300) * eye


def fan_out_closed_form(terms: QuadraticTerms, damping: float) -> Tensor:
    r"""Minimiser :math:`b^* = -(M + \lambda D)^{-1} c` (float64; see `damped_curvature`).

    Args:
        terms: The model for a fixed fan-in.
        damping: :math:`\lambda \ge 0`.

    Returns:
        ``b*``, shape ``(d,)``, row-major ``vec(B)``.
    """
    with torch.no_grad():
        return -damped_solve(damped_curvature(terms, damping), terms.gradient)


def reduced_objective(terms: QuadraticTerms, damping: float) -> Tensor:
    r"""Predicted decrease :math:`F = -m^*(A) = \tfrac12 c^\top (M + \lambda D)^{-1} c`.

    Differentiable in the fan-in through the envelope theorem: :math:`b^*` is held fixed and
    :math:`-[c^\top b^* + \tfrac12 b^{*\top}(M + \lambda D) b^*]` is returned, whose value is
    :math:`F` and whose gradient is :math:`\nabla_A F`.

    Args:
        terms: The model, built from a fan-in that requires grad.
        damping: :math:`\lambda`.

    Returns:
        Scalar tensor.
    """
    b = fan_out_closed_form(terms, damping)
    damped = damped_curvature(terms, damping)
    return -(terms.gradient @ b + 0.5 * b @ (damped @ b))


# ------------------------------------------------------------------------------------------------
# Fan-in: generalised eigenvector start and variable projection


def _producer_rows(site: Site, inputs: Tensor) -> Tensor:
    """Producer input rows ``(n, L, p')`` (conv: unfolded patches), with a 1 for the bias."""
    layer = site.producer_layer
    if isinstance(layer, nn.Linear):
        rows = inputs.unsqueeze(1)
    else:
        rows = functional.unfold(
            inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
            stride=layer.stride,
        ).transpose(1, 2)
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1)
    return rows


# NOTE: the eigenvector start is exact only for linear producer and consumer; for convolutions
# with equal output sizes it approximates the consumer kernel by its centre tap, and behind
# nn.Flatten or pooling (different spatial sizes) random starts are used instead. The optional
# "growth versus no-growth" correction (jointly re-fitting the existing fan-out) is not
# implemented: scores count decreases that updating existing weights could also reach.


def eigen_fan_in(
    site: Site, stats: SiteStatistics, k: int, curvature: Curvature = "ggn"
) -> Tensor | None:
    r"""Top-``k`` generalised eigenvectors of :math:`(C \bar G^{-1} C^\top, \Sigma_h)` as rows.

    With a linearised activation (:math:`\sigma(z) \approx z`) and a shared curvature
    :math:`\bar G = \frac{1}{nL} \sum_{i,l} G_{il}`, the undamped predicted decrease is
    :math:`\tfrac12 \mathrm{tr}[(A \Sigma_h A^\top)^{-1} A C \bar G^{-1} C^\top A^\top]` with
    :math:`C = \frac1n \sum_{i,l} h_{il} g_{il}^\top` and :math:`\Sigma_h = \frac1n \sum_{i,l}
    h_{il} h_{il}^\top`, maximised by these eigenvectors. With ``curvature="identity"``
    (:math:`\bar G = I`) this is TINY's :math:`\Sigma_h^{-1/2} C` SVD solution.

    It applies when every producer output position feeds the consumer output at the same
    position: linear producer and consumer, or convolutions with equal output sizes (the
    consumer's kernel is then approximated by its centre tap). Otherwise ``None``.

    Args:
        site: The site.
        stats: Its statistics.
        k: Number of rows.
        curvature: ``"ggn"`` or ``"identity"``.

    Returns:
        ``(k, p')`` rows (bias in the last column when the producer has one), each of unit
        norm, or ``None``.
    """
    rows = _producer_rows(site, stats.inputs)
    grads = stats.gradients
    n, positions, p = rows.shape
    if positions != grads.shape[2] or k > p:
        return None
    cross = torch.einsum("nlp,nql->pq", rows, grads) / n
    input_cov = torch.einsum("nlp,nlr->pr", rows, rows) / n
    if curvature == "identity":
        pulled_root = cross
    else:
        wj = stats.whitened_jacobians
        shared = torch.einsum("nkql,nkrl->qr", wj, wj) / (n * positions)
        values, vectors = torch.linalg.eigh(shared)
        keep = values > 1e-10 * values.abs().max().clamp_min(1e-300)
        pulled_root = cross @ (vectors[:, keep] * values[keep].rsqrt())
    if k > pulled_root.shape[1]:
        # more units than the rank of C G^-1 C^T: solve the full problem
        jitter = 1e-12 * float(input_cov.diagonal().sum()) / p
        _, full = generalized_eigh(pulled_root @ pulled_root.T, input_cov, jitter)
        top = full[:, :k].T
    else:
        top = _low_rank_generalized_eigenvectors(pulled_root, input_cov, k)
    return top / top.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _low_rank_generalized_eigenvectors(root: Tensor, covariance: Tensor, k: int) -> Tensor:
    r"""Top-``k`` solutions of :math:`K K^\top v = \mu \Sigma v` for a thin ``K`` (``p x r``).

    Every solution with :math:`\mu > 0` is :math:`v = \Sigma^{-1} K w` with
    :math:`K^\top \Sigma^{-1} K w = \mu w`, so one solve with :math:`\Sigma` and an
    ``r x r`` eigenproblem replace the ``p x p`` one. Returns ``(k, p)`` rows.
    """
    p = covariance.shape[0]
    jitter = 1e-12 * float(covariance.diagonal().sum()) / p
    solved = damped_solve(covariance, root, jitter)
    small = root.T @ solved
    mu, w = torch.linalg.eigh(0.5 * (small + small.T))
    order = torch.argsort(mu, descending=True)[:k]
    return (solved @ w[:, order]).T


def _split(site: Site, rows: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    if site.producer_layer.bias is not None:
        return rows[:, :-1].reshape(site.fan_in_shape(k)), rows[:, -1]
    return rows.reshape(site.fan_in_shape(k)), None


def _row_norm(site: Site, stats: SiteStatistics) -> float:
    r"""Row norm giving new pre-activations the RMS size of the existing units'."""
    rows = _producer_rows(site, stats.inputs)
    layer = site.producer_layer
    weight = layer.weight.detach().to(rows).reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        weight = torch.cat([weight, layer.bias.detach().to(rows).unsqueeze(1)], dim=1)
    existing = (rows @ weight.T).pow(2).mean().sqrt()
    unit = rows.pow(2).sum(-1).mean().sqrt() / math.sqrt(rows.shape[-1])
    return float(existing / unit.clamp_min(1e-12)) / math.sqrt(rows.shape[-1])


def learn_fan_in(
    site: Site,
    fit: SiteStatistics,
    k: int,
    config: GaussNewtonConfig = GaussNewtonConfig(),  # noqa: B008
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None, list[float], str]:
    r"""Learn the fan-in ``(A, a)`` of ``k`` new units by maximising :math:`F(A) = -m^*(A)`.

    Steps: (1) start from `eigen_fan_in` (or the best of ``config.restarts`` random directions
    where it does not apply, or with ``config.init="random"``), flipping the sign of any row
    where that raises :math:`F`; (2) ``config.fan_in_steps`` Adam steps on :math:`F` with
    unit-norm rows scaled to a fixed norm (new pre-activations about as large as the existing
    units'); the best ``A`` seen is returned.

    Args:
        site: The site.
        fit: Statistics of the examples used for learning.
        k: Number of new units.
        config: `GaussNewtonConfig`.
        generator: CPU generator for random starts.

    Returns:
        ``(fan_in, bias, trace, init)``: ``A`` shaped ``site.fan_in_shape(k)``, biases ``(k,)``
        or ``None``, the values of :math:`F` along the refinement, and ``"eigen"`` or
        ``"random"``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dtype, device = fit.inputs.dtype, fit.inputs.device
    p = _producer_rows(site, fit.inputs[:1]).shape[-1]
    radius = _row_norm(site, fit)

    def objective(direction: Tensor) -> Tensor:
        rows = radius * direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
        fan_in, bias = _split(site, rows, k)
        terms = quadratic_terms(
            site, fit, fan_in, bias, curvature=config.curvature,
            damping_kind=config.damping_kind,
        )
        return reduced_objective(terms, config.damping)

    def value(direction: Tensor) -> float:
        with torch.no_grad():
            return float(objective(direction))

    start, init = None, "random"
    if config.init == "eigen":
        start = eigen_fan_in(site, fit, k, config.curvature)
        init = "eigen" if start is not None else "random"
    if start is None:
        draws = [
            torch.randn(k, p, generator=generator, dtype=torch.float64).to(device, dtype)
            for _ in range(config.restarts)
        ]
        start = max(draws, key=value)
    else:
        # rows beyond the rank of the eigenproblem can vanish: give them random directions
        norms = start.norm(dim=1)
        empty = norms <= 1e-12 * norms.max().clamp_min(1e-300)
        if bool(empty.any()):
            fill = torch.randn(int(empty.sum()), p, generator=generator, dtype=torch.float64)
            start = start.clone()
            start[empty] = fill.to(device, dtype)
    start = _best_signs(start, value)

    direction = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([direction], lr=config.fan_in_lr / math.sqrt(p))
    best_value, best = -math.inf, start.clone()
    trace = []
    for step in range(config.fan_in_steps + 1):
        if step == config.fan_in_steps:
            current = value(direction.detach())
        else:
            optimizer.zero_grad()
            decrease = objective(direction)
            current = float(decrease.detach())
        trace.append(current)
        if current > best_value:
            best_value, best = current, direction.detach().clone()
        if step < config.fan_in_steps:
            (-decrease).backward()
            optimizer.step()
    rows = radius * best / best.norm(dim=1, keepdim=True).clamp_min(1e-300)
    fan_in, bias = _split(site, rows, k)
    logger.debug("site %s: F %.3g -> %.3g (%s start)", site.name, trace[0], best_value, init)
    return fan_in, bias, trace, init


def fit_fan_out(
    site: Site,
    fit: SiteStatistics,
    held_out: SiteStatistics,
    fan_in: Tensor,
    bias: Tensor | None,
    *,
    damping: float,
    curvature: Curvature = "ggn",
    damping_kind: DampingKind = "function",
) -> LearnedMorphism:
    r"""Closed-form fan-out for a fixed fan-in, and its predicted change on held-out examples.

    :math:`b^* = -(M_{\mathrm{fit}} + \lambda D_{\mathrm{fit}})^{-1} c_{\mathrm{fit}}`; then
    the undamped model is evaluated at :math:`b^*` on ``held_out`` (batch-norm statistics of the
    new channels from ``fit``).

    Args:
        site: The site.
        fit: Statistics of the examples used for fitting.
        held_out: Statistics of the scoring examples.
        fan_in: ``A``.
        bias: ``a`` or ``None``.
        damping: :math:`\lambda`.
        curvature: ``"ggn"`` or ``"identity"``.
        damping_kind: ``"function"`` or ``"parameter"``.

    Returns:
        `LearnedMorphism` (without a refinement trace).
    """
    k = fan_in.shape[0]
    with torch.no_grad():
        terms = quadratic_terms(site, fit, fan_in, bias, curvature=curvature,
                                damping_kind=damping_kind)
        b = fan_out_closed_form(terms, damping)
        held = quadratic_terms(site, held_out, fan_in, bias, norm=terms.norm,
                               curvature=curvature, damping_kind=damping_kind)
    return LearnedMorphism(
        site_index=site.index,
        k=k,
        fan_in=fan_in,
        bias=bias,
        fan_out=b.reshape(site.fan_out_shape(k)),
        norm=terms.norm,
        linear_term=float(held.gradient @ b),
        quadratic_term=float(b @ (held.curvature @ b)),
        fit_change=float(terms.value(b)),
        damping=damping,
    )


def learn_morphism(
    site: Site,
    fit: SiteStatistics,
    held_out: SiteStatistics,
    k: int,
    config: GaussNewtonConfig = GaussNewtonConfig(),  # noqa: B008
    generator: torch.Generator | None = None,
) -> LearnedMorphism:
    r"""Learn ``(A, B)`` for ``k`` new units at ``site`` and predict their loss change.

    `learn_fan_in` on ``fit``, then `fit_fan_out` (closed form on ``fit``, undamped model
    evaluated on ``held_out``).

    Args:
        site: The site.
        fit: Statistics on the examples used to learn ``(A, B)``.
        held_out: Statistics on other examples, for the score (may be ``fit`` itself for an
            in-sample score).
        k: Number of new units.
        config: `GaussNewtonConfig`.
        generator: CPU generator for random starts.

    Returns:
        `LearnedMorphism`.
    """
    fan_in, bias, trace, init = learn_fan_in(site, fit, k, config, generator)
    learned = fit_fan_out(site, fit, held_out, fan_in, bias, damping=config.damping,
                          curvature=config.curvature, damping_kind=config.damping_kind)
    learned.objective, learned.init = trace, init
    return learned


def _best_signs(rows: Tensor, value) -> Tensor:
    """Flip rows one at a time where that raises the objective (activations need not be odd)."""
    rows = rows.clone()
    current = value(rows)
    for j in range(rows.shape[0]):
        flipped = rows.clone()
        flipped[j] = -flipped[j]
        candidate = value(flipped)
        if candidate > current:
            rows, current = flipped, candidate
    return rows


# ------------------------------------------------------------------------------------------------
# The growth method


@dataclass
class GaussNewtonGrowth:
    r"""Growth by Gauss-Newton learned morphisms (the method of this package).

    Each round: one statistics pass over ``stat_examples`` random training examples
    (`nas.growing.statistics.collect_site_statistics`); the first ``1 - held_out_fraction`` of
    them learn ``(A, B)`` for ``k`` units at every site (`learn_fan_in`, `fit_fan_out`), the
    rest score them (predicted held-out decrease, loss units); selection by score per added
    parameter within the budget; insertion with fan-out :math:`\eta B^*` (``scale``) or zero
    (``zero_fan_out=True``, strictly function preserving).

    Trust region (``trust_region=True``): the true loss change of each candidate (with
    :math:`\eta = 1`) is measured on the fitting examples (one forward pass); while the ratio
    of true to predicted change is below ``min_ratio`` the damping is multiplied by 10 and
    :math:`b^*` recomputed (at most ``max_increases`` times). This is Levenberg-Marquardt's
    rule; it keeps the inserted step where the quadratic model holds.

    Attributes:
        config: `GaussNewtonConfig`.
        stat_examples: Examples in the statistics pass.
        held_out_fraction: Share of them used only for scoring.
        curvature_samples: ``None``: exact GGN (``o`` backward passes per example); else the
            number of sampled targets (Monte-Carlo GGN, ``curvature_samples + 1`` backward
            passes).
        scale: :math:`\eta`.
        zero_fan_out: Insert with :math:`B = 0`.
        trust_region: Adapt the damping per candidate as above.
        min_ratio: Smallest accepted ratio of true to predicted change.
        max_increases: Most damping increases per candidate.
        rule: Selection rule (`nas.growing.candidates.select_candidates`).
        measure: Also measure every candidate's true held-out loss change (diagnostic, not
            counted as search compute).
        diagnostic_sizes: Extra unit counts learned and measured at every site for the
            predicted-versus-actual comparison only (never inserted, not counted as search).
        name: Name in logs and metrics.
    """

    config: GaussNewtonConfig = field(default_factory=GaussNewtonConfig)
    stat_examples: int = 512
    held_out_fraction: float = 0.5
    curvature_samples: int | None = 1
    scale: float = 1.0
    zero_fan_out: bool = False
    trust_region: bool = True
    min_ratio: float = 0.5
    max_increases: int = 4
    rule: str = "score_per_param"
    measure: bool = True
    diagnostic_sizes: tuple[int, ...] = ()
    name: str = "gn"

    def grow(self, context: GrowthContext) -> GrowthStep:
        """One growth step (see the class docstring)."""
        with context.counter.timing("search"):
            sites = growth_sites(context.model)
            inputs, targets = context.stat_batch(self.stat_examples)
            stats = collect_site_statistics(
                context.model, sites, inputs, targets, context.loss,
                curvature_samples=self.curvature_samples, generator=context.generator,
            )
            n = len(inputs)
            outputs = next(iter(stats.values())).whitened_jacobians.shape[1]
            backward = 1 + (outputs if self.curvature_samples is None else self.curvature_samples)
            context.counter.add_search(n, n * backward)
            n_fit = max(1, int(round(n * (1 - self.held_out_fraction))))
            split = (slice(0, n_fit), slice(n_fit, None))
            candidates = self._candidates(context, sites, stats, inputs, targets, split,
                                          context.units)
        extra = []
        for size in self.diagnostic_sizes:
            if size != context.units:
                extra += self._candidates(context, sites, stats, inputs, targets, split, size,
                                          count=False)
        for candidate in extra:
            candidate.info["diagnostic"] = True
        if self.measure and candidates + extra:
            held = split[1]
            measure_actual_changes(context.model, candidates + extra, inputs[held],
                                   targets[held], context.loss,
                                   0.0 if self.zero_fan_out else self.scale)
        step = grow_with(context, candidates, rule=self.rule, scale=self.scale)
        step.candidates = candidates + extra
        return step

    def _candidates(
        self,
        context: GrowthContext,
        sites: list[Site],
        stats: dict[int, SiteStatistics],
        inputs: Tensor,
        targets: Tensor,
        split: tuple[slice, slice],
        k: int,
        count: bool = True,
    ) -> list[Candidate]:
        candidates = []
        for site in sites:
            params = site.added_parameters(k)
            if context.max_new_params is not None and params > context.max_new_params:
                continue
            fit_stats = stats[site.index].subset(split[0])
            held_stats = stats[site.index].subset(split[1])
            fan_in, bias, trace, init = learn_fan_in(site, fit_stats, k, self.config,
                                                     context.generator)
            learned, ratio = self._fan_out(context, site, fit_stats, held_stats, fan_in, bias,
                                           inputs[split[0]], targets[split[0]], count)
            candidates.append(
                Candidate(
                    site.index, site.name, k, learned.fan_in, learned.bias,
                    None if self.zero_fan_out else learned.fan_out, learned.norm,
                    score=learned.score, num_params=params,
                    predicted_change=0.0 if self.zero_fan_out else
                    learned.predicted_change(self.scale),
                    info={"init": init, "fit_change": learned.fit_change,
                          "objective_start": trace[0], "objective_best": max(trace),
                          "damping": learned.damping, "fit_ratio": ratio},
                )
            )
        return candidates

    def _fan_out(
        self,
        context: GrowthContext,
        site: Site,
        fit_stats: SiteStatistics,
        held_stats: SiteStatistics,
        fan_in: Tensor,
        bias: Tensor | None,
        inputs: Tensor,
        targets: Tensor,
        count: bool = True,
    ) -> tuple[LearnedMorphism, float | None]:
        damping = self.config.damping
        options = {"curvature": self.config.curvature, "damping_kind": self.config.damping_kind}
        learned = fit_fan_out(site, fit_stats, held_stats, fan_in, bias, damping=damping,
                              **options)
        if not self.trust_region:
            return learned, None
        base = float(fit_stats.losses.mean())
        ratio = None
        for attempt in range(self.max_increases + 1):
            true = _true_change(context, site, learned, inputs, targets) - base
            if count:
                context.counter.add_search(len(inputs), 0)
            predicted = learned.fit_change
            ratio = true / predicted if predicted < 0 else -math.inf
            if ratio >= self.min_ratio or attempt == self.max_increases:
                break
            damping = 10.0 * damping if damping > 0 else 1e-3
            learned = fit_fan_out(site, fit_stats, held_stats, fan_in, bias, damping=damping,
                                  **options)
        return learned, ratio


@torch.no_grad()
def _true_change(
    context: GrowthContext, site: Site, learned: LearnedMorphism, inputs: Tensor,
    targets: Tensor,
) -> float:
    """Mean loss on ``inputs`` with ``learned`` added virtually (evaluation mode)."""
    model = context.model
    was_training = model.training
    model.eval()
    # the hook computes in the model's dtype and device
    increment = Increment(site, learned.fan_in, learned.bias, learned.fan_out, learned.norm)
    with IncrementHook([increment]):
        value = float(per_example_loss(model(inputs), targets, context.loss).mean())
    model.train(was_training)
    return value
