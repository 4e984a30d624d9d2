"""ThreatModel: exact projections onto (Lp ball intersected with the [0, 1] box), random starts,
norms and steepest-ascent steps.

The projections are checked against an independent float64 reference (bisection on the KKT
multiplier of the ball constraint), against a generic solver (SLSQP) on small dimensions, and by the
variational inequality that characterizes a Euclidean projection onto a convex set.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import optimize, stats

from robustlab.errors import RobustlabError
from robustlab.threat import NORMS, ThreatModel, norms, sample_ball

FAST = settings(deadline=None, max_examples=60)


# ---------------------------------------------------------------------- reference projection


def _clip_box(d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(d, lo), hi)


def _pnorm(d: np.ndarray, norm: str) -> float:
    return float({"linf": np.max(np.abs(d), initial=0.0), "l2": np.linalg.norm(d), "l1": np.abs(d).sum()}[norm])


def reference_project(v: np.ndarray, x: np.ndarray, norm: str, eps: float) -> np.ndarray:
    """Projection of the point ``v`` onto {z : ||z - x||_p <= eps, 0 <= z <= 1} for one sample, in
    float64, written independently of the library: the box-clipped shrinkage of v - x whose
    multiplier makes the ball constraint tight, found by bisection (the norm is monotone in it)."""
    d = v - x
    lo, hi = -x, 1.0 - x
    if norm == "linf":
        return x + _clip_box(np.clip(d, -eps, eps), lo, hi)
    if _pnorm(_clip_box(d, lo, hi), norm) <= eps:
        return x + _clip_box(d, lo, hi)
    if eps == 0:
        return x.copy()
    if norm == "l2":
        # KKT: z - x = clip(d / (1 + mu), lo, hi) with mu >= 0.
        def shrink(mu: float) -> np.ndarray:
            return _clip_box(d / (1.0 + mu), lo, hi)

        low, high = 0.0, 1.0
        while _pnorm(shrink(high), norm) > eps:
            high *= 2.0
    else:
        # KKT: z - x = clip(soft_threshold(d, lam), lo, hi) with lam >= 0.
        def shrink(lam: float) -> np.ndarray:
            return _clip_box(np.sign(d) * np.maximum(np.abs(d) - lam, 0.0), lo, hi)

        low, high = 0.0, float(np.abs(d).max())
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _pnorm(shrink(mid), norm) > eps:
            low = mid
        else:
            high = mid
    return x + shrink(high)


def slsqp_project(v: np.ndarray, x: np.ndarray, norm: str, eps: float) -> np.ndarray:
    """The same projection from a general-purpose constrained solver (small dimensions only)."""
    n = v.size
    if norm == "l2":
        res = optimize.minimize(
            lambda z: 0.5 * np.sum((z - v) ** 2),
            np.clip(x, 0, 1),
            jac=lambda z: z - v,
            bounds=[(0.0, 1.0)] * n,
            constraints=[{"type": "ineq", "fun": lambda z: eps**2 - np.sum((z - x) ** 2), "jac": lambda z: -2 * (z - x)}],
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 500},
        )
        return res.x
    # L1: split z - x = p - m with p, m >= 0; sum(p + m) <= eps; box on x + p - m.
    def obj(w):
        z = x + w[:n] - w[n:]
        return 0.5 * np.sum((z - v) ** 2)

    def jac(w):
        g = x + w[:n] - w[n:] - v
        return np.concatenate([g, -g])

    cons = [
        {"type": "ineq", "fun": lambda w: eps - w.sum(), "jac": lambda w: -np.ones(2 * n)},
        {"type": "ineq", "fun": lambda w: x + w[:n] - w[n:], "jac": lambda w: np.hstack([np.eye(n), -np.eye(n)])},
        {"type": "ineq", "fun": lambda w: 1 - x - w[:n] + w[n:], "jac": lambda w: np.hstack([-np.eye(n), np.eye(n)])},
    ]
    res = optimize.minimize(
        obj, np.zeros(2 * n), jac=jac, bounds=[(0.0, None)] * (2 * n), constraints=cons, method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return x + res.x[:n] - res.x[n:]


# ---------------------------------------------------------------------- strategies


@st.composite
def projection_cases(draw, max_dim: int = 12, max_batch: int = 3):
    """(x, v, eps): clean points in the box (edges 0 and 1 included), arbitrary points v."""
    n = draw(st.integers(1, max_batch))
    dim = draw(st.integers(1, max_dim))
    unit = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0, allow_nan=False))
    x = draw(arrays(np.float64, (n, dim), elements=unit))
    scale = draw(st.sampled_from([0.01, 0.1, 1.0, 3.0]))
    noise = draw(arrays(np.float64, (n, dim), elements=st.floats(-1.0, 1.0, allow_nan=False)))
    v = x + scale * noise
    eps = draw(st.one_of(st.just(0.0), st.floats(1e-3, 4.0, allow_nan=False)))
    return x, v, eps


def _tensors(x: np.ndarray, v: np.ndarray, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    # A (N, 1, 1, D) image batch, so the library's flatten(1) logic is exercised on a 4-d tensor.
    shape = (x.shape[0], 1, 1, x.shape[1])
    return torch.tensor(x, dtype=dtype).view(shape), torch.tensor(v, dtype=dtype).view(shape)


# ---------------------------------------------------------------------- projection properties


@pytest.mark.parametrize("norm", NORMS)
@FAST
@given(case=projection_cases())
def test_projection_matches_float64_reference(norm, case):
    x, v, eps = case
    tm = ThreatModel(norm, eps)
    xt, vt = _tensors(x, v)
    p = tm.project(vt, xt).flatten(1).numpy()
    for i in range(x.shape[0]):
        ref = reference_project(v[i], x[i], norm, eps)
        np.testing.assert_allclose(p[i], ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
@FAST
@given(case=projection_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_projection_is_feasible_idempotent_and_fixes_inside_points(norm, case, dtype):
    x, v, eps = case
    tm = ThreatModel(norm, eps)
    xt, vt = _tensors(x, v, dtype)
    p = tm.project(vt, xt)
    # In the box, in the ball (within 1e-6), and contains() agrees at its default tolerance.
    assert bool(((p >= 0) & (p <= 1)).all())
    assert bool((tm.distance(p, xt) <= eps + 1e-6).all())
    assert bool(tm.contains(p, xt).all())
    # Idempotent.
    torch.testing.assert_close(tm.project(p, xt), p, atol=1e-6, rtol=0)
    # A point already inside (a shrunken feasible point) is left where it is.
    inner = xt + 0.5 * (p - xt)
    torch.testing.assert_close(tm.project(inner, xt), inner, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
@FAST
@given(case=projection_cases(), seed=st.integers(0, 2**31 - 1))
def test_projection_variational_inequality(norm, case, seed):
    """p is the Euclidean projection of v onto the convex set C iff <v - p, z - p> <= 0 for all z in C."""
    x, v, eps = case
    tm = ThreatModel(norm, eps)
    xt, vt = _tensors(x, v)
    p = tm.project(vt, xt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(8):
        # Random feasible z: uniform in the ball (clipped to the box) and the extreme points of a
        # rescaled ball sample, to probe the boundary too.
        z = tm.random_init(xt, gen)
        z_edge = tm.project(xt + 4 * (z - xt), xt)
        for zz in (z, z_edge):
            assert bool(tm.contains(zz, xt).all())
            inner = ((vt - p) * (zz - p)).flatten(1).sum(dim=1)
            assert bool((inner <= 1e-9).all()), inner


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_projection_matches_generic_solver(norm):
    rng = np.random.default_rng(0)
    for trial in range(12):
        dim = int(rng.integers(2, 6))
        x = rng.choice([0.0, 1.0, 0.3, 0.9], size=dim) if trial % 3 == 0 else rng.uniform(0, 1, dim)
        v = x + rng.normal(0, 0.8, dim)
        eps = float(rng.uniform(0.05, 1.5))
        xt, vt = _tensors(x[None], v[None])
        p = ThreatModel(norm, eps).project(vt, xt).flatten().numpy()
        ref = slsqp_project(v, x, norm, eps)
        # The library's answer is feasible and at least as close to v as the solver's.
        np.testing.assert_allclose(p, ref, atol=2e-5, rtol=0)
        assert np.sum((p - v) ** 2) <= np.sum((ref - v) ** 2) + 1e-9


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(16, 1, 28, 28), (8, 3, 32, 32)])
def test_projection_contains_in_float32_at_image_size(norm, shape):
    """Rounding x + delta in float32 must not push the realized perturbation out of the ball: for L1
    the per-pixel rounding errors add up over thousands of pixels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen)
    x[x < 0.3] = 0.0
    dim = math.prod(shape[1:])
    for eps in {"linf": (8 / 255, 0.3), "l2": (0.5, 3.0), "l1": (1.0, 12.0)}[norm]:
        tm = ThreatModel(norm, eps)
        scale = eps * 3 / {"linf": 1.0, "l2": math.sqrt(dim), "l1": dim}[norm]
        v = x + torch.randn(shape, generator=gen) * scale
        p = tm.project(v, x)
        assert bool(tm.contains(p, x).all()), (tm.distance(p, x) - eps).max()
        assert bool((tm.distance(p, x) <= eps).all())
        # Projecting a point that is already inside returns it bit for bit.
        assert torch.equal(tm.project(p, x), p)


