"""Threat models: an Lp ball around each clean image intersected with the valid box.

Everything an attack needs about the geometry lives here, once: per-sample norms, the exact
Euclidean projection onto (ball intersected with box), uniform random starts inside the ball, and
the steepest-ascent step of each norm. Attacks never re-implement any of it.

All perturbations are in pixel space ([0, 1] images), so ``eps=8/255`` means the same everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from robustlab.errors import RobustlabError

NORMS = ("linf", "l2", "l1")  # the dense norms: what an attack supports unless it says otherwise
L0 = "l0"  # a budget of changed pixels (all channels of a pixel count once); eps is the count
ALL_NORMS = (*NORMS, L0)


def format_eps(norm: str | None, eps: float) -> str:
    """An epsilon as people write it, the one format robustlab prints and reports everywhere: short
    decimals as they are (``0.3``), linf radii that are a multiple of 1/255 (or 0.5/255) as ``8/255
    (0.03137)``, anything else with 4 significant digits."""
    eps = float(eps)
    if eps == 0 or float(f"{eps:.3g}") == eps:
        return f"{eps:g}"
    k = eps * 255.0
    if str(norm).lower() == "linf" and abs(2 * k - round(2 * k)) < 1e-6:
        return f"{round(2 * k) / 2:g}/255 ({eps:.4g})"
    return f"{eps:.4g}"


@dataclass(frozen=True)
class ThreatModel:
    """The set ``{x' : ||x' - x||_p <= eps, lower <= x' <= upper}`` around each clean image ``x``.

    norm: ``"linf"``, ``"l2"`` or ``"l1"``; eps: the radius in pixel units ([0, 1] scale).
    """

    norm: str
    eps: float
    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self) -> None:
        norm = str(self.norm).lower()
        if norm not in ALL_NORMS:
            raise RobustlabError(f"unknown norm {self.norm!r}; use one of {', '.join(ALL_NORMS)}")
        object.__setattr__(self, "norm", norm)
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise RobustlabError(f"epsilon must be a number, got {self.eps!r}") from None
        if not math.isfinite(eps) or eps < 0:
            raise RobustlabError(f"epsilon must be a finite number >= 0, got {self.eps!r}")
        if norm == L0 and eps != int(eps):
            raise RobustlabError(f"an l0 epsilon counts changed pixels and must be a whole number, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)
        if not self.lower < self.upper:
            raise RobustlabError(f"box lower bound {self.lower} must be below upper bound {self.upper}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_eps(self, eps: float) -> "ThreatModel":
        return ThreatModel(self.norm, eps, self.lower, self.upper)

    def __str__(self) -> str:
        return f"{self.norm} eps={format_eps(self.norm, self.eps)}"

    # ------------------------------------------------------------------ geometry

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``||x_adv - x||_p`` as a float tensor of shape (N,)."""
        return norms(x_adv - x, self.norm)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-sample bool: finite, inside the box and inside the ball, each within ``tol``."""
        flat = x_adv.flatten(1)
        finite = torch.isfinite(flat).all(dim=1)
        in_box = ((flat >= self.lower - tol) & (flat <= self.upper + tol)).all(dim=1)
        in_ball = self.distance(x_adv.clamp(self.lower, self.upper), x) <= self.eps + tol
        return finite & in_box & in_ball

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact Euclidean projection of ``x_adv`` onto the ball around ``x`` intersected with the box.

        Rounding is accounted for: the result passes ``contains`` even with ``tol=0``, and projecting
        it again returns it bit for bit. Linf: a clamp between per-pixel bounds, pulled in by a
        rounding margin (~1e-7 in float32). L2 and L1: a point whose box projection lies in the ball
        is just clamped to the box; the others get the KKT solution, found exactly in float64.
        Only cheap arithmetic runs on the whole batch: this is on every attack's inner loop.
        """
        if self.norm == L0:
            return _project_l0(x_adv, x, int(self.eps), self.lower, self.upper)
        if self.norm == "linf":
            margin = torch.finfo(x.dtype).eps * (max(abs(self.lower), abs(self.upper)) + self.eps)
            e = max(self.eps - margin, 0.0)
            lo = (x - e).clamp_(min=self.lower)
            hi = (x + e).clamp_(max=self.upper)
            return torch.clamp(x_adv, lo, hi)
        out = x_adv.clamp(self.lower, self.upper)  # the projection onto the box, exact
        outside = self.distance(out, x) > self.eps
        if not bool(outside.any()):
            return out
        rows = outside.nonzero(as_tuple=True)[0]
        xr = x[rows].flatten(1)
        x64 = xr.double()
        v = x_adv[rows].flatten(1).double() - x64
        # Bound on |d_i| in the direction of v_i.
        bound = torch.where(v >= 0, (self.upper - x64).clamp_min(0.0), (x64 - self.lower).clamp_min(0.0))
        solve = _project_l2_box if self.norm == "l2" else _project_l1_box
        delta = solve(v, bound, self.eps)
        # Rounding x + delta to the dtype can leave a row a hair outside the ball (for L1 the errors of
        # thousands of pixels add up): pull such rows in by a bound on that rounding error, and check.
        dim, dtype = xr.shape[1], x.dtype
        slack = torch.finfo(dtype).eps * (
            max(abs(self.lower), abs(self.upper)) * (dim if self.norm == "l1" else math.sqrt(dim))
            + self.eps * (math.log2(dim) + 2)
        )
        size = norms(delta, self.norm).clamp_min(1e-300)
        proj = (x64 + delta).to(dtype).clamp(self.lower, self.upper)
        for attempt in range(4):
            over = norms(proj - xr, self.norm) > self.eps
            if not bool(over.any()):
                break
            if attempt == 3:  # never expected: fall back to the clean point, which is always feasible
                proj[over] = xr[over]
                break
            scale = ((self.eps - slack * 2**attempt) / size[over]).clamp(0.0, 1.0).unsqueeze(1)
            proj[over] = (x64[over] + delta[over] * scale).to(dtype).clamp(self.lower, self.upper)
        out = out.contiguous()
        out.view(out.shape[0], -1)[rows] = proj
        return out

    def project_radius(self, x_adv: torch.Tensor, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of ``x_adv`` onto the ball of this norm around ``x`` with a per-sample
        ``radius`` (N,) (not eps), intersected with the box: the step of minimum-norm attacks whose
        radius adapts per sample (FMN, DDN). Exact up to float rounding (no rounding margin: the
        ball is the attack's working constraint, not the threat model's)."""
        if self.norm == L0:  # keep each sample's floor(radius) largest pixel changes
            out = x_adv.clamp(self.lower, self.upper)
            size = _pixel_magnitude(out - x)
            rank = size.argsort(dim=1, descending=True).argsort(dim=1)
            keep = (rank < radius.floor().clamp_min(0).unsqueeze(1)) & (size > 0)
            return torch.where(keep.view(x.shape[0], 1, *x.shape[2:]), out, x)
        r = radius.to(x.dtype).view(-1, *[1] * (x.dim() - 1)).clamp_min(0)
        if self.norm == "linf":
            return torch.minimum(torch.maximum(x_adv, x - r), x + r).clamp(self.lower, self.upper)
        out = x_adv.clamp(self.lower, self.upper)
        outside = norms(out - x, self.norm) > radius
        if not bool(outside.any()):
            return out
        rows = outside.nonzero(as_tuple=True)[0]
        x64 = x[rows].flatten(1).double()
        v = x_adv[rows].flatten(1).double() - x64
        bound = torch.where(v >= 0, (self.upper - x64).clamp_min(0.0), (x64 - self.lower).clamp_min(0.0))
        solve = _project_l2_box if self.norm == "l2" else _project_l1_box
        delta = solve(v, bound, radius[rows].double().unsqueeze(1))
        out = out.contiguous()
        out.view(out.shape[0], -1)[rows] = (x64 + delta).to(x.dtype).clamp(self.lower, self.upper)
        return out

    def random_init(
        self, x: torch.Tensor, generator: torch.Generator | None = None, radius: str = "volume"
    ) -> torch.Tensor:
        """A random point in the ball around each ``x`` (then clipped to the box).

        radius: ``"volume"`` draws uniformly from the ball; ``"uniform"`` draws a uniformly random
        direction and a radius uniform in [0, eps] (L2 and L1; Linf stays uniform in the cube). In high
        dimension a volume-uniform point lies almost surely on the sphere, so ``"uniform"`` is the
        better start for an iterative attack (see :func:`sample_ball`).
        """
        if self.norm == L0:
            return random_pixels(x, int(self.eps), self.lower, self.upper, generator)
        delta = sample_ball(x.shape, self.norm, self.eps, x.device, x.dtype, generator, radius)
        return (x + delta).clamp(self.lower, self.upper)

    def steepest_step(
        self,
        grad: torch.Tensor,
        step_size: float | torch.Tensor,
        x_adv: torch.Tensor | None = None,
        l1_sparsity: float = 0.95,
    ) -> torch.Tensor:
        """The step of size ``step_size`` (in this norm) that increases a linear loss most.

        linf: ``step * sign(g)``; l2: ``step * g / ||g||_2``; l1: the sparse step of SLIDE
        (Tramer & Boneh 2019): the budget is spread evenly over the top ``1 - l1_sparsity`` fraction
        of coordinates by ``|g|``, skipping coordinates that already sit on the box face the gradient
        pushes towards (needs ``x_adv``). ``step_size`` may be a scalar or a per-sample (N,) tensor.
        """
        if self.norm == L0:
            raise RobustlabError("an l0 threat model has no steepest step; use an l0 attack (sparse-rs)")
        step = _per_sample(step_size, grad)
        if self.norm == "linf":
            return step * grad.sign()
        if self.norm == "l2":
            return step * grad / norms(grad, "l2").clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
        g = grad.flatten(1).clone()
        if x_adv is not None:
            flat = x_adv.flatten(1)
            blocked = ((flat <= self.lower) & (g < 0)) | ((flat >= self.upper) & (g > 0))
            g = g.masked_fill(blocked, 0.0)
        mag = g.abs()
        k = max(1, int(round((1.0 - l1_sparsity) * g.shape[1])))
        kth = mag.topk(k, dim=1).values[:, -1:]
        mask = (mag >= kth) & (mag > 0)
        count = mask.sum(dim=1, keepdim=True).clamp_min(1)
        out = g.sign() * mask / count
        return step * out.view_as(grad)


# ---------------------------------------------------------------------- free functions


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.to(like.dtype).view(-1, *[1] * (like.dim() - 1))
    return value


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a batch of perturbations, shape (N,). ``l0`` counts changed pixels: for
    images (N, C, H, W) a pixel counts once whatever its channels; for flat (N, D) each coordinate."""
    if norm == L0:
        changed = delta != 0
        if changed.dim() >= 3:
            changed = changed.any(dim=1)
        return changed.flatten(1).sum(dim=1).to(delta.dtype if delta.is_floating_point() else torch.float32)
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise RobustlabError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")


def _project_l2_box(v: torch.Tensor, bound: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of ``v`` with ||clip(v)||_2 > eps: returns ``sign(v) * min(t |v|, bound)`` with the t in
    (0, 1) at which the L2 norm equals eps (the KKT point of the ball-and-box projection).

    f(t) = ||min(t |v|, bound)||^2 is increasing. Start from the t that ignores the box (a lower
    bound of the answer) and repeat: with the coordinates saturated at the current t held at their
    bounds, solve the remaining quadratic for t. Each t stays below the answer and the saturated set
    only grows, so this ends, exactly, once that set stops changing (2-3 rounds on images; at most
    one per coordinate) -- several times faster than sorting the breakpoints.
    """
    a = v.abs()
    a2, b2 = a.square(), bound.square()
    total = a2.sum(dim=1, keepdim=True)
    t = (eps / total.sqrt().clamp_min(1e-300)).clamp(max=1.0)
    saturated = torch.zeros_like(a, dtype=torch.bool)
    for round_ in range(a.shape[1] + 1):
        grown = saturated | (t * a >= bound)
        if round_ and torch.equal(grown, saturated):
            break
        saturated = grown
        s = saturated.to(a.dtype)
        fixed = (b2 * s).sum(dim=1, keepdim=True)
        free = total - (a2 * s).sum(dim=1, keepdim=True)
        t = ((eps**2 - fixed).clamp_min(0) / free.clamp_min(1e-300)).sqrt().clamp(max=1.0)
    return v.sign() * torch.minimum(t * a, bound)


def _project_l1_box(v: torch.Tensor, bound: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of ``v`` with ||clip(v)||_1 > eps: returns ``sign(v) * min(max(|v| - lam, 0), bound)``
    with the lam > 0 at which the L1 norm equals eps (the KKT point of the ball-and-box projection).

    g(lam) = sum_i clamp(|v_i| - lam, 0, bound_i) is piecewise linear and decreasing; coordinate i
    contributes slope -1 on (max(|v_i| - bound_i, 0), |v_i|). Sorting the 2n breakpoints gives g at
    every breakpoint by a cumulative sum, and lam exactly by linear interpolation.
    """
    a = v.abs()
    live = (a > 0) & (bound > 0)
    start = (a - bound).clamp_min(0)
    points = torch.cat([start, a], dim=1)
    slope_change = torch.cat([-live.to(v.dtype), live.to(v.dtype)], dim=1)
    order = points.argsort(dim=1)
    p = points.gather(1, order)
    dslope = slope_change.gather(1, order)
    slope = dslope.cumsum(1)  # slope of g just right of p[k]
    g0 = torch.minimum(a, bound).sum(dim=1, keepdim=True)
    seg = p.diff(dim=1) * slope[:, :-1]
    g = torch.cat([g0, g0 + seg.cumsum(1)], dim=1)  # g at each sorted breakpoint
    # First breakpoint with g <= eps; lam lies between it and the one before.
    k = (g > eps).sum(dim=1, keepdim=True).clamp(1, p.shape[1] - 1)
    p_prev, g_prev, s_prev = p.gather(1, k - 1), g.gather(1, k - 1), slope.gather(1, k - 1)
    lam = p_prev + (g_prev - eps) / (-s_prev).clamp_min(1e-300)
    lam = torch.minimum(lam, p.gather(1, k)).clamp_min(0)
    return v.sign() * torch.minimum((a - lam).clamp_min(0), bound)


def sample_ball(
    shape: torch.Size | tuple[int, ...],
    norm: str,
    eps: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    radius: str = "volume",
) -> torch.Tensor:
    """Perturbations drawn from the ``norm`` ball of radius ``eps`` (one per sample).

    radius ``"volume"``: uniform in the ball. ``"uniform"``: for L2 and L1 a uniformly random
    direction (uniform on the L2 sphere; uniform on the L1 sphere, with random signs) scaled by a
    radius uniform in [0, eps]; for Linf the same as ``"volume"`` (uniform in the cube). In d
    dimensions a volume-uniform radius is ``eps * U^(1/d)``, i.e. ~eps for an image: the point sits on
    the sphere, and an attack started there spends its budget undoing noise.
    """
    if radius not in ("volume", "uniform"):
        raise RobustlabError(f"radius must be 'volume' or 'uniform', got {radius!r}")
    n, dim = shape[0], int(math.prod(shape[1:]))
    kw = dict(device=device, dtype=dtype, generator=generator)
    if norm == "linf":
        return (torch.rand(shape, **kw) * 2 - 1) * eps
    if norm == "l2":
        direction = torch.randn(n, dim, **kw)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        r = torch.rand(n, 1, **kw)
        r = r if radius == "uniform" else r.pow(1.0 / dim)
        return (direction * r * eps).view(shape)
    if norm == "l1":
        # Uniform in the L1 ball: |d| uniform in the simplex {s >= 0, sum s <= 1} (normalized
        # exponentials with one slack coordinate), with independent random signs. Without the slack
        # coordinate |d| is uniform on the face {sum s = 1} (the L1 sphere).
        e = -torch.rand(n, dim + 1, **kw).clamp_min(1e-12).log()
        sign = torch.randint(0, 2, (n, dim), device=device, generator=generator).to(dtype) * 2 - 1
        if radius == "uniform":
            mag = e[:, :dim] / e[:, :dim].sum(dim=1, keepdim=True) * torch.rand(n, 1, **kw)
        else:
            mag = e[:, :dim] / e.sum(dim=1, keepdim=True)
        return (mag * sign * eps).view(shape)
    raise RobustlabError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")


def _pixel_magnitude(delta: torch.Tensor) -> torch.Tensor:
    """(N, H*W) L2 size of each pixel's change over its channels (images (N, C, H, W))."""
    return delta.square().sum(dim=1).flatten(1)


def _project_l0(x_adv: torch.Tensor, x: torch.Tensor, k: int, lower: float, upper: float) -> torch.Tensor:
    """Keep the ``k`` pixels of ``x_adv`` whose change from ``x`` is largest (all channels of a pixel
    together), reset the others to ``x``, clip to the box: the Euclidean projection onto the set of
    images that differ from ``x`` in at most ``k`` pixels."""
    out = x_adv.clamp(lower, upper)
    if x.dim() < 3:
        raise RobustlabError("an l0 threat model needs images (N, C, H, W)")
    size = _pixel_magnitude(out - x)
    if k >= size.shape[1]:
        return out
    keep = torch.zeros_like(size, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, size.topk(k, dim=1).indices, True)
    keep &= size > 0
    return torch.where(keep.view(x.shape[0], 1, *x.shape[2:]), out, x)


def random_pixels(
    x: torch.Tensor, k: int, lower: float, upper: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x`` with ``k`` random pixels per image set to random corners of the colour cube (each channel
    ``lower`` or ``upper``): the start of Sparse-RS."""
    n, c, h, w = x.shape
    scores = torch.rand(n, h * w, device=x.device, generator=generator)
    mask = torch.zeros(n, h * w, dtype=torch.bool, device=x.device)
    if k > 0:
        mask.scatter_(1, scores.topk(min(k, h * w), dim=1).indices, True)
    corners = torch.randint(0, 2, (n, c, h * w), device=x.device, generator=generator).to(x.dtype)
    corners = lower + (upper - lower) * corners
    return torch.where(mask.view(n, 1, h, w), corners.view(n, c, h, w), x)
