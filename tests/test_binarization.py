"""The binarization test: a strong attack finds the reachable boundary, a crippled one does not."""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks import create_attack
from robustlab.eval.binarization import Binarized, binarization_test, last_linear, surface_point
from robustlab.threat import ThreatModel

LINF = ThreatModel("linf", 0.1)


def _points(model, data, n=10):
    with torch.no_grad():
        keep = model(data.x[:64]).argmax(dim=1) == data.y[:64]
    return data.x[:64][keep][:n]


def test_strong_attack_passes_and_weak_attack_fails(digits_model, digits_test):
    x = _points(digits_model, digits_test)
    strong = binarization_test(digits_model, create_attack("pgd", LINF, steps=20), x, torch.Generator().manual_seed(0))
    weak = binarization_test(digits_model, create_attack("pgd", LINF, steps=1, alpha=1e-4, random_start=False), x,
                             torch.Generator().manual_seed(0))
    assert strong["status"] == "pass", strong
    assert weak["status"] == "fail", weak
    assert "of 10 binarized test cases" in strong["detail"]


def test_binarized_model_has_a_reachable_boundary(digits_model, digits_test):
    x0 = _points(digits_model, digits_test, 1)
    gen = torch.Generator().manual_seed(1)
    readout = last_linear(digits_model)
    probe = Binarized(digits_model, readout, torch.zeros(1), torch.zeros(1))
    x_b = surface_point(LINF, x0, gen)
    assert LINF.contains(x_b, x0).all() and float(LINF.distance(x_b, x0)[0]) > 0.09
    f0, fb = probe.features(x0), probe.features(x_b)
    w = (fb - f0)[0]
    b = -((f0 @ w) + (fb @ w)) / 2
    binary = Binarized(digits_model, readout, w, b.reshape(1))
    assert binary(x0).argmax(dim=1).item() == 0 and binary(x_b).argmax(dim=1).item() == 1


def test_models_without_a_readout_are_not_tested(digits_test):
    model = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    out = binarization_test(model, create_attack("fgsm", LINF), digits_test.x[:2])
    assert out["status"] == "warn" and "not run" in out["detail"]