def test_linf_projection_is_coordinatewise_clipping():
    tm = ThreatModel("linf", 0.1)
    x = torch.tensor([[[[0.0, 0.5, 0.95, 0.5]]]])
    v = torch.tensor([[[[-0.3, 0.58, 1.2, 0.2]]]])
    torch.testing.assert_close(tm.project(v, x), torch.tensor([[[[0.0, 0.58, 1.0, 0.4]]]]))


# ---------------------------------------------------------------------- random init


@pytest.mark.parametrize("norm", NORMS)
def test_random_init_inside_ball_and_box(norm):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200, 3, 8, 8, generator=gen)
    x[:50] = 0.0
    x[50:100] = 1.0
    for eps in (0.0, 0.05, 0.5, 5.0):
        tm = ThreatModel(norm, eps)
        for radius in ("volume", "uniform"):
            z = tm.random_init(x, gen, radius=radius)
            assert z.shape == x.shape and z.dtype == x.dtype
            assert bool(tm.contains(z, x).all())
            assert bool(((z >= 0) & (z <= 1)).all())
            if eps == 0:
                assert torch.equal(z, x)


def test_random_init_linf_covers_the_cube():
    gen = torch.Generator().manual_seed(0)
    eps = 0.2
    x = torch.full((4000, 1, 2, 3), 0.5)
    d = (ThreatModel("linf", eps).random_init(x, gen) - x).flatten(1)
    assert d.min() < -0.99 * eps and d.max() > 0.99 * eps
    # Each coordinate uniform on [-eps, eps]: Kolmogorov-Smirnov on one coordinate, means near 0.
    assert stats.kstest((d[:, 0] / eps).numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3
    assert bool((d.mean(dim=0).abs() < 0.02).all())


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("dim", [2, 3, 10])
def test_random_init_is_uniform_in_the_ball(norm, dim):
    """For a uniform point in a d-dimensional ball, P(||d|| <= r eps) = r^d; so (||d|| / eps)^d is
    uniform on [0, 1] (not all samples on the surface, not all near the center)."""
    gen = torch.Generator().manual_seed(dim)
    eps = 0.25
    x = torch.full((4000, 1, 1, dim), 0.5)  # far enough from the box that no clipping happens
    d = sample_ball(x.shape, norm, eps, generator=gen).flatten(1).double()
    r = norms(d, norm) / eps
    assert bool((r <= 1 + 1e-6).all())
    assert stats.kstest((r**dim).numpy(), "uniform").pvalue > 1e-3
    if dim == 2:
        frac = float((r < 0.5).double().mean())
        assert abs(frac - 0.25) < 0.03
        # All four quadrants (orthants) equally likely.
        quadrant = (d[:, 0] > 0).long() * 2 + (d[:, 1] > 0).long()
        counts = torch.bincount(quadrant, minlength=4).double() / len(quadrant)
        assert bool(((counts - 0.25).abs() < 0.03).all())


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_random_init_with_uniform_radius(norm):
    """radius="uniform" (PGD's start): uniform direction, radius uniform in [0, eps], even in image
    dimensions where a volume-uniform draw sits on the sphere."""
    gen = torch.Generator().manual_seed(4)
    eps, dim = 0.25, 784
    x = torch.full((3000, 1, 28, 28), 0.5)
    tm = ThreatModel(norm, eps)
    r = tm.distance(tm.random_init(x, gen, radius="uniform"), x) / eps
    assert bool((r <= 1 + 1e-6).all())
    assert stats.kstest(r.double().numpy(), "uniform").pvalue > 1e-3
    r_volume = tm.distance(tm.random_init(x, gen), x) / eps
    assert float(r_volume.min()) > 0.98  # the concentration that motivates radius="uniform"
    # Directions are symmetric: every coordinate's sign is a fair coin, and (L1) the budget is spread.
    d = sample_ball((2000, dim), norm, eps, generator=gen, radius="uniform")
    assert abs(float((d > 0).double().mean()) - 0.5) < 0.01
    assert float(d.mean(dim=0).abs().max()) < 0.01 * eps
    # Linf is unaffected (uniform in the cube either way), and a bad value is refused.
    a = ThreatModel("linf", eps).random_init(x[:4], torch.Generator().manual_seed(1), radius="uniform")
    b = ThreatModel("linf", eps).random_init(x[:4], torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(RobustlabError):
        tm.random_init(x[:4], gen, radius="sphere")


def test_random_init_is_reproducible_from_the_generator():
    x = torch.rand(8, 1, 4, 4)
    for norm in NORMS:
        tm = ThreatModel(norm, 0.3)
        a = tm.random_init(x, torch.Generator().manual_seed(5))
        b = tm.random_init(x, torch.Generator().manual_seed(5))
        c = tm.random_init(x, torch.Generator().manual_seed(6))
        assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------- distance / contains


def test_distance_is_the_per_sample_norm():
    x = torch.zeros(2, 1, 2, 2)
    x_adv = torch.tensor([[0.3, -0.4, 0.0, 0.0], [0.1, 0.1, 0.1, -0.2]]).view(2, 1, 2, 2)
    torch.testing.assert_close(ThreatModel("linf", 1).distance(x_adv, x), torch.tensor([0.4, 0.2]))
    torch.testing.assert_close(ThreatModel("l2", 1).distance(x_adv, x), torch.tensor([0.5, math.sqrt(0.07)]))
    torch.testing.assert_close(ThreatModel("l1", 1).distance(x_adv, x), torch.tensor([0.7, 0.5]))
    assert ThreatModel("l2", 1).distance(x_adv, x).shape == (2,)


def test_contains_semantics():
    tm = ThreatModel("l2", 0.5)
    x = torch.full((6, 1, 1, 2), 0.5)
    x_adv = torch.tensor(
        [
            [0.5, 0.5],  # the clean point
            [1.0, 0.5],  # exactly on the sphere
            [0.8, 0.9 + 1e-3],  # just outside the ball (0.3, 0.401)
            [0.5, 1.0 + 1e-3],  # outside the box
            [0.5, float("nan")],  # not finite
            [0.5 + 0.3, 0.5 + 0.4 + 5e-7],  # outside by less than the tolerance
        ]
    ).view(6, 1, 1, 2)
    assert tm.contains(x_adv, x).tolist() == [True, True, False, False, False, True]
    assert tm.contains(x_adv, x, tol=0.0).tolist()[:5] == [True, True, False, False, False]
    assert not bool(tm.contains(x_adv, x, tol=0.0)[5])
    assert tm.contains(x_adv, x, tol=0.01).tolist() == [True, True, True, True, False, True]


# ---------------------------------------------------------------------- steepest step


def test_steepest_step_norms():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(16, 3, 8, 8, generator=gen)
    dim = 3 * 8 * 8
    for step in (0.01, 0.5):
        s = ThreatModel("linf", 1).steepest_step(g, step)
        torch.testing.assert_close(s.flatten(1).abs().amax(1), torch.full((16,), step))
        assert bool((s.abs() == step).all()) and bool((s.sign() == g.sign()).all())
        s = ThreatModel("l2", 1).steepest_step(g, step)
        torch.testing.assert_close(norms(s, "l2"), torch.full((16,), step))
        torch.testing.assert_close(s / step, g / norms(g, "l2").view(-1, 1, 1, 1))
        for sparsity in (0.0, 0.95, 0.99):
            s = ThreatModel("l1", 1).steepest_step(g, step, l1_sparsity=sparsity)
            torch.testing.assert_close(norms(s, "l1"), torch.full((16,), step))
            k = max(1, round((1 - sparsity) * dim))
            nnz = (s.flatten(1) != 0).sum(1)
            assert bool((nnz == k).all())  # continuous gradients: no ties
            # The budget goes to the largest gradient entries, in their direction.
            top = g.flatten(1).abs().topk(k, dim=1).indices
            assert bool((s.flatten(1).gather(1, top) != 0).all())
            assert bool((s * g >= 0).all())


def test_steepest_step_per_sample_size_and_ascent():
    g = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for norm in NORMS:
        s = ThreatModel(norm, 1).steepest_step(g, sizes)
        torch.testing.assert_close(norms(s, norm), sizes)
        assert bool(((s * g).flatten(1).sum(1) > 0).all())  # an ascent direction
    # linf and l2 steps are the maximizers of <g, s> over the ball: the dual norms.
    torch.testing.assert_close((ThreatModel("linf", 1).steepest_step(g, 0.1) * g).flatten(1).sum(1), 0.1 * norms(g, "l1"))
    torch.testing.assert_close((ThreatModel("l2", 1).steepest_step(g, 0.1) * g).flatten(1).sum(1), 0.1 * norms(g, "l2"))


def test_l1_step_skips_coordinates_blocked_by_the_box():
    g = torch.tensor([[[[5.0, -4.0, 3.0, 0.1]]]])
    x_adv = torch.tensor([[[[1.0, 0.0, 0.5, 0.5]]]])  # the two largest gradients push out of the box
    s = ThreatModel("l1", 1).steepest_step(g, 0.2, x_adv=x_adv, l1_sparsity=0.75)
    torch.testing.assert_close(s, torch.tensor([[[[0.0, 0.0, 0.2, 0.0]]]]))


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "norm,eps",
    [("l3", 0.1), ("", 0.1), ("linf", -0.1), ("l2", float("nan")), ("l1", float("inf")), ("linf", "abc"), ("l2", None)],
)
def test_bad_threat_models_raise(norm, eps):
    with pytest.raises(RobustlabError):
        ThreatModel(norm, eps)


def test_bad_box_raises_and_norm_is_normalized():
    with pytest.raises(RobustlabError):
        ThreatModel("linf", 0.1, lower=1.0, upper=0.0)
    with pytest.raises(RobustlabError):
        norms(torch.zeros(1, 3), "l5")
    tm = ThreatModel("LINF", "0.5")  # type: ignore[arg-type]
    assert tm.norm == "linf" and tm.eps == 0.5
    assert ThreatModel(**tm.to_dict()) == tm
    assert tm.with_eps(0.1) == ThreatModel("linf", 0.1)
