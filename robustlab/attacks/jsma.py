"""JSMA, the Jacobian-based saliency map attack (Papernot et al. 2016, "The limitations of deep
learning in adversarial settings"), in the L0 threat model (at most ``eps`` pixels changed).

Each iteration computes two input gradients at the current image: of the target class's logit
(``a``) and of the sum of the other logits (``b``). Over all pairs ``(p, q)`` of distinct features
still in the search domain it picks the one with ``a_p + a_q > 0``, ``b_p + b_q < 0`` and the largest
``(a_p + a_q) |b_p + b_q|`` (the paper's pairwise saliency map, increasing features), raises both by
``theta`` (clipped to the box) and removes them from the domain. A sample stops when it reaches the
target (targeted) or is misclassified (untargeted: the target is the clean image's most likely other
class, and any misclassification counts), when no pair qualifies, or when ``eps`` pixels have changed.
Grayscale and colour images alike: each (channel, pixel) is a feature; a pixel counts once in L0
whatever its channels, and a pair is only taken while the changed pixels stay within ``eps``.

Costs per iteration and active sample: one forward pass and two input gradients (on the same pass);
the pair search holds a (features x features) score matrix per active sample.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.deepfool import top_other_classes
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.threat import L0, norms


@register_attack
class JSMA(Attack):
    """JSMA (L0; targeted or untargeted). theta: the change of a chosen feature (1.0: to the top of
    the box)."""

    name = "jsma"
    norms = (L0,)
    defaults = {"theta": 1.0}

    def validate(self) -> None:
        super().validate()
        if not 0 < self.params["theta"] <= 1:
            raise RobustlabError(f"attack {self.name!r}: theta must be in (0, 1], got {self.params['theta']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        threat, theta = self.threat, self.params["theta"]
        n, dev = x.shape[0], x.device
        d = x[0].numel()
        budget = int(threat.eps)
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        if self.targeted:
            target = y
        else:
            target = top_other_classes(self.logits(model, x), y, 1)[:, 0]
            forwards += 1
        cur = x.clone()
        domain = (x < threat.upper).flatten(1)
        success = torch.zeros(n, dtype=torch.bool, device=dev)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        eye = torch.eye(d, dtype=torch.bool, device=dev)
        while True:
            idx = active.nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                break
            x_req = cur[idx].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = check_logits(model(x_req), idx.numel())
                t = target[idx]
                z_t = logits.gather(1, t.unsqueeze(1)).sum()
                (a,) = torch.autograd.grad(z_t, x_req, retain_graph=True)
                (b,) = torch.autograd.grad(logits.sum() - z_t, x_req)
            forwards[idx] += 1
            logits = logits.detach()
            done = self.is_success(logits, y[idx]) if not self.targeted else logits.argmax(1) == t
            success[idx] = done
            changed = norms(cur[idx] - x[idx], L0)
            stop = done | (changed + 2 > budget)
            go = ~stop
            if not bool(go.any()):
                active[idx] = False
                break
            active[idx[stop]] = False
            rows = idx[go]
            grads[rows] += 2
            a, b, dom = a[go].flatten(1), b[go].flatten(1), domain[rows]
            alpha = a.unsqueeze(2) + a.unsqueeze(1)
            beta = b.unsqueeze(2) + b.unsqueeze(1)
            valid = dom.unsqueeze(2) & dom.unsqueeze(1) & ~eye & (alpha > 0) & (beta < 0)
            score = torch.where(valid, alpha * -beta, torch.full_like(alpha, -1.0))
            best, flat = score.flatten(1).max(dim=1)
            ok = best > 0
            active[rows[~ok]] = False
            rows, flat = rows[ok], flat[ok]
            if rows.numel() == 0:
                continue
            p, q = flat // d, flat % d
            view = cur.view(n, -1)
            for f in (p, q):
                view[rows, f] = (view[rows, f] + theta).clamp(threat.lower, threat.upper)
                domain[rows, f] = False
        return AttackResult(cur, success, grads, forwards)
