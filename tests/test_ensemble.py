"""The worst-case ensemble as an attack, outside the runner."""

from __future__ import annotations

import pytest
import torch

from robustlab.attacks import create_attack
from robustlab.attacks.ensemble import WorstCaseEnsemble
from robustlab.errors import RobustlabError
from robustlab.threat import ThreatModel

LINF = ThreatModel("linf", 0.1)


def test_ensemble_is_the_per_sample_worst_case_of_its_members(digits_model, digits_test):
    x, y = digits_test.x[:100], digits_test.y[:100]
    fgsm, pgd = create_attack("fgsm", LINF), create_attack("pgd", LINF, steps=10, random_start=False)
    ens = WorstCaseEnsemble([fgsm, pgd])
    res = ens.run(digits_model, x, y)
    with torch.no_grad():
        clean = digits_model(x).argmax(1) == y
        pred = digits_model(res.x_adv).argmax(1)
    assert torch.equal(res.success, clean & (pred != y))  # every success is real, and only on clean-correct points
    assert bool(LINF.contains(res.x_adv, x).all())
    alone = [a.run(digits_model, x, y).success & clean for a in (fgsm, pgd)]
    assert int(res.success.sum()) >= max(int(s.sum()) for s in alone)
    assert bool((res.success | ~(alone[0] | alone[1])).all())  # what a member breaks, the ensemble breaks
    broken_by_fgsm = alone[0]
    # PGD runs only on what FGSM left robust: one gradient on FGSM's points, 1 + up to 10 elsewhere
    # (PGD stops spending on a point once it is broken).
    assert (res.gradients[broken_by_fgsm] == 1).all()
    rest = res.gradients[clean & ~broken_by_fgsm]
    assert ((rest > 1) & (rest <= 11)).all() and (rest[~res.success[clean & ~broken_by_fgsm]] == 11).all()
    assert (res.gradients[~clean] == 0).all()
    assert ens.config()["attacks"] == [fgsm.config(), pgd.config()]


def test_ensemble_refuses_mixed_threats_and_targeted_members():
    with pytest.raises(RobustlabError, match="one threat model"):
        WorstCaseEnsemble([create_attack("fgsm", LINF), create_attack("fgsm", ThreatModel("linf", 0.2))])
    with pytest.raises(RobustlabError, match="targeted"):
        WorstCaseEnsemble([create_attack("fgsm", LINF, targeted=True)])
    with pytest.raises(RobustlabError, match="at least one"):
        WorstCaseEnsemble([])
