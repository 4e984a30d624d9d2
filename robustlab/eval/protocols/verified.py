"""The verified protocol: verified robust accuracy by bound propagation (IBP or CROWN-IBP, see
:mod:`robustlab.certify.ibp`) under a Linf or L2 ball, checked against an attack on the same points.

One task, ``main``. Per sample (``verified_samples``): the clean prediction, whether it is correct,
whether the bound verifies it at eps (only a correct point is verified), the lower bound of its worst
margin ``min_{j != y} z_y - z_j`` over the ball, and whether PGD at eps (the soundness attack, every
claimed success re-verified) leaves it robust. No certificate may lie: a verified point that the
attack breaks is a bug in the bounds, and the run's checks fail on it. The summary gives verified
and empirical robust accuracy side by side, and the gap between them.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from robustlab.attacks.base import create_attack
from robustlab.certify.ibp import CROWN_LAYERS, IBP_LAYERS, METHODS, check_ball, layers_of, verify
from robustlab.errors import RobustlabError
from robustlab.eval import sanity
from robustlab.eval.metrics import VerifiedAccuracy
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, Task
from robustlab.eval.store import ResultsStore
from robustlab.eval.verify import verify_adversarial
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel

_ATTACK_KEY = 0xA77C  # generator key of the soundness attack


class VerifiedProtocol(Protocol):
    name = "verified"
    sample_table = "verified_samples"
    sample_columns = (
        ("label", "INTEGER NOT NULL"),
        ("clean_pred", "INTEGER NOT NULL"),
        ("clean_correct", "INTEGER NOT NULL"),
        ("verified", "INTEGER NOT NULL"),
        ("margin_lower", "REAL NOT NULL"),       # lower bound of min_{j != y} z_y - z_j over the ball
        ("attack_robust", "INTEGER"),            # PGD at eps left it correct (NULL: not attacked)
        ("adv_pred", "INTEGER"),                 # the attack's verified adversarial prediction, if any
    )
    # ranked by verified accuracy; clean accuracy breaks ties; the empirical (PGD) accuracy is shown
    leaderboard_columns = ("verified_accuracy", "clean_accuracy", "empirical_robust_accuracy")

    def __init__(self, method: str = "ibp", eps: float = 0.1, norm: str = "linf", attack_steps: int = 50,
                 attack_restarts: int = 1) -> None:
        if method not in METHODS:
            raise RobustlabError(f"unknown bound method {method!r}; use one of {', '.join(METHODS)}")
        self.method = method
        self.eps, self.norm = check_ball(eps, norm)
        self.threat = ThreatModel(self.norm, self.eps)
        if attack_steps < 0 or attack_restarts < 1:
            raise RobustlabError("the soundness attack needs steps >= 0 (0: no attack) and restarts >= 1")
        self.attack = (create_attack("pgd", self.threat, steps=attack_steps, restarts=attack_restarts)
                       if attack_steps > 0 and self.eps > 0 else None)

    def check_model(self, model: nn.Module) -> None:
        """Raise RobustlabError naming the first layer the method cannot bound (in eval mode, as
        the run evaluates it)."""
        with eval_mode(model):
            layers_of(model, CROWN_LAYERS if self.method == "crown-ibp" else IBP_LAYERS, self.method)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "norm": self.norm, "eps": self.eps,
                "soundness_attack": self.attack.config() if self.attack else None}

    def attack_records(self) -> list[dict[str, Any]]:
        if self.attack is None:
            return []
        return [{**self.attack.config(), "targeted": False, "minimum_norm": False}]

    def plan(self, n: int, image_dim: int) -> list[Task]:
        return [Task("main", "main", n, {"eps": self.eps, "norm": self.norm, "method": self.method})]

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        """Bounds on every sample, then the soundness attack on the correctly classified ones."""
        if ctx.status:
            ctx.status(f"{self.method} bounds", x.shape[0])
        t0 = time.perf_counter()
        with eval_mode(model), torch.no_grad():
            clean_pred = model(x).argmax(dim=1)
            verified, margin = verify(model, x, y, self.eps, self.norm, self.method)
        correct = clean_pred == y
        verified = verified & correct
        costs = [{"seconds": time.perf_counter() - t0, "gradients": 0, "forwards": int(x.shape[0])}]
        robust = correct.clone()
        adv_pred = torch.full_like(y, -1)
        rejected = 0
        idx = correct.nonzero(as_tuple=True)[0]
        if self.attack is not None and idx.numel():
            if ctx.status:
                ctx.status("pgd soundness check", int(idx.numel()))
            t0 = time.perf_counter()
            result = self.attack.run(model, x[idx], y[idx], ctx.generator(_ATTACK_KEY))
            check = verify_adversarial(model, x[idx], result.x_adv, y[idx], self.threat)
            broken = check.ok
            rejected = int((result.success & ~broken).sum())
            robust[idx[broken]] = False
            adv_pred[idx[broken]] = check.pred[broken]
            costs.append({"seconds": time.perf_counter() - t0, "gradients": int(result.gradients.sum()),
                          "forwards": int(result.forwards.sum())})
        attacked = self.attack is not None
        rows = [
            (ctx.start + i, lab, cp, ok, v, m, (r if ok else False) if attacked else None, ap if ap >= 0 else None)
            for i, (lab, cp, ok, v, m, r, ap) in enumerate(zip(
                y.tolist(), clean_pred.tolist(), correct.tolist(), verified.tolist(), margin.tolist(),
                robust.tolist(), adv_pred.tolist()))
        ]
        return BatchOutput(rows, costs, rejected)

    def final_checks(self, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor,
                     info: dict[str, Any], seed: int, device: torch.device) -> list[dict[str, str]]:
        return sanity.mode_verdicts(info)

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Verified and empirical robust accuracy from the stored rows; with ``checks``, the soundness
        verdict (a verified point broken by the attack fails it)."""
        config = run["config"]
        rows = store.sample_rows(cls.sample_table, run["run_id"], "main")
        attacked = config.get("soundness_attack") is not None
        metric = VerifiedAccuracy().update(
            [bool(r["clean_correct"]) for r in rows], [bool(r["verified"]) for r in rows],
            [bool(r["attack_robust"]) if attacked else bool(r["clean_correct"]) for r in rows])
        numbers = metric.compute()
        lied = [r["sample_index"] for r in rows if r["verified"] and attacked and not r["attack_robust"]]
        margins = sorted(r["margin_lower"] for r in rows if r["clean_correct"])
        summary = {
            "protocol": cls.name, "method": config["method"], "threat": {"norm": config["norm"], "eps": config["eps"]},
            **numbers, "soundness_attack": config.get("soundness_attack"),
            "median_margin_lower": margins[len(margins) // 2] if margins else None,
            "lied_samples": lied[:20],
        }
        if not attacked:
            summary["empirical_robust_accuracy"] = summary["gap"] = None
        if checks is not None:
            checks.append(soundness_verdict(metric, lied, attacked, config))
            rejected = sum(b["rejected"] for b in store.batch_stats(run["run_id"]).values())
            if rejected:
                checks.append(sanity.verdict("verification", "warn", f"{rejected} claimed adversarial examples failed "
                                             "re-verification and were not counted"))
        return summary

    @classmethod
    def leaderboard_strength(cls, run: dict[str, Any]) -> list[str]:
        """A run whose certificates PGD contradicted is shown, never ranked; so is one no attack checked."""
        s = run.get("summary") or {}
        if s.get("lies"):
            return [f"PGD broke {s['lies']} verified points (wrong bounds)"]
        if not run["config"].get("soundness_attack"):
            return ["certificates not checked by an attack"]
        return []

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """(dataset, norm, eps, method): verified accuracy under another ball or bound is not comparable."""
        c = run["config"]
        eps = float(f"{float(c['eps']):.9g}")
        return ((run["dataset"], c["norm"], eps, c["method"]),
                f"{run['dataset']} · {c['norm']} eps={eps:g} · verified ({c['method']})")


def soundness_verdict(metric: VerifiedAccuracy, lied: list[int], attacked: bool, config: dict[str, Any]) -> dict[str, str]:
    """Fail when the attack breaks a verified point (the bounds are wrong); say the gap otherwise."""
    if not attacked:
        return sanity.verdict("soundness", "warn", "no attack checked the certificates (attack steps 0)")
    if lied:
        shown = ", ".join(map(str, lied[:10])) + (" ..." if len(lied) > 10 else "")
        return sanity.verdict("soundness", "fail", f"PGD broke {len(lied)} verified points (samples {shown}): the "
                              f"{config['method']} bounds are wrong; this is a bug, please report it")
    c = metric.compute()
    if not metric.n:
        return sanity.verdict("soundness", "pass", "no samples")
    return sanity.verdict("soundness", "pass", f"PGD broke none of the {metric.verified} verified points; verified "
                          f"{100 * c['verified_accuracy']:.2f}% vs empirical {100 * c['empirical_robust_accuracy']:.2f}% "
                          f"(gap {100 * c['gap']:.2f} points)")


def protocol_from_args(args: Any) -> VerifiedProtocol:
    """The protocol a ``robustlab certify --method ibp|crown-ibp --eps E [--norm linf|l2]`` command
    asks for (``args`` from argparse; ``attack_steps`` optional, default 50)."""
    steps = getattr(args, "attack_steps", None)
    return VerifiedProtocol(method=args.method, eps=args.eps, norm=getattr(args, "norm", None) or "linf",
                            attack_steps=50 if steps is None else steps)


def run_from_args(args: Any, model: nn.Module, data: Any, store: ResultsStore, device: torch.device,
                  info: dict[str, Any]) -> Any:
    """``robustlab certify --method ibp|crown-ibp``: the verified run the parsed arguments ask for
    (``seed``, ``batch_size``, ``model``, ``resume`` as every run command has them), as a
    :class:`~robustlab.eval.runner.RunResult`."""
    from robustlab.eval.runner import run  # the runner imports the protocols

    protocol = protocol_from_args(args)
    protocol.check_model(model)  # an unsupported layer is refused before the run is stored
    return run(model, data, protocol, store, seed=getattr(args, "seed", 0),
               batch_size=getattr(args, "batch_size", None) or 128, model_name=getattr(args, "model", "model"),
               model_info=info, resume=bool(getattr(args, "resume", False)), device=device)

