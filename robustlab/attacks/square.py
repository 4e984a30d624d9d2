"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient
black-box adversarial attack via random search"), Linf and L2.

A score-based attack: it sees only the model's logits, never a gradient, so gradient masking does not
stop it. Random search over localized square-shaped updates at the boundary of the ball; an update is
kept when it increases the margin loss ``max_{j != y} z_j - z_y``. The side of the squares is
``sqrt(p * H * W)`` pixels, where the fraction ``p`` starts at ``p_init`` and is halved after
iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query budget, rescaled to the
budget at hand (``rescale_schedule``, the default) or, as AutoAttack's standard protocol runs it with
5000 queries, not (see ``square_fraction``).

Every sample draws its own square position, signs and pattern, so a sample's result does not depend
on the other samples of the batch. Queries are forward passes and are counted per sample exactly: the
initial point costs one, every iteration one more. A sample leaves the batch at the first query that
misclassifies it, and that point is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robustlab.attacks.active import Active
from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.losses import cw_margin
from robustlab.threat import norms

# Iterations (of a 10,000-query budget) after which the square-size fraction p is halved.
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(i: int, queries: int, p_init: float, rescale: bool = True) -> float:
    """The fraction ``p`` of the image a square covers at iteration ``i`` (0-based, counting the
    queries after the initial one) of a run with a budget of ``queries``: ``p_init`` halved once for
    every point of ``SCHEDULE`` that ``i * 10000 / queries`` (``i`` itself without ``rescale``) has
    passed."""
    it = (i * 10000) // queries if rescale else i
    return p_init / 2 ** sum(it > t for t in SCHEDULE)


def square_sizes(queries: int, p_init: float, h: int, w: int, norm: str, rescale: bool = True) -> list[int]:
    """Side of the square, in pixels, at every iteration of a run (``queries - 1`` iterations).

    linf: ``round(sqrt(p * h * w))``, at least 1; l2: at least 3 and odd (the L2 update pattern is
    centred). Never larger than the image.
    """
    out = []
    cap = min(h, w)
    for i in range(max(queries - 1, 0)):
        s = int(round(math.sqrt(square_fraction(i, queries, p_init, rescale) * h * w)))
        if norm == "l2":
            s = max(s, 3)
            s += 1 - s % 2
        out.append(max(1, min(s, cap)))
    return out


