"""Peer adapters: robustlab attack name -> the same algorithm in foolbox, torchattacks or ART, built
from one row's budget (the parameters robustlab's attack gets), as a function the benchmarks call.

One table, ``PEERS``: ``PEERS[attack]`` maps a peer label (``"foolbox"``, ``"torchattacks"``,
``"art"``) to a builder ``build(model, row) -> fn``. A :class:`Row` carries the robustlab attack's
name, its parameters and its threat model (an Lp :class:`~robustlab.threat.ThreatModel` or one of
:mod:`robustlab.threat_kinds`), the seed and the data set's shape. What ``fn`` does depends on the
row's mode:

- ``fixed``, ``min``, ``sparse``: ``fn(x, y) -> x_adv`` (per image; the caller judges every point
  afresh);
- ``spatial``: ``fn(x, y) -> x_adv`` too (the peer's own transformation of each image);
- ``universal``: ``fn(fit_x, fit_y) -> delta`` (C, H, W), applied by the caller to evaluation images;
- ``patch``: ``fn(fit_x, fit_y) -> patch`` (C, s, s), placed by the caller exactly as robustlab's.

An attack missing from the table has no peer the matrix can run. Peers are imported lazily: a
benchmark that never builds an ART adapter does not need ART installed (``pip install
adversarial-robustness-toolbox foolbox torchattacks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PeerFn = Callable[..., torch.Tensor]


@dataclass
class Row:
    """One comparison: robustlab's ``attack`` with ``params`` on ``threat``; ``mode`` says what is
    compared (see the module docstring); ``peer_params`` are extra peer-only settings."""

    attack: str
    mode: str
    params: dict[str, Any]
    threat: Any
    seed: int = 0
    image_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    peer_params: dict[str, Any] = field(default_factory=dict)


_TA_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def _foolbox(model: nn.Module, attack, eps: float | None) -> PeerFn:
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, clipped, _ = attack(fmodel, x, y, epsilons=eps)
        return clipped

    return run


def _art_classifier(model: nn.Module, row: Row):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=row.image_shape,
                             nb_classes=row.num_classes, clip_values=(0.0, 1.0), device_type="cpu")


def _ta(attack) -> PeerFn:
    return lambda x, y: attack(x, y)


def _seeded(seed: int, fn: PeerFn) -> PeerFn:
    """Seed the global generators (numpy and torch) before each call: the peers draw from them."""

    def run(*args):
        np.random.seed(seed)
        torch.manual_seed(seed)
        return fn(*args)

    return run


# ---------------------------------------------------------------------- builders by attack


def _pgd_ta(model, row):
    import torchattacks

    p, t = row.params, row.threat
    cls = {"linf": torchattacks.PGD, "l2": torchattacks.PGDL2}[t.norm]
    alpha = p.get("alpha") or (2.5 * t.eps / p["steps"])
    return _ta(cls(model, eps=t.eps, alpha=alpha, steps=p["steps"], random_start=p.get("random_start", True)))


def _pgd_fb(model, row):
    import foolbox as fb

    p, t = row.params, row.threat
    cls = {"linf": fb.attacks.LinfPGD, "l2": fb.attacks.L2PGD}[t.norm]
    alpha = p.get("alpha") or (2.5 * t.eps / p["steps"])
    return _foolbox(model, cls(abs_stepsize=alpha, steps=p["steps"], random_start=p.get("random_start", True)), t.eps)


def _fgsm_ta(model, row):
    import torchattacks

    return _ta(torchattacks.FGSM(model, eps=row.threat.eps))


def _bim_ta(model, row):
    import torchattacks

    p, t = row.params, row.threat
    return _ta(torchattacks.BIM(model, eps=t.eps, alpha=p.get("alpha") or t.eps / p["steps"], steps=p["steps"]))


def _mifgsm_ta(model, row):
    import torchattacks

    p, t = row.params, row.threat
    return _ta(torchattacks.MIFGSM(model, eps=t.eps, alpha=p.get("alpha") or t.eps / p["steps"], steps=p["steps"],
                                   decay=p.get("decay", 1.0)))


def _apgd_ta(loss: str, targeted: bool = False):
    def build(model, row):
        import torchattacks

        p, t = row.params, row.threat
        if targeted:
            a = torchattacks.APGDT(model, norm=_TA_NORM[t.norm], eps=t.eps, steps=p["steps"],
                                   n_restarts=p.get("restarts", 1), seed=row.seed,
                                   n_classes=row.num_classes)
        else:
            a = torchattacks.APGD(model, norm=_TA_NORM[t.norm], eps=t.eps, steps=p["steps"],
                                  n_restarts=p.get("restarts", 1), seed=row.seed, loss=loss)
        return _ta(a)

    return build


def _square_ta(model, row):
    import torchattacks

    p, t = row.params, row.threat
    return _ta(torchattacks.Square(model, norm=_TA_NORM[t.norm], eps=t.eps, n_queries=p["queries"],
                                   n_restarts=p.get("restarts", 1), p_init=p.get("p_init", 0.8), seed=row.seed,
                                   loss="margin", resc_schedule=p.get("rescale_schedule", True)))


def _fab_ta(targeted: bool, minimum: bool):
    def build(model, row):
        import torchattacks

        p, t = row.params, row.threat
        eps = 1e6 if minimum else t.eps
        return _ta(torchattacks.FAB(model, norm=_TA_NORM[t.norm], eps=eps, steps=p["steps"],
                                    n_restarts=p.get("restarts", 1), seed=row.seed, multi_targeted=targeted,
                                    n_classes=row.num_classes))

    return build


def _deepfool_fb(model, row):
    import foolbox as fb

    p, t = row.params, row.threat
    cls = fb.attacks.L2DeepFoolAttack if t.norm == "l2" else fb.attacks.LinfDeepFoolAttack
    return _foolbox(model, cls(steps=p.get("steps", 50), candidates=p.get("candidates", 10),
                               overshoot=p.get("overshoot", 0.02), loss="logits"), None)


def _cw_fb(model, row):
    import foolbox as fb

    p = row.params
    return _foolbox(model, fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=p["binary_steps"], steps=p["steps"], stepsize=p["lr"], confidence=0.0,
        initial_const=p["initial_const"], abort_early=True), None)


def _ead_fb(model, row):
    import foolbox as fb

    p = row.params
    return _foolbox(model, fb.attacks.EADAttack(
        binary_search_steps=p["binary_steps"], steps=p["steps"], initial_stepsize=p["lr"], confidence=0.0,
        initial_const=p["initial_const"], regularization=p["beta"], decision_rule="L1", abort_early=True), None)


def _hsj_fb(model, row):
    import foolbox as fb

    p, t = row.params, row.threat
    # foolbox counts iterations; its own budget per iteration is ~ init_evals * sqrt(t) + searches.
    return _foolbox(model, fb.attacks.HopSkipJumpAttack(
        steps=row.peer_params["steps"], initial_gradient_eval_steps=p.get("init_evals", 100),
        max_gradient_eval_steps=p.get("max_evals", 10000), gamma=p.get("gamma", 1.0),
        constraint={"l2": "l2", "linf": "linf"}[t.norm]), None)


def _boundary_fb(model, row):
    import foolbox as fb

    p = row.params
    return _foolbox(model, fb.attacks.BoundaryAttack(
        steps=row.peer_params["steps"], spherical_step=p.get("spherical_step", 0.01),
        source_step=p.get("source_step", 0.01), step_adaptation=p.get("step_adaptation", 1.5),
        update_stats_every_k=p.get("stats_every", 10), source_step_convergance=p.get("convergence", 1e-7)), None)


def _bb_fb(model, row):
    import foolbox as fb

    p, t = row.params, row.threat
    cls = {"l2": fb.attacks.L2BrendelBethgeAttack, "linf": fb.attacks.LinfinityBrendelBethgeAttack,
           "l1": fb.attacks.L1BrendelBethgeAttack, "l0": fb.attacks.L0BrendelBethgeAttack}[t.norm]
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # foolbox 3 sizes the trust region by the size of the whole batch (np.prod(x.shape), batch
        # included), the paper and robustlab by one image: lr / N gives foolbox the same region.
        attack = cls(steps=p.get("steps", 1000), lr=p.get("lr", 1e-3) / len(x), lr_decay=p.get("lr_decay", 0.5),
                     lr_num_decay=p.get("lr_num_decay", 20), momentum=p.get("momentum", 0.8),
                     binary_search_steps=p.get("binary_steps", 10))
        _, clipped, _ = attack(fmodel, x, y, epsilons=None)
        return clipped

    return run


def _fmn_fb(model, row):
    import foolbox as fb

    p, t = row.params, row.threat
    cls = {"l0": fb.attacks.L0FMNAttack, "l1": fb.attacks.L1FMNAttack, "l2": fb.attacks.L2FMNAttack,
           "linf": fb.attacks.LInfFMNAttack}[t.norm]
    return _foolbox(model, cls(steps=p.get("steps", 100)), None)


def _ddn_fb(model, row):
    import foolbox as fb

    return _foolbox(model, fb.attacks.DDNAttack(steps=row.params.get("steps", 100)), None)


def _spsa_ta(model, row):
    import torchattacks

    p, t = row.params, row.threat
    return _ta(torchattacks.SPSA(model, eps=t.eps, delta=p.get("delta", 0.01), lr=p.get("lr", 0.01),
                                 nb_iter=p["steps"], nb_sample=p.get("samples", 128), max_batch_size=64))


def _onepixel_ta(model, row):
    import torchattacks

    p = row.params
    return _ta(torchattacks.OnePixel(model, pixels=p["pixels"], steps=p["steps"], popsize=p["popsize"],
                                     inf_batch=256))


def _pixle_ta(model, row):
    import torchattacks

    p = row.params
    return _ta(torchattacks.Pixle(model, x_dimensions=tuple(p["x_dimensions"]), y_dimensions=tuple(p["y_dimensions"]),
                                  restarts=p["restarts"], max_iterations=p["iterations"]))


def _jsma_ta(model, row):
    import torchattacks

    p = row.params
    return _ta(torchattacks.JSMA(model, theta=p.get("theta", 1.0), gamma=p.get("gamma", 0.1)))


def _jsma_art(model, row):
    from art.attacks.evasion import SaliencyMapMethod

    p = row.params
    # ART aims each point at a random other class (numpy's global generator, seeded by build_peer)
    # and raises the two features with the largest target gradient per step (no pairwise map).
    attack = SaliencyMapMethod(_art_classifier(model, row), theta=p.get("theta", 1.0), gamma=p.get("gamma", 0.1),
                               batch_size=256, verbose=False)
    return lambda x, y: torch.from_numpy(attack.generate(x.numpy()))


def _uap_art(model, row):
    from art.attacks.evasion import UniversalPerturbation

    p, t = row.params, row.threat
    clf = _art_classifier(model, row)
    attack = UniversalPerturbation(
        clf, attacker=row.peer_params.get("attacker", "fgsm"),
        attacker_params=row.peer_params.get("attacker_params", {"eps": t.eps / 10, "norm": np.inf if t.base_norm == "linf" else 2}),
        delta=1.0 - p.get("target_fooling", 1.0) if p.get("target_fooling", 1.0) < 1 else 0.0,
        max_iter=p["epochs"], eps=t.eps, norm=np.inf if t.base_norm == "linf" else 2, batch_size=p.get("batch_size", 32),
        verbose=False)

    def run(fit_x: torch.Tensor, fit_y: torch.Tensor) -> torch.Tensor:
        attack.generate(fit_x.numpy(), y=F.one_hot(fit_y, row.num_classes).numpy())
        return torch.from_numpy(np.asarray(attack.noise, dtype=np.float32)).reshape(fit_x.shape[1:])

    return run


def _patch_art(model, row):
    from art.attacks.evasion import AdversarialPatchPyTorch

    p, t = row.params, row.threat
    c, h, w = row.image_shape
    clf = _art_classifier(model, row)
    attack = AdversarialPatchPyTorch(
        clf, rotation_max=0.0, scale_min=t.size / min(h, w), scale_max=t.size / min(h, w), learning_rate=p["lr"],
        max_iter=p["epochs"], batch_size=p["batch_size"], patch_shape=(c, t.size, t.size), patch_type="square",
        optimizer="pgd", targeted=False, verbose=False)

    def run(fit_x: torch.Tensor, fit_y: torch.Tensor) -> torch.Tensor:
        patch, _ = attack.generate(fit_x.numpy(), y=F.one_hot(fit_y, row.num_classes).numpy())
        return torch.from_numpy(np.asarray(patch, dtype=np.float32)).reshape(c, t.size, t.size)

    return run


def _spatial_art(model, row):
    from art.attacks.evasion import SpatialTransformation

    p, t = row.params, row.threat
    c, h, w = row.image_shape
    clf = _art_classifier(model, row)
    attack = SpatialTransformation(
        clf, max_translation=100.0 * t.max_shift / min(h, w), num_translations=p.get("shifts", 5),
        max_rotation=t.max_angle, num_rotations=p.get("angles", 31), verbose=False)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(attack.generate(x.numpy(), y=F.one_hot(y, row.num_classes).numpy()))

    return run


PEERS: dict[str, dict[str, Callable[[nn.Module, Row], PeerFn]]] = {
    "fgsm": {"torchattacks": _fgsm_ta},
    "bim": {"torchattacks": _bim_ta},
    "pgd": {"torchattacks": _pgd_ta, "foolbox": _pgd_fb},
    "mifgsm": {"torchattacks": _mifgsm_ta},
    "apgd-ce": {"torchattacks": _apgd_ta("ce")},
    "apgd-dlr": {"torchattacks": _apgd_ta("dlr")},
    "apgd-t": {"torchattacks": _apgd_ta("dlr", targeted=True)},
    "square": {"torchattacks": _square_ta},
    "fab": {"torchattacks": _fab_ta(False, False)},
    "fab-t": {"torchattacks": _fab_ta(True, False)},
    "fab-min": {"torchattacks": _fab_ta(False, True)},
    "deepfool": {"foolbox": _deepfool_fb},
    "cw": {"foolbox": _cw_fb},
    "ead": {"foolbox": _ead_fb},
    "spsa": {"torchattacks": _spsa_ta},
    "hopskipjump": {"foolbox": _hsj_fb},
    "boundary": {"foolbox": _boundary_fb},
    "brendel-bethge": {"foolbox": _bb_fb},
    "fmn": {"foolbox": _fmn_fb},
    "ddn": {"foolbox": _ddn_fb},
    "jsma": {"torchattacks": _jsma_ta, "art": _jsma_art},
    "onepixel": {"torchattacks": _onepixel_ta},
    "pixle": {"torchattacks": _pixle_ta},
    "uap": {"art": _uap_art},
    "patch": {"art": _patch_art},
    "spatial-grid": {"art": _spatial_art},
    "spatial-fo": {"art": _spatial_art},
}


def build_peer(peer: str, model: nn.Module, row: Row) -> PeerFn:
    """The peer's attack for ``row`` (KeyError if the table has none), seeded as the row says."""
    return _seeded(row.seed, PEERS[row.attack][peer](model, row))


def median(values: torch.Tensor) -> float:
    """The lower median (a failure counted as +inf)."""
    return float(values.sort().values[(len(values) - 1) // 2]) if len(values) else math.nan
