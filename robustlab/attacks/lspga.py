"""LS-PGA, logit-space projected gradient ascent (Buckman, Roy, Raffel & Goodfellow, "Thermometer
Encoding: One Hot Way To Resist Adversarial Examples", ICLR 2018): the attack on a model behind a
discrete input encoding, which the thermometer defense declares as its own.

Each pixel of a discretizing defense takes one of a few codes (its *bucket*); inside the Linf ball a
pixel can reach a contiguous range of buckets. LS-PGA keeps, per pixel, logits over the buckets,
masked to the reachable ones; the network sees the expected code under their softmax at inverse
temperature ``1 / temperature``, multiplied by ``anneal`` after every step, so the distribution
hardens towards one bucket per pixel. The logits ascend the loss of the network's output; the
attacked point is, at every step, the image whose pixels take the most likely bucket, checked on the
defended model itself (its real encoding), and each sample keeps its first misclassified one.

Buckman et al. step by the raw gradient times ``alpha``; here the step is ``alpha`` times its sign
(per logit), so one step size suits every loss and model scale (CE near saturation has tiny
gradients). Logits start from a standard normal draw (each restart a new one).

The model must give its encoding: a callable ``discrete_encoding()`` returning ``(encoding,
network)`` (:meth:`robustlab.defenses.DefendedModel.discrete_encoding`), where ``encoding`` has
``levels`` and the bucket methods ``buckets(x)``, ``relax(probs)``, ``bucket_value(b, lo, hi)``.
"""

from __future__ import annotations

import torch
from torch import nn

from robustlab.attacks.active import Active
from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.losses import LOSSES, get_loss


@register_attack
class LSPGA(Attack):
    """Logit-space ascent over each pixel's reachable buckets (see the module).

    steps: ascent steps per restart; alpha: the step on the bucket logits (times the gradient's
    sign); temperature: the softmax's starting temperature; anneal: the inverse temperature's factor
    per step (> 1 hardens the distribution); restarts: runs from new random logits on the samples not
    yet broken; loss: ``ce``, ``cw`` or ``dlr`` of the network's output on the relaxed code.
    """

    name = "ls-pga"
    defense_accessor = "discrete_encoding"
    defense_needed = "one discrete input encoding (defense thermometer)"
    norms = ("linf",)
    defaults = {"steps": 100, "alpha": 0.5, "temperature": 1.0, "anneal": 1.05, "restarts": 1, "loss": "ce"}
    choices = {"loss": tuple(LOSSES)}

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("alpha", "temperature"):
            if not (isinstance(p[key], (int, float)) and p[key] > 0):
                raise RobustlabError(f"attack 'ls-pga': {key} must be > 0, got {p[key]!r}")
        if not (isinstance(p["anneal"], (int, float)) and p["anneal"] >= 1):
            raise RobustlabError(f"attack 'ls-pga': anneal must be >= 1, got {p['anneal']!r}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        encoding, network = self.defense_of(model)
        objective = get_loss(p["loss"])
        # the bounds the threat model's projection uses, so every point built here is kept as it is
        lo_all, hi_all = self.threat.project(x - 1.0, x), self.threat.project(x + 1.0, x)
        buckets = encoding.levels + 1
        index = torch.arange(buckets, device=x.device).view(1, 1, buckets, 1, 1)
        reach_all = (index >= encoding.buckets(lo_all).unsqueeze(2)) & (index <= encoding.buckets(hi_all).unsqueeze(2))
        found = Active(x)
        for _ in range(p["restarts"]):
            if not found.restart():
                break
            y0, lo, hi, reach = y[found.pos], lo_all[found.pos], hi_all[found.pos], reach_all[found.pos]
            shape = (*x.shape[:2], buckets, *x.shape[2:])
            u = torch.randn((len(found), *shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
            inverse = 1.0 / p["temperature"]
            for _step in range(p["steps"]):
                x_cur = encoding.bucket_value(u.masked_fill(~reach, -torch.inf).argmax(dim=2), lo, hi)
                found.spend(forwards=1)
                if found.retire(self.is_success(self.logits(model, x_cur), y0), x_cur):
                    y0, lo, hi, reach, u = found.kept(y0, lo, hi, reach, u)
                    if not found:
                        break
                u_req = u.detach().requires_grad_(True)
                with torch.enable_grad():
                    probs = torch.softmax((u_req * inverse).masked_fill(~reach, -torch.inf), dim=2)
                    out = check_logits(network(encoding.relax(probs)), u.shape[0], dense=False)
                    (g,) = torch.autograd.grad(objective(out, y0, self.targeted).sum(), u_req)
                found.spend(gradients=1, forwards=1)
                u = u + p["alpha"] * g.sign()
                inverse *= p["anneal"]
            if not found:
                break
            x_cur = encoding.bucket_value(u.masked_fill(~reach, -torch.inf).argmax(dim=2), lo, hi)
            found.spend(forwards=1)
            found.close(x_cur, success=self.is_success(self.logits(model, x_cur), y0))
        return found.result()
