"""Defenses as components: registry and parameters, the defended predictor (BPDA forward for
attacks, real transforms and votes for predictions), adaptive pairing and recording in runs."""

from __future__ import annotations

import pytest
import torch

from robustlab.attacks import create_attack
from robustlab.defenses import DEFENSES, DefendedModel, apply_defenses, build_defenses, create_defense
from robustlab.errors import RobustlabError
from robustlab.eval import EvalOptions, ResultsStore, evaluate
from robustlab.predictor import predict
from robustlab.report import leaderboard, write_report
from robustlab.threat import ThreatModel

LINF = ThreatModel("linf", 0.1)


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.x[:64], digits_test.y[:64]


def test_registry_specs_and_bad_parameters():
    assert {"bit-depth", "noise"} <= set(DEFENSES.names())
    d = build_defenses(["bit-depth:bits=3", {"name": "noise", "params": {"sigma": 0.2}}])
    assert d[0].config() == {"name": "bit-depth", "params": {"bits": 3}}
    assert d[1].params == {"sigma": 0.2, "draws": 8}
    with pytest.raises(RobustlabError, match="unknown defense 'jpeg2'"):
        create_defense("jpeg2")
    with pytest.raises(RobustlabError, match="has no parameter quality"):
        create_defense("bit-depth", quality=3)
    with pytest.raises(RobustlabError, match="bits must be in 1..16"):
        create_defense("bit-depth", bits=0)
    with pytest.raises(RobustlabError, match="sigma must be > 0"):
        create_defense("noise", sigma=-1)


def test_bit_depth_predicts_on_the_squeezed_image_and_attacks_see_bpda(digits_model, batch):
    x, y = batch
    defended = apply_defenses(digits_model, ["bit-depth:bits=2"])
    assert isinstance(defended, DefendedModel) and not defended.randomized
    q = torch.round(x * 3) / 3
    with torch.no_grad():
        assert torch.equal(predict(defended, x), digits_model(q).argmax(1))
    # Backward pass: straight-through, i.e. the model's gradient at the squeezed point.
    xg = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(defended(xg), y, reduction="sum").backward()
    qg = q.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(digits_model(qg), y, reduction="sum").backward()
    assert torch.allclose(xg.grad, qg.grad)
    assert defended.needs().bpda == ("bit-depth",) and "BPDA" in defended.needs().describe()


def test_bpda_breaks_what_zero_gradients_hide(digits_model, batch):
    """Attacked through the raw quantization (zero gradient almost everywhere) PGD does nothing; through
    BPDA it breaks the defended model."""
    x, y = batch
    defended = apply_defenses(digits_model, ["bit-depth:bits=2"])
    squeeze = defended.defenses[0]
    naive = torch.nn.Sequential()
    naive.forward = lambda t: digits_model(squeeze.transform(t))  # no BPDA: the gradient is zero
    pgd = create_attack("pgd", LINF, steps=10)
    g = torch.Generator().manual_seed(0)
    broken_naive = int(pgd.run(naive, x, y, generator=g).success.sum())
    g = torch.Generator().manual_seed(0)
    res = pgd.run(defended, x, y, generator=g)
    with torch.no_grad():
        really = (predict(defended, res.x_adv) != y).sum()
    assert broken_naive <= 2 and int(really) > broken_naive + 10


