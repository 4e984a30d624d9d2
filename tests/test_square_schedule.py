"""Square's square-size schedule: ``standard`` runs it as the reference AutoAttack protocol does (5000
queries on the schedule defined for 10,000, not rescaled), checked against torchattacks' own schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from robustlab.attacks import build_attacks, create_attack
from robustlab.attacks.square import square_fraction
from robustlab.threat import ThreatModel

torchattacks = pytest.importorskip("torchattacks")


def test_standard_suite_runs_square_on_the_reference_schedule():
    square = build_attacks(["standard"], ThreatModel("linf", 0.3))[-1]
    assert square.name == "square"
    assert square.params["queries"] == 5000 and square.params["rescale_schedule"] is False
    # Elsewhere the default stays: the schedule stretched to the budget.
    assert create_attack("square", ThreatModel("linf", 0.3), queries=1000).params["rescale_schedule"] is True


@pytest.mark.parametrize("queries", [5000, 1000, 137])
@pytest.mark.parametrize("rescale", [False, True])
def test_schedule_equals_torchattacks(queries, rescale):
    peer = torchattacks.Square(nn.Linear(1, 2), n_queries=queries, p_init=0.8, resc_schedule=rescale)
    ours = [square_fraction(i, queries, 0.8, rescale) for i in range(queries)]
    theirs = [peer.p_selection(i) for i in range(queries)]
    assert ours == theirs


def test_not_rescaled_schedule_keeps_larger_squares_late():
    # Iteration 3000 of 5000: the reference has halved p six times; the rescaled schedule seven.
    assert square_fraction(3000, 5000, 0.8, rescale=False) == 0.8 / 2**6
    assert square_fraction(3000, 5000, 0.8, rescale=True) == 0.8 / 2**7
    res = create_attack("square", ThreatModel("linf", 0.3), queries=30, rescale_schedule=False).run(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long),
        generator=torch.Generator().manual_seed(0))
    assert res.forwards.max() <= 30