def _rectangle_pattern(a: int, b: int) -> torch.Tensor:
    """An a x b block of nested rectangles around the centre: a pixel at Chebyshev distance d from
    the centre gets ``sum_{k=d}^{K-1} 1 / (k + 1)^2`` (K rings), so the values peak at the centre."""
    rings = max(a // 2 + 1, b // 2 + 1)
    tail = torch.tensor([1.0 / (k + 1) ** 2 for k in range(rings)], dtype=torch.float64).flip(0).cumsum(0).flip(0)
    r = (torch.arange(a) - a // 2).abs().view(-1, 1)
    c = (torch.arange(b) - b // 2).abs().view(1, -1)
    return tail[torch.maximum(r, c).clamp(max=rings - 1)]


def square_pattern(s: int) -> torch.Tensor:
    """The L2 update of an s x s square (float64, unit L2 norm): the upper half a block of nested
    rectangles, the lower half the same with the opposite sign."""
    out = torch.zeros(s, s, dtype=torch.float64)
    if s // 2:
        out[: s // 2] = _rectangle_pattern(s // 2, s)
    out[s // 2 :] = -_rectangle_pattern(s - s // 2, s)
    return out / out.norm()


class _Tables:
    """Index tables for squares of side s in (C, H, W) images flattened to C*H*W, built once per side
    and run: the flat offsets of a square's C*s*s coordinates from its top-left pixel, the channel,
    row and column (inside the square) of each, and the L2 pattern and its transpose, flattened."""

    def __init__(self, c: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> None:
        self.c, self.h, self.w, self.device, self.dtype = c, h, w, device, dtype
        self._cache: dict[int, tuple] = {}

    def get(self, s: int) -> tuple:
        tables = self._cache.get(s)
        if tables is None:
            k = torch.arange(self.c * s * s)
            chan, row, col = k // (s * s), (k % (s * s)) // s, k % s
            offsets = chan * (self.h * self.w) + row * self.w + col
            pat = square_pattern(s)
            pats = torch.stack([pat.flatten(), pat.t().flatten()]).to(self.dtype)
            tables = tuple(t.to(self.device) for t in (offsets, chan, row, col, pats))
            self._cache[s] = tables
        return tables


@register_attack
class Square(Attack):
    """Square Attack, score-based random search (Linf, L2).

    queries: forward passes per sample and run, the initial point included; p_init: the fraction of
    the image the first squares cover (0.8 as published; the schedule halves it over the run);
    restarts: runs from new random initial points, each only on samples not yet broken;
    rescale_schedule: stretch the square-size schedule (defined for 10,000 queries) to ``queries``
    (False: use it as defined, as the reference AutoAttack protocol does with its 5000 queries).
    """

    name = "square"
    kind = "score-based"
    norms = ("linf", "l2")
    defaults = {"queries": 5000, "p_init": 0.8, "restarts": 1, "rescale_schedule": True}

    def validate(self) -> None:
        super().validate()
        if self.params["queries"] < 1:
            raise RobustlabError(f"attack 'square': queries must be >= 1, got {self.params['queries']}")
        if not 0.0 < self.params["p_init"] <= 1.0:
            raise RobustlabError(f"attack 'square': p_init must be in (0, 1], got {self.params['p_init']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        found = Active(x)
        with torch.no_grad():
            if self.threat.eps == 0:
                # Nothing to search: one query of the clean images.
                found.success = self.is_success(check_logits(model(x), x.shape[0]), y)
                found.forwards += 1
                return found.result()
            for _ in range(self.params["restarts"]):
                idx = found.unbroken()
                if idx.numel() == 0:
                    break
                found.merge(idx, self._run(model, x[idx], y[idx], generator))
        return found.result()

    # ------------------------------------------------------------------ one run

    def _run(self, model: nn.Module, x0: torch.Tensor, y0: torch.Tensor, gen: torch.Generator | None) -> Active:
        """One run on the batch: per sample the point (first success, else the best margin),
        success, queries spent and the best margin.

        The images are handled flat, (m, C*H*W). A square touches only C*s*s coordinates, so each
        iteration gathers them, computes the update there, and scatters it into a copy of the best
        point held in a buffer allocated once: the only full-size work per query is that copy (and,
        for L2, the rescaling), besides the model's forward pass.
        """
        threat, queries = self.threat, self.params["queries"]
        m, c, h, w = x0.shape
        d = c * h * w
        dev = x0.device
        eps = threat.eps
        l2 = threat.norm == "l2"
        targeted = self.targeted

        x0f = x0.reshape(m, d)
        run = Active(x0f)  # flat points
        buf_x = torch.empty_like(x0f)  # the query, rows [:m] in use
        buf_d = torch.empty_like(x0f) if l2 else None  # L2: its perturbation
        if l2:
            xbf = torch.empty_like(x0f)
            dbf = torch.empty_like(x0f)
            norm_best = self._l2_place(x0f, self._init_l2(x0, gen).reshape(m, d), xbf, dbf)
            x_plus = x_minus = None
        else:
            # Every coordinate a Linf square sets takes one of these two values (exactly inside the ball).
            x_plus = threat.project(x0f + eps, x0f)
            x_minus = threat.project(x0f - eps, x0f)
            stripes = torch.rand(m, c, 1, w, generator=gen, device=dev) < 0.5
            xbf = torch.where(stripes, x_plus.view(m, c, h, w), x_minus.view(m, c, h, w)).reshape(m, d)
            dbf = norm_best = None
        logits = check_logits(model(xbf.view(m, c, h, w)), m)
        run.spend(forwards=1)
        margin_best = cw_margin(logits, y0, targeted)
        done = self.is_success(logits, y0)
        xn = xbf  # the latest query
        dn = dbf if l2 else None  # L2: its perturbation

        sizes = square_sizes(queries, self.params["p_init"], h, w, threat.norm, self.params["rescale_schedule"])
        tables = _Tables(c, h, w, dev, x0.dtype)
        n_rand = 5 + c if l2 else 3 + c
        for q in range(1, queries + 1):  # q: queries spent so far by each sample still in the batch
            if q > 1:
                s = sizes[q - 2]
                u = torch.rand(m, n_rand, generator=gen, device=dev)
                xn = buf_x[:m]
                if l2:
                    dn = buf_d[:m]
                    norm_new = self._l2_step(x0f, xbf, dbf, norm_best, tables.get(s), s, u, xn, dn, h, w)
                else:
                    self._linf_step(xbf, x_plus, x_minus, tables.get(s), s, u, xn, h, w)
                logits = model(xn.view(m, c, h, w))
                run.spend(forwards=1)
                margin = cw_margin(logits, y0, targeted)
                better = margin > margin_best
                rows = better.nonzero(as_tuple=True)[0]
                margin_best = torch.where(better, margin, margin_best)
                xbf[rows] = xn[rows]
                if l2:
                    dbf[rows] = dn[rows]
                    norm_best[rows] = norm_new[rows]
                done = self.is_success(logits, y0)
            if run.retire(done, xn, margin_best):
                m = len(run)
                if m == 0:
                    break
                x0f, y0, margin_best, xbf, dbf, norm_best, x_plus, x_minus = run.kept(
                    x0f, y0, margin_best, xbf, dbf, norm_best, x_plus, x_minus)
        if run:
            run.close(xbf, value=margin_best)
        run.x_adv = run.x_adv.view(-1, c, h, w)
        return run

    # ------------------------------------------------------------------ Linf

    @staticmethod
    def _windows(u: torch.Tensor, col: int, s: int, h: int, w: int, offsets: torch.Tensor) -> tuple:
        """Per sample a uniformly placed s x s window (top-left row/column from ``u[:, col:col+2]``):
        (top row, left column, flat indices of its C*s*s coordinates)."""
        vh = (u[:, col] * (h - s + 1)).long()
        vw = (u[:, col + 1] * (w - s + 1)).long()
        return vh, vw, (vh * w + vw).unsqueeze(1) + offsets

    def _linf_step(self, xbf, x_plus, x_minus, table, s, u, xn, h, w) -> None:
        """A square of side s at a random position: each channel of it moves to +eps or -eps (per
        sample and channel). Writes the query into ``xn``."""
        offsets, chan = table[0], table[1]
        c = u.shape[1] - 3
        _, _, idx = self._windows(u, 0, s, h, w, offsets)
        up = u[:, 3:] < 0.5  # (m, c)
        plus_w, minus_w, best_w = x_plus.gather(1, idx), x_minus.gather(1, idx), xbf.gather(1, idx)
        new_w = torch.where(up[:, chan], plus_w, minus_w)
        # A square that changes nothing would waste the query: then flip the signs of a random
        # non-empty subset of its channels (every other sign pattern equally likely).
        same = (new_w == best_w).all(dim=1, keepdim=True)
        if c == 1:
            flip = same
        else:
            subset = (u[:, 2] * (2**c - 1)).long() + 1
            bits = 2 ** torch.arange(c, device=u.device)
            flip = ((subset.unsqueeze(1) & bits) > 0)[:, chan] & same
        new_w = torch.where(up[:, chan] ^ flip, plus_w, minus_w)
        xn.copy_(xbf)
        xn.scatter_(1, idx, new_w)

    # ------------------------------------------------------------------ L2

    def _init_l2(self, x0: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """The initial L2 perturbation (unscaled): a grid of squares of side H/5, each with the L2
        pattern (randomly transposed) times a random sign per channel."""
        m, c, h, w = x0.shape
        dev, dtype = x0.device, x0.dtype
        s = max(min(h, w) // 5, 1)
        th, tw = h // s, w // s
        pat = square_pattern(s).to(dev, dtype)
        both = torch.stack([pat, pat.t()])
        transpose = (torch.rand(m, th, tw, generator=gen, device=dev) < 0.5).long()
        sign = torch.where(torch.rand(m, c, th, tw, generator=gen, device=dev) < 0.5, -1.0, 1.0).to(dtype)
        grid = both[transpose].permute(0, 1, 3, 2, 4).reshape(m, 1, th * s, tw * s)
        sign = sign.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
        delta = torch.zeros_like(x0)
        r0, c0 = (h - th * s) // 2, (w - tw * s) // 2
        delta[:, :, r0 : r0 + th * s, c0 : c0 + tw * s] = grid * sign
        return delta

    def _l2_place(self, x0f, delta, xn, dn) -> torch.Tensor:
        """Writes into ``xn`` the point x0 + delta rescaled to L2 norm eps and clipped to the box, and
        into ``dn`` its realized perturbation (``delta`` may be ``dn``). Returns the realized norms.

        The target norm is eps less a relative 1e-5 (nothing, for the search), so that rounding (in
        x0 + delta and in the float32 norms) almost never leaves the point outside the ball; the rare
        rows it does leave a hair outside are projected exactly."""
        threat = self.threat
        scale = (threat.eps * (1.0 - 1e-5)) / torch.linalg.vector_norm(delta, dim=1).clamp_min(1e-12)
        torch.addcmul(x0f, delta, scale.unsqueeze(1), out=xn)
        xn.clamp_(threat.lower, threat.upper)
        torch.sub(xn, x0f, out=dn)
        norm = norms(dn, "l2")
        bad = (norm > threat.eps).nonzero(as_tuple=True)[0]
        if bad.numel():
            fixed = threat.project(xn[bad], x0f[bad])
            xn[bad] = fixed
            dn[bad] = fixed - x0f[bad]
            norm[bad] = norms(dn[bad], "l2")
        return norm

    def _l2_step(self, x0f, xbf, dbf, norm_best, table, s, u, xn, dn, h, w) -> torch.Tensor:
        """The L2 update: in a first square, a new pattern (random sign per channel) plus the old
        perturbation there (normalized per channel), scaled to take over the perturbation of both
        squares and the unused budget; a second square is zeroed; the whole perturbation is then
        rescaled to norm eps. Writes the query into ``xn`` and its perturbation into ``dn``; returns
        its norm."""
        offsets, chan, rloc, cloc, pats = table
        m, c = u.shape[0], u.shape[1] - 5
        eps = self.threat.eps
        ss = s * s
        vh1, vw1, idx1 = self._windows(u, 0, s, h, w, offsets)
        vh2, vw2, idx2 = self._windows(u, 2, s, h, w, offsets)
        d1, d2 = dbf.gather(1, idx1), dbf.gather(1, idx2)
        # Coordinates of square 2 that also lie in square 1 (counted once in the union).
        rr = (vh2 - vh1).unsqueeze(1) + rloc
        cc = (vw2 - vw1).unsqueeze(1) + cloc
        shared = (rr >= 0) & (rr < s) & (cc >= 0) & (cc < s)
        union2 = d1.square().sum(dim=1) + d2.square().masked_fill(shared, 0.0).sum(dim=1)
        d1 = d1.view(m, c, ss)
        win1 = d1.square().sum(dim=2, keepdim=True).sqrt()
        pattern = pats[(u[:, 4] < 0.5).long()].unsqueeze(1)  # (m, 1, ss), transposed or not
        sign = torch.where(u[:, 5:] < 0.5, -1.0, 1.0).to(d1.dtype).unsqueeze(2)
        new = pattern * sign + d1 / (win1 + 1e-12)
        budget = ((eps**2 - norm_best.square()).clamp_min(0.0) / c + union2).sqrt()
        new = new * (budget.view(m, 1, 1) / (new.square().sum(dim=2, keepdim=True).sqrt() + 1e-12))
        dn.copy_(dbf)
        dn.scatter_(1, idx2, 0.0)
        dn.scatter_(1, idx1, new.view(m, -1))
        return self._l2_place(x0f, dn, xn, dn)
