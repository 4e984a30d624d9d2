"""Randomized smoothing: the bound and radius formulas against scipy and hand values, PREDICT and
CERTIFY's decisions, reproducible noise, resumable certified runs, bad inputs, the n-too-small
warning, and the attack check catching a certificate that lies."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from scipy.stats import beta, binomtest, laplace, norm

from robustlab.certify import (
    SmoothedClassifier,
    SmoothingWarning,
    certificate_from_counts,
    clopper_pearson_lower,
    create_noise,
    predict_from_counts,
    smallest_certifying_n,
    smallest_predicting_n,
    too_few_draws,
    vote_counts,
)
from robustlab.certify.noise import Gaussian
from robustlab.data import ImageDataset
from robustlab.errors import RobustlabError
from robustlab.eval.protocols import CertifiedOptions, CertifiedProtocol
from robustlab.eval.runner import certify
from robustlab.eval.store import ResultsStore
from robustlab.predictor import ABSTAIN


class Crash(Exception):
    pass


class HalfSpace(nn.Module):
    """Two classes split by the hyperplane mean(x) = 0.5: logits (s, -s), s = k (mean(x) - 0.5).
    Gaussian smoothing of a linear classifier is the same classifier, so the true L2 distance of x
    to the decision boundary is |mean(x) - 0.5| * sqrt(d)."""

    def __init__(self, k: float = 50.0) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        s = self.k * (x.flatten(1).mean(dim=1) - 0.5)
        return torch.stack([s, -s], dim=1)


def half_space_data(n: int = 12, side: int = 4) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    offset = (torch.rand(n, generator=gen) * 0.3 + 0.05) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    x = (0.5 + offset).view(n, 1, 1, 1).expand(n, 1, side, side).contiguous()
    y = (offset < 0).long()  # class 0 above the plane
    return ImageDataset("halfspace", "test", x, y, ["above", "below"])


# ---------------------------------------------------------------------- the bound and the radii


@pytest.mark.parametrize(("k", "n", "alpha"), [(1, 10, 0.05), (73, 100, 0.001), (990, 1000, 0.001), (5, 5, 0.01)])
def test_clopper_pearson_is_the_one_sided_exact_bound(k, n, alpha):
    got = clopper_pearson_lower(k, n, alpha)
    assert got == pytest.approx(beta.ppf(alpha, k, n - k + 1), abs=1e-12)
    # the lower end of the two-sided exact interval at level 1 - 2 alpha is the one-sided bound
    assert got == pytest.approx(binomtest(k, n).proportion_ci(1 - 2 * alpha, method="exact").low, abs=1e-9)


def test_clopper_pearson_hand_values():
    assert clopper_pearson_lower(0, 50, 0.001) == 0.0
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), abs=1e-12)  # 0.9333
    assert smallest_certifying_n(0.001) == 10  # 0.001^(1/9) = 0.464 < 0.5 <= 0.001^(1/10) = 0.501
    assert smallest_certifying_n(0.05) == 5
    assert smallest_predicting_n(0.001) == 11  # two-sided: 2 * 2^-n <= 0.001


def test_radius_formulas_hand_values():
    shape = (1, 4, 4)
    assert create_noise("gaussian", sigma=0.5).radius(0.975, shape) == pytest.approx(0.5 * 1.959963985, abs=1e-8)
    # laplace: b = sigma / sqrt(2); sigma = sqrt(2) gives b = 1 and R = -log(2 (1 - p))
    assert create_noise("laplace", sigma=math.sqrt(2)).radius(0.9, shape) == pytest.approx(-math.log(0.2), abs=1e-12)
    # uniform: a = sigma sqrt(3); sigma = 1/sqrt(3) gives a = 1 and R = 2 (p - 1/2)
    assert create_noise("uniform", sigma=1 / math.sqrt(3)).radius(0.75, shape) == pytest.approx(0.5, abs=1e-12)
    # ablation, d = 16 pixels, keep 2: Delta(1) = 1 - C(15,2)/C(16,2) = 0.125, Delta(2) = 1 - 91/120 = 0.2417
    abl = create_noise("ablation", keep=2)
    assert abl.radius(0.7, shape) == 1.0  # 0.7 - 0.125 > 0.5, 0.7 - 0.2417 < 0.5
    assert abl.radius(0.6, shape) == 0.0
    assert abl.radius(0.63, shape) == 1.0  # 0.63 - 0.125 = 0.505


@pytest.mark.parametrize("p", [0.6, 0.9, 0.999])
def test_radii_are_tight_for_the_worst_case_half_space(p):
    """The Neyman-Pearson worst case: a classifier that says cA where the first noise coordinate is
    below its p-quantile t. Shifted by exactly the certified radius along that coordinate, cA's
    probability is exactly 1/2 (the radius is sound and cannot be larger)."""
    sigma, shape = 0.5, (1, 2, 2)
    r = create_noise("gaussian", sigma=sigma).radius(p, shape)
    t = norm.ppf(p, scale=sigma)
    assert norm.cdf(t - r, scale=sigma) == pytest.approx(0.5, abs=1e-12)
    b = sigma / math.sqrt(2)
    r = create_noise("laplace", sigma=sigma).radius(p, shape)
    t = laplace.ppf(p, scale=b)
    assert laplace.cdf(t - r, scale=b) == pytest.approx(0.5, abs=1e-12)
    a = sigma * math.sqrt(3)
    r = create_noise("uniform", sigma=sigma).radius(p, shape)
    t = -a + 2 * a * p
    assert (t - r + a) / (2 * a) == pytest.approx(0.5, abs=1e-12)


def test_noises_have_the_stated_spread():
    gen = torch.Generator().manual_seed(1)
    x = torch.full((1, 8, 8), 0.5)
    for name in ("gaussian", "laplace", "uniform"):
        out = create_noise(name, sigma=0.3).sample_(torch.empty(2000, 1, 8, 8), x, gen)
        assert float((out - 0.5).std()) == pytest.approx(0.3, rel=0.02)
        assert float((out - 0.5).mean()) == pytest.approx(0.0, abs=0.005)
    out = create_noise("ablation", keep=5, fill=0.0).sample_(torch.empty(50, 1, 8, 8), x, gen)
    assert ((out == 0.5).flatten(1).sum(dim=1) == 5).all() and ((out == 0.0).flatten(1).sum(dim=1) == 59).all()


# ---------------------------------------------------------------------- PREDICT and CERTIFY


def test_decisions_from_counts():
    gauss = create_noise("gaussian", sigma=0.25)
    sel = torch.tensor([[10, 0, 0], [3, 4, 3], [0, 10, 0]])
    est = torch.tensor([[1000, 0, 0], [330, 340, 330], [0, 520, 480]])
    cert = certificate_from_counts(sel, est, 1000, 0.001, gauss, (1, 4, 4))
    assert cert.prediction.tolist() == [0, ABSTAIN, ABSTAIN]  # 520/1000: lower bound 0.471 < 0.5
    assert cert.radius[0] == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)))
    assert cert.radius[1:].tolist() == [0.0, 0.0]
    assert predict_from_counts(torch.tensor([[60, 40, 0], [100, 0, 0], [0, 3, 8]]), 0.001).tolist() == [ABSTAIN, 0, ABSTAIN]


def test_a_coin_flip_abstains_and_a_sure_thing_certifies():
    model = HalfSpace()
    smooth = SmoothedClassifier(model, create_noise("gaussian", sigma=0.5), 2, n0=20, n=400, alpha=0.001)
    x = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 0.95)])  # on the plane, far above it
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    cert = smooth.certify(x, gens)
    assert cert.prediction.tolist() == [ABSTAIN, 0]
    # far from the plane every vote agrees: the bound is alpha^(1/n) and the radius sigma Phi^-1 of it
    assert cert.count_estimation[1] == 400
    assert float(cert.radius[1]) == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 400)), rel=1e-9)
    assert smooth.predict(x, torch.Generator().manual_seed(3)).tolist() == [ABSTAIN, 0]


def test_same_noise_same_numbers_whatever_the_grouping(digits_model, digits_test):
    noise = create_noise("gaussian", sigma=0.25)
    x = digits_test.x[:5]

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(5)]

    together = vote_counts(digits_model, x, 150, noise, 64, gens(), 10)
    again = vote_counts(digits_model, x, 150, noise, 64, gens(), 10)
    alone = torch.cat([vote_counts(digits_model, x[i:i + 1], 150, noise, 64, gens()[i:i + 1], 10) for i in range(5)])
    assert torch.equal(together, again) and torch.equal(together, alone)
    assert (together.sum(dim=1) == 150).all()


def test_gaussian_draws_are_the_reference_draws():
    """x + randn_like(x) * sigma from the same generator state, bit for bit (what
    locuslab/smoothing's core computes), so fed the same noise both count the same votes."""
    x = torch.rand(3, 8, 8)
    ours = Gaussian(sigma=0.37).sample_(torch.empty(50, 3, 8, 8), x, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    batch = x.repeat((50, 1, 1, 1))
    reference = batch + torch.randn(batch.shape, generator=gen) * 0.37
    assert torch.equal(ours, reference)


# ---------------------------------------------------------------------- runs in the store


def _rows(store, run_id):
    return [tuple(r)[2:-1] for r in store.sample_rows("certified_samples", run_id)]  # all but run, task, seconds


OPTIONS = CertifiedOptions(n0=16, n=120, alpha=0.01, noise_batch=64, attack_n=4, attack_steps=3, attack_draws=4,
                           radii=(0.0, 0.1, 0.2))


def test_resumed_run_equals_uninterrupted_and_batch_size_does_not_matter(digits_model, digits_test, tmp_path,
                                                                         monkeypatch):
    data = digits_test.subset(20)
    with ResultsStore(tmp_path / "full.db") as store:
        full = certify(digits_model, data, OPTIONS, store, seed=4, batch_size=6, progress=False)
        full_rows = _rows(store, full.run_id)
    with ResultsStore(tmp_path / "other.db") as store:
        other = certify(digits_model, data, OPTIONS, store, seed=4, batch_size=20, progress=False)
        assert _rows(store, other.run_id) == full_rows

    calls = {"n": 0}
    original = CertifiedProtocol.run_batch

    def crashing(self, *args, **kwargs):  # killed on the third batch
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash("killed")
        return original(self, *args, **kwargs)

    with ResultsStore(tmp_path / "resumed.db") as store:
        monkeypatch.setattr(CertifiedProtocol, "run_batch", crashing)
        with pytest.raises(Crash):
            certify(digits_model, data, OPTIONS, store, seed=4, batch_size=6, progress=False)
        run_id = store.list_runs()[0]["run_id"]
        assert store.get_run(run_id)["status"] == "interrupted"
        assert len(store.sample_rows("certified_samples", run_id)) == 12
        monkeypatch.undo()
        resumed = certify(digits_model, data, OPTIONS, store, seed=4, batch_size=6, progress=False, resume=True)
        assert resumed.resumed and resumed.run_id == run_id
        assert _rows(store, run_id) == full_rows
    for key in ("certified_accuracy", "acr", "abstain_rate", "lie_check", "empirical"):
        assert resumed.summary[key] == full.summary[key]
    assert full.summary["certified_accuracy"]["0"] > 0.5  # the smoothed digits model is mostly right


def test_summary_is_the_metric_of_the_rows(tmp_path):
    model, data = HalfSpace(), half_space_data()
    with ResultsStore(tmp_path / "s.db") as store:
        res = certify(model, data, OPTIONS, store, progress=False)
        rows = store.sample_rows("certified_samples", res.run_id)
        key, title = CertifiedProtocol.leaderboard_group(store.get_run(res.run_id))
    assert key == ("halfspace", "certified", "gaussian", 0.25) and "σ = 0.25 (l2)" in title
    from robustlab.report.leaderboard import columns_of, metric_of

    columns = columns_of(CertifiedProtocol, [res.summary])
    assert columns[0] == "acr" and metric_of(res.summary, "acr") == res.summary["acr"]
    assert "certified_accuracy@0.1" in columns
    assert metric_of(res.summary, "certified_accuracy@0.1") == res.summary["certified_accuracy"]["0.1"]
    radii = [r["radius"] if r["prediction"] != ABSTAIN and r["correct"] else 0.0 for r in rows]
    assert res.summary["acr"] == pytest.approx(sum(radii) / len(rows))
    at = sum(1 for r in rows if r["correct"] and r["radius"] is not None and r["radius"] >= 0.1) / len(rows)
    assert res.summary["certified_accuracy"]["0.1"] == pytest.approx(at)
    # each certificate is below the true distance to the plane (the half-space is its own smoothing)
    for r, x in zip(rows, data.x):
        if r["radius"] is not None:
            assert r["radius"] <= abs(float(x.mean()) - 0.5) * 4 + 1e-9


# ---------------------------------------------------------------------- bad inputs and warnings


def test_bad_inputs_say_one_clear_line():
    model = HalfSpace()
    cases = [
        (lambda: create_noise("gaussian", sigma=0.0), "sigma must be > 0"),
        (lambda: create_noise("laplace", sigma=-1.0), "sigma must be > 0"),
        (lambda: SmoothedClassifier(model, create_noise("gaussian"), 2, alpha=1.0), "alpha must be in (0, 1)"),
        (lambda: SmoothedClassifier(model, create_noise("gaussian"), 2, alpha=0.0), "alpha must be in (0, 1)"),
        (lambda: SmoothedClassifier(model, create_noise("gaussian"), 2, n0=200, n=100), "n0 (200"),
        (lambda: CertifiedProtocol(CertifiedOptions(n0=500, n=100)), "must not exceed n"),
    ]
    for build, expected in cases:
        with pytest.raises(RobustlabError) as err:
            build()
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_batchnorm_in_training_mode_is_refused(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).train()
    with pytest.raises(RobustlabError, match=r"BatchNorm in training mode \(2\)"):
        SmoothedClassifier(model, create_noise("gaussian"), 2)
    with ResultsStore(tmp_path / "bn.db") as store:
        with pytest.raises(RobustlabError, match="BatchNorm in training mode"):
            certify(model, half_space_data(), OPTIONS, store, progress=False)
        assert store.list_runs() == []  # refused before anything was written
    SmoothedClassifier(model.eval(), create_noise("gaussian"), 2)


def test_too_few_draws_warns_with_the_smallest_n_that_can_certify():
    with pytest.warns(SmoothingWarning, match=r"use n >= 10"):
        SmoothedClassifier(HalfSpace(), create_noise("gaussian"), 2, n0=5, n=9, alpha=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmoothedClassifier(HalfSpace(), create_noise("gaussian"), 2, n0=5, n=10, alpha=0.001)
    assert too_few_draws(100, 1e-40) is not None and "use n >= 133" in too_few_draws(100, 1e-40)


def test_too_few_draws_fail_the_draws_check(tmp_path):
    opts = CertifiedOptions(n0=4, n=8, alpha=0.001, attack_n=0)
    with ResultsStore(tmp_path / "few.db") as store:
        res = certify(HalfSpace(), half_space_data(4), opts, store, progress=False)
    assert res.summary["abstain_rate"] == 1.0
    assert {c["name"]: c["status"] for c in res.checks}["draws"] == "fail"


# ---------------------------------------------------------------------- no certificate may lie


def test_the_attack_check_passes_sound_certificates_and_flags_lying_ones(tmp_path, monkeypatch):
    model, data = HalfSpace(), half_space_data(12)
    opts = CertifiedOptions(noise_params={"sigma": 0.1}, n0=20, n=200, alpha=0.001, attack_n=12, attack_steps=10,
                            attack_draws=4, radii=(0.0, 0.25))
    with ResultsStore(tmp_path / "honest.db") as store:
        honest = certify(model, data, opts, store, progress=False)
    checks = {c["name"]: c for c in honest.checks}
    assert checks["certificates"]["status"] == "pass"
    assert honest.summary["lie_check"]["attacked"] >= 10 and honest.summary["lie_check"]["contradicted"] == 0

    true_radius = Gaussian.radius
    monkeypatch.setattr(Gaussian, "radius", lambda self, p, shape: 5.0 * true_radius(self, p, shape))
    with ResultsStore(tmp_path / "liar.db") as store:
        liar = certify(model, data, opts, store, progress=False)
    lie = liar.summary["lie_check"]
    checks = {c["name"]: c for c in liar.checks}
    assert checks["certificates"]["status"] == "fail" and "lie" in checks["certificates"]["detail"]
    assert lie["contradicted"] >= 8 and lie["tail_probability"] < 1e-3
    # the empirical accuracy at 0.5 is at least the certified accuracy there (here: the true one)
    emp = honest.summary["empirical"]
    assert emp["empirical_accuracy"] >= emp["certified_accuracy"] and emp["gap"] >= 0


# ---------------------------------------------------------------------- training recipes


def test_noise_recipe_trains_on_the_certification_noise(digits_model, digits_test):
    from robustlab.training import create_objective

    x, y = digits_test.x[:32], digits_test.y[:32]
    recipe = create_objective("noise", sigma=0.5)
    loss, logs = recipe(digits_model, x, y, torch.Generator().manual_seed(7))
    noisy = create_noise("gaussian", sigma=0.5).perturb(x, torch.Generator().manual_seed(7))
    expected = nn.functional.cross_entropy(digits_model(noisy), y)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert set(logs) == {"noisy_acc"}
    with pytest.raises(RobustlabError, match="sigma must be > 0"):
        create_objective("noise", sigma=0.0)


def test_smoothadv_ascends_the_soft_smoothed_loss_inside_the_ball(digits_model, digits_test):
    from robustlab.threat import ThreatModel
    from robustlab.training import create_objective

    x, y = digits_test.x[:16], digits_test.y[:16]
    threat = ThreatModel("l2", 0.5)
    recipe = create_objective("smoothadv", threat, sigma=0.25, m=4, steps=4)
    draws = recipe._draws(x, torch.Generator().manual_seed(1))
    x_adv = recipe._attack(digits_model, x, y, draws, None)
    assert bool(threat.contains(x_adv, x).all())

    def soft_loss(z):
        logits = digits_model(z.repeat_interleave(4, dim=0) + draws)
        p = torch.softmax(logits, dim=1).view(16, 4, -1).mean(dim=1)
        return -p.gather(1, y[:, None]).log().sum()

    with torch.no_grad():
        assert float(soft_loss(x_adv)) > float(soft_loss(x))
    loss, logs = recipe(digits_model, x, y, torch.Generator().manual_seed(2))  # eval mode: the shared model's BN stays
    assert torch.isfinite(loss) and "adv_noisy_acc" in logs
    with pytest.raises(RobustlabError, match="attacks in L2"):
        create_objective("smoothadv", ThreatModel("linf", 0.1))
