"""Quilting search: the attack image quilting (:class:`robustlab.defenses.quilting.Quilting`) declares as
its own, a search over which neighbour set each patch position falls into.

Quilting replaces each patch of the input by one of the ``neighbors`` library patches nearest it, drawn
at random. What the network sees is therefore decided by a discrete choice per position (which
neighbour set the attacker's patch falls into), and BPDA's gradient through the identity says little
about it: a small move of a patch either changes nothing or swaps its whole neighbour set. This attack
searches that choice directly:

1. Candidates per position: the patch as it is, its box's lower and upper corner (the ball around the
   clean patch, intersected with the image box), and ``candidates`` distinct library patches projected
   onto the box: those nearest it, and among equally near ones (a black patch's box holds every faint
   library patch) those that move the patch most. Each candidate input's neighbour set is computed
   once, as the defense computes it, and with it the mean of that set: what the network sees there on
   average.
2. Greedy swaps ranked by the gradient: at the current choice, the network's loss is averaged over
   ``eot`` draws of the defense's random picks (real quilts, as the defense would build them) and
   differentiated with respect to what it sees; each candidate's gain is that gradient's inner product
   with the change of the mean it would bring. The ``m`` positions with the largest positive gain take
   their best candidate, and the swap is kept only if the loss over the same draws went up: then ``m``
   doubles (at most half the positions), else it halves (at least one).
3. A sample is checked on the defended model itself (its real nearest-patch search and random picks,
   ``eot`` draws) when every draw of the search fooled the network, and stops when every real draw is
   fooled too; at the end it counts as broken when more than half of ``eot`` real draws are fooled.
   The evaluation then re-verifies the point with the defended model's vote.

Where the image is padded to a multiple of the patch size, a candidate for an edge position is built
for the padded patch; the padded pixels copy their edge pixel in the real defense, so that position's
neighbour set can differ from the one the search assumed. Points are judged on the real defended model,
so this can only make the search weaker there, never a number wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from robustlab.attacks.active import Active
from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.losses import LOSSES, get_loss


def candidate_inputs(quilt, library: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch position of each image: candidate input patches (N, P, count + 3, D), all inside the
    box [lo, hi], and each one's neighbour set under the defense (N, P, count + 3, neighbors). Candidate
    0 is the patch of ``x``, 1 and 2 the box's corners, the rest ``count`` distinct library patches
    projected onto the box: ranked by their squared distance to it less 1e-3 times the mean squared
    change of the patch, so the nearest come first and equally near ones move the patch most."""
    cur, box_lo, box_hi = (quilt.to_patches(t) for t in (x, lo, hi))
    n, positions, dim = cur.shape
    rows, rows_lo, rows_hi = cur.reshape(-1, dim), box_lo.reshape(-1, dim), box_hi.reshape(-1, dim)
    distinct = torch.unique(library, dim=0)  # libraries repeat patches (MNIST: half are all black)
    count = min(count, len(distinct))
    chunk = max(1, 2 ** 23 // (len(distinct) * dim))
    chosen = []
    for a, b, c in zip(rows_lo.split(chunk), rows_hi.split(chunk), rows.split(chunk)):
        proj = torch.maximum(torch.minimum(distinct, b.unsqueeze(1)), a.unsqueeze(1))
        outside = (proj - distinct).square().sum(-1)
        moved = (proj - c.unsqueeze(1)).square().sum(-1)
        # nearest the box first; among equally near ones (often many inside it), those that move the patch most
        rank = outside - 1e-3 * moved / dim
        chosen.append(proj.gather(1, rank.topk(count, dim=1, largest=False).indices.unsqueeze(-1).expand(-1, -1, dim)))
    inputs = torch.cat([rows.unsqueeze(1), rows_lo.unsqueeze(1), rows_hi.unsqueeze(1), torch.cat(chosen)], dim=1)
    near = quilt.nearest(inputs.reshape(-1, dim), library)
    return inputs.view(n, positions, -1, dim), near.view(n, positions, inputs.shape[1], -1)


@register_attack
class QuiltingSearch(Attack):
    """Greedy search over each patch position's candidate inputs and their neighbour sets (see the module).

    steps: swap rounds; candidates: library patches per position besides the patch itself and its box's
    corners; eot: random picks per round, for the gradient, the acceptance test and judging a point;
    loss: ``ce``, ``cw`` or ``dlr`` of the network's output.
    """

    name = "quilting-search"
    defense_accessor = "patch_library"
    defense_needed = "one patch-library projection (defense quilting)"
    norms = ("linf",)
    defaults = {"steps": 100, "candidates": 32, "eot": 4, "loss": "ce"}
    choices = {"loss": tuple(LOSSES)}

    def validate(self) -> None:
        super().validate()
        for key in ("steps", "candidates", "eot"):
            if not (isinstance(self.params[key], int) and self.params[key] >= 1):
                raise RobustlabError(f"attack 'quilting-search': {key} must be an integer >= 1, got {self.params[key]!r}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        quilt, network = self.defense_of(model)
        objective = get_loss(p["loss"])
        library = quilt.library(x.device, x.dtype)
        # the bounds the threat model's projection uses, so every point built here is kept as it is
        lo, hi = self.threat.project(x - 1.0, x), self.threat.project(x + 1.0, x)
        with torch.no_grad():
            inputs, near = candidate_inputs(quilt, library, x, lo, hi, p["candidates"])
            means = library[near].mean(3)  # N, P, C, D
        n, positions, _, dim = inputs.shape
        size, eot, k = x.shape[-2:], p["eot"], near.shape[-1]
        gen_device = generator.device if generator is not None else "cpu"

        def at(t: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
            """Rows of a per-candidate tensor (N, P, C, ...) at each position's chosen candidate."""
            index = choice.view(*choice.shape, 1, *([1] * (t.dim() - 3))).expand(-1, -1, 1, *t.shape[3:])
            return t.gather(2, index).squeeze(2)

        def search_loss(choice, picks, y0, grad=False):
            """Loss (N,) and fooled fraction (N,) over the draws ``picks`` (eot, N, P) of real quilts at
            ``choice``; with ``grad`` also the loss's gradient per position (N, P, D)."""
            seen = library[at(near, choice).gather(2, picks.permute(1, 2, 0))].permute(2, 0, 1, 3)
            images = quilt.from_patches(seen.reshape(-1, positions, dim), size).requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = check_logits(network(images), len(images), dense=False)
                labels = y0.repeat(eot)
                loss = objective(out, labels, self.targeted).view(eot, -1)
                fooled = self.is_success(out.detach(), labels).view(eot, -1).to(x.dtype).mean(0)
                if not grad:
                    return loss.mean(0), fooled
                (g,) = torch.autograd.grad(loss.sum(), images)
            return loss.detach().mean(0), fooled, quilt.to_patches(g).view(eot, -1, positions, dim).mean(0)

        def judged(x_cur, y0):
            """Fraction of ``eot`` draws of the defended model itself that ``x_cur`` fools."""
            return sum(self.is_success(self.logits(model, x_cur), y0).to(x.dtype) for _ in range(eot)) / eot

        found = Active(x)
        y0 = y
        choice = torch.zeros(n, positions, dtype=torch.long, device=x.device)
        moves = torch.full((n,), max(1, positions // 4), device=x.device)
        for _ in range(p["steps"]):
            picks = torch.randint(k, (eot, len(y0), positions), generator=generator, device=gen_device).to(x.device)
            loss, fooled, g = search_loss(choice, picks, y0, grad=True)
            found.spend(gradients=eot, forwards=eot)
            if bool((fooled >= 1).any()):
                x_cur = quilt.from_patches(at(inputs, choice), size)
                real = judged(x_cur, y0)
                found.spend(forwards=eot)
                if found.retire(real >= 1, x_cur, real):
                    y0, inputs, near, means, choice, moves = found.kept(y0, inputs, near, means, choice, moves)
                    if not found:
                        break
                    continue  # this round's draws and gradient were for the rows before
            gain = (g.unsqueeze(2) * (means - at(means, choice).unsqueeze(2))).sum(-1)  # N, P, C
            best_gain, best = gain.max(dim=2)
            rank = best_gain.argsort(dim=1, descending=True).argsort(dim=1)
            swap = (rank < moves.unsqueeze(1)) & (best_gain > 0)
            proposal = torch.where(swap, best, choice)
            with torch.no_grad():
                new_loss, _ = search_loss(proposal, picks, y0)
            found.spend(forwards=eot)
            better = new_loss > loss
            choice = torch.where(better.unsqueeze(1), proposal, choice)
            moves = torch.where(better, (moves * 2).clamp(max=max(1, positions // 2)), (moves // 2).clamp(min=1))
        if found:
            x_cur = quilt.from_patches(at(inputs, choice), size)
            real = judged(x_cur, y0)
            found.spend(forwards=eot)
            found.close(x_cur, success=real > 0.5, value=real)
        return found.result()
