"""The one configurable base of attacks, recipes and defenses, and the spec parser."""

from __future__ import annotations

from typing import Any

import pytest

from robustlab.attacks import create_attack
from robustlab.errors import RobustlabError
from robustlab.params import Configurable, parse_spec, parse_value
from robustlab.threat import ThreatModel
from robustlab.training.objectives import create_objective


class Blur(Configurable):
    """A stand-in for a defense: parameters only, no threat model."""

    name = "blur"
    component = "defense"
    defaults: dict[str, Any] = {"sigma": 1.0, "kernel": 3, "mode": "gaussian", "radius": None}
    choices = {"mode": ("gaussian", "box")}

    def validate(self) -> None:
        if self.params["kernel"] % 2 == 0:
            raise RobustlabError(f"{self.owner}: kernel must be odd, got {self.params['kernel']}")


def test_a_configurable_without_a_threat_model():
    blur = Blur(sigma=2, kernel=5.0, mode="BOX")
    assert blur.params == {"sigma": 2.0, "kernel": 5, "mode": "box", "radius": None}
    assert isinstance(blur.params["kernel"], int)
    assert blur.config() == {"name": "blur", "params": {"sigma": 2.0, "kernel": 5, "mode": "box", "radius": None}}
    other = blur.with_params(kernel=7)
    assert type(other) is Blur and other.params["kernel"] == 7 and other.params["sigma"] == 2.0
    assert blur.params["kernel"] == 5  # the original is untouched
    assert repr(blur) == "Blur(sigma=2.0, kernel=5, mode='box', radius=None)"


@pytest.mark.parametrize("params, message", [
    ({"sigmaa": 1.0}, "defense 'blur' has no parameter sigmaa; its parameters: kernel, mode, radius, sigma"),
    ({"kernel": 2.5}, "defense 'blur': kernel=2.5 should be like 3"),
    ({"mode": "median"}, "defense 'blur': mode='median' is not one of gaussian, box"),
    ({"kernel": 4}, "defense 'blur': kernel must be odd, got 4"),
])
def test_configurable_errors_name_the_component(params, message):
    with pytest.raises(RobustlabError) as err:
        Blur(**params)
    assert str(err.value) == message


def test_attacks_and_recipes_share_the_base():
    threat = ThreatModel("linf", 0.1)
    pgd = create_attack("pgd", threat, steps=3)
    assert list(pgd.config()) == ["name", "params", "threat", "targeted", "kind"]
    assert pgd.with_params(steps=5).params["steps"] == 5 and pgd.with_params(steps=5).threat == threat
    assert repr(pgd) == ("PGD(linf eps=0.1, targeted=False, steps=3, alpha=None, restarts=1, random_start=True, "
                         "loss='ce', l1_sparsity=0.95, eot=1)")
    with pytest.raises(RobustlabError, match=r"^attack 'pgd' has no parameter stepz; its parameters: alpha, "):
        create_attack("pgd", threat, stepz=3)
    trades = create_objective("trades", threat, beta=3)
    assert list(trades.config()) == ["name", "params", "threat"]
    assert repr(trades) == "TRADES(linf eps=0.1, beta=3.0, steps=10, alpha=None, eps_warmup=0.0)"
    assert trades.with_params(beta=1.0).params["beta"] == 1.0 and trades.with_params(beta=1.0).threat == threat
    with pytest.raises(RobustlabError, match=r"^recipe 'trades' has no parameter betta; its parameters: "):
        create_objective("trades", threat, betta=3)


def test_parse_spec_names_what_it_parses():
    assert parse_spec("trades:beta=6") == ("trades", {"beta": 6})
    with pytest.raises(RobustlabError, match="empty recipe name"):
        parse_spec(":beta=6", "recipe")
    with pytest.raises(RobustlabError, match="defense parameter 'x' in 'blur:x' must be written key=value"):
        parse_spec("blur:x", what="defense")
    assert [parse_value(v) for v in ("3", "0.5", "1/4", "TRUE", "null", "cw")] == [3, 0.5, 0.25, True, None, "cw"]