def test_randomized_defense_votes_reproducibly(digits_model, batch):
    x, _ = batch
    defended = apply_defenses(digits_model, ["noise:sigma=0.3,draws=5"])
    assert defended.randomized and defended.draws == 5 and defended.needs().eot == 5
    a = predict(defended, x, torch.Generator().manual_seed(1))
    b = predict(defended, x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # The vote is the most frequent label over the 5 draws (ties: the smaller class).
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(len(x), 10, dtype=torch.long)
    for _ in range(5):
        counts[torch.arange(len(x)), defended.forward_with(x, g).argmax(1)] += 1
    assert torch.equal(a, counts.argmax(1))


def test_defended_evaluation_is_adaptive_recorded_and_resumes_identically(digits_model, digits_test, tmp_path, monkeypatch):
    data = digits_test.subset(60)
    defended = apply_defenses(digits_model, ["noise:sigma=0.05,draws=4"])
    options = EvalOptions(steps_grid=(), sanity=False, batch_size=30, seed=2)
    attacks = [create_attack("apgd-ce", LINF, steps=5)]
    with ResultsStore(tmp_path / "r.db") as store:
        full = evaluate(defended, data, attacks, store, options=options)
        run = store.get_run(full.run_id)
        assert run["config"]["defenses"] == [{"name": "noise", "params": {"sigma": 0.05, "draws": 4}}]
        assert run["config"]["attacks"][0]["params"]["eot"] == 4  # EOT over the defense's draws, automatically
        assert "EOT over 4 draws" in run["model_info"]["adaptive_attack"]
        assert full.summary["defenses"] == run["config"]["defenses"]
        page = write_report(store, full.run_id, tmp_path / "rep")["html"].read_text()
        assert "noise(draws=4, sigma=0.05)" in page
        assert any("defended: noise" in n for g in leaderboard(store) for row in g.rows for n in row.notes)
        full_rows = [(r.clean_correct, r.robust, r.adv_pred) for r in store.samples(full.run_id)]

    pgd_class = type(attacks[0])
    original, calls = pgd_class.run, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with ResultsStore(tmp_path / "k.db") as store:
        monkeypatch.setattr(pgd_class, "run", dying)
        with pytest.raises(KeyboardInterrupt):
            evaluate(apply_defenses(digits_model, ["noise:sigma=0.05,draws=4"]), data, attacks, store, options=options)
        monkeypatch.undo()
        resumed = evaluate(apply_defenses(digits_model, ["noise:sigma=0.05,draws=4"]), data, attacks, store,
                           options=options, resume=True)
        assert resumed.resumed
        assert [(r.clean_correct, r.robust, r.adv_pred) for r in store.samples(resumed.run_id)] == full_rows
    assert resumed.summary["robust_accuracy"] == full.summary["robust_accuracy"]


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm", "fgsm"])
def test_gradient_attacks_average_over_the_defense_draws(digits_model, batch, name):
    """Every gradient attack made adaptive to a randomized defense averages each gradient over the
    defense's draws: eot forward/backward passes per step, counted as such."""
    from robustlab.eval.runner import adaptive_attacks

    x, y = batch
    defended = apply_defenses(digits_model, ["noise:sigma=0.05,draws=3"])
    (attack,) = adaptive_attacks([create_attack(name, LINF, **({} if name == "fgsm" else {"steps": 2}))], defended.needs())
    assert attack.params["eot"] == 3
    calls = []
    defended.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    result = attack.run(defended, x, y, torch.Generator().manual_seed(0))
    assert int(result.gradients.max()) == 3 * (1 if name == "fgsm" else 2)
    # 3 passes per gradient step on every sample still attacked, plus the last checks
    assert sum(calls) >= 3 * len(x)
    with pytest.raises(RobustlabError, match="eot must be >= 1"):
        create_attack(name, LINF, eot=0)


def test_defended_run_reports_non_adaptive_beside_adaptive_and_the_worst_case(digits_model, digits_test, tmp_path):
    """A defense with masked gradients (JPEG): the non-adaptive attack (zero gradients through the
    codec) and the transfer from the undefended model leave far more points robust than PGD through
    BPDA with the differentiable JPEG. The headline is the per-sample worst case over all three, the
    non-adaptive numbers are shown beside it, and the masking checks flag the non-adaptive evaluation."""
    data = digits_test.subset(96)
    defended = apply_defenses(digits_model, ["jpeg:quality=30"])
    attacks = [create_attack("pgd", ThreatModel("linf", 0.15), steps=20)]
    with ResultsStore(tmp_path / "r.db") as store:
        result = evaluate(defended, data, attacks, store, options=EvalOptions(steps_grid=(), batch_size=48, seed=0))
        run = store.get_run(result.run_id)
        rows = {t: {r.sample_index: r.robust for r in store.samples(result.run_id, t)}
                for t in ("main", "non-adaptive", "transfer")}
        page = write_report(store, result.run_id, tmp_path / "rep")["html"].read_text()
    s = result.summary
    naive = s["non_adaptive"]
    assert naive["robust_accuracy"] > s["ensemble_robust_accuracy"] + 0.3
    assert naive["transfer_robust_accuracy"] > s["ensemble_robust_accuracy"] + 0.2
    worst = sum(all(rows[t][i] for t in rows) for i in rows["main"]) / len(rows["main"])
    assert s["robust_accuracy"] == pytest.approx(worst) and s["robust_accuracy"] <= s["ensemble_robust_accuracy"]
    checks = {c["name"]: c for c in result.checks}
    assert checks["adaptive-gap"]["status"] == "fail" and "overestimates robustness" in checks["adaptive-gap"]["detail"]
    assert checks["non-adaptive gradients"]["status"] != "pass"
    assert checks["gradients"]["status"] == "pass"  # the adaptive attacker's gradients are fine
    assert run["config"]["non_adaptive"] == [attacks[0].config()]
    from robustlab.report.plots import format_percent

    table = page[page.index("Defended model: adaptive and non-adaptive attacks"):]
    for value in (naive["robust_accuracy"], naive["transfer_robust_accuracy"], s["robust_accuracy"]):
        assert format_percent(value) in table
