"""The evaluation runner: worst-case ensemble, re-verification, resume, sanity checks, bad input."""

from __future__ import annotations

import contextlib
import copy
import sqlite3

import pytest
import torch
import torch.nn as nn

from robustlab.attacks import Attack, AttackResult, create_attack
from robustlab.eval.protocols import adversarial
from robustlab.report.html import write_report
from robustlab.eval.runner import EvalOptions, evaluate
from robustlab.eval.store import ResultsStore
from robustlab.errors import RobustlabError
from robustlab.models import runtime
from robustlab.models.runtime import channels_last, fast_runtime
from robustlab.threat import ThreatModel

LINF = ThreatModel("linf", 0.1)
FAST = EvalOptions(steps_grid=(), sanity=False, batch_size=64)


def _rows(store, run_id, task="main"):
    return [(r.sample_index, r.clean_correct, r.robust, r.broken_by, r.adv_pred) for r in store.samples(run_id, task)]


class Liar(Attack):
    """Claims success for every sample, returning a point outside the ball (or the clean image)."""

    name = "liar"
    defaults = {"outside": True}

    def _attack(self, model, x, y, generator):
        n = x.shape[0]
        return AttackResult(x.clone(), torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                            torch.zeros(n, dtype=torch.long))

    def run(self, model, x, y, generator=None):  # bypasses the base class's projection on purpose
        res = self._attack(model, x, y, generator)
        if self.params["outside"]:
            res.x_adv = (x + 0.5).clamp(0, 1)  # far outside the 0.1 ball, possibly misclassified
        return res


class Crash(Exception):
    pass


def test_ensemble_is_worst_case_and_attacks_only_robust_points(digits_model, digits_test, tmp_path):
    data = digits_test.subset(200)
    fgsm, pgd = create_attack("fgsm", LINF), create_attack("pgd", LINF, steps=10)
    with ResultsStore(tmp_path / "r.db") as store:
        both = evaluate(digits_model, data, [fgsm, pgd], store, options=FAST)
        only_fgsm = evaluate(digits_model, data, [fgsm], store, options=FAST)
        rows = store.samples(both.run_id)
    s = both.summary
    assert 0.9 < s["clean_accuracy"] <= 1.0
    assert s["robust_accuracy"] < s["clean_accuracy"]
    # The ensemble can only be stronger than its first member; per-attack accuracies are cumulative.
    assert s["robust_accuracy"] <= only_fgsm.robust_accuracy
    assert s["attacks"][0]["robust_accuracy"] == pytest.approx(only_fgsm.robust_accuracy)
    assert s["attacks"][1]["robust_accuracy"] == pytest.approx(s["robust_accuracy"])
    assert s["attacks"][0]["broken"] + s["attacks"][1]["broken"] == round(
        (s["clean_accuracy"] - s["robust_accuracy"]) * len(data))
    for r in rows:
        if not r.clean_correct:  # misclassified points are never attacked
            assert r.gradients == 0 and r.broken_by is None and not r.robust
        if r.broken_by is not None:
            assert r.adv_pred != r.label and r.distance <= LINF.eps + 1e-6
        if r.broken_by == 0:  # broken by FGSM: PGD spent nothing on it
            assert r.gradients == 1
    # PGD spends compute only on what FGSM left robust.
    assert s["attacks"][1]["gradients"] <= 10 * round(s["attacks"][0]["robust_accuracy"] * len(data))


def test_claimed_successes_are_reverified(digits_model, digits_test, tmp_path):
    data = digits_test.subset(64)
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(digits_model, data, [Liar(LINF, outside=True), Liar(LINF, outside=False)], store, options=FAST)
    # Outside the ball: rejected. Clean image (correctly classified): rejected. Nothing counted.
    assert res.robust_accuracy == res.clean_accuracy
    assert res.summary["rejected"] == 2 * round(res.clean_accuracy * len(data))
    assert {c["name"]: c["status"] for c in res.checks}["verification"] == "warn"


def test_resume_after_crash_equals_uninterrupted(digits_model, digits_test, tmp_path, monkeypatch):
    data = digits_test.subset(150)
    attacks = [create_attack("fgsm", LINF), create_attack("pgd", LINF, steps=5)]
    options = EvalOptions(eps_grid=(0.05, 0.2), steps_grid=(2, 5), batch_size=32, seed=3)
    with ResultsStore(tmp_path / "full.db") as store:
        full = evaluate(digits_model, data, attacks, store, options=options)
        full_rows = {t["task"]: _rows(store, full.run_id, t["task"]) for t in store.tasks(full.run_id)}

    calls = {"n": 0}
    pgd_class = type(attacks[1])
    original = pgd_class.run

    def crashing_run(self, *args, **kwargs):  # PGD dies on its 7th batch, in the middle of the eps curve
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash("killed")
        return original(self, *args, **kwargs)

    db = tmp_path / "resumed.db"
    with ResultsStore(db) as store:
        monkeypatch.setattr(pgd_class, "run", crashing_run)
        with pytest.raises(Crash):
            evaluate(digits_model, data, attacks, store, options=options)
        run_id = store.list_runs()[0]["run_id"]
        assert store.get_run(run_id)["status"] == "interrupted"
        partial = sum(len(store.samples(run_id, t["task"])) for t in store.tasks(run_id))
        assert 0 < partial < sum(len(v) for v in full_rows.values())
        monkeypatch.undo()
        resumed = evaluate(digits_model, data, attacks, store, options=options, resume=True)
        assert resumed.resumed and resumed.run_id == run_id
        assert len(store.list_runs()) == 1
        resumed_rows = {t["task"]: _rows(store, run_id, t["task"]) for t in store.tasks(run_id)}
    assert resumed_rows == full_rows  # no sample lost, none counted twice, same outcomes
    for key in ("clean_accuracy", "robust_accuracy", "eps_curve", "steps_curve", "n"):
        assert resumed.summary[key] == full.summary[key]
    assert [a["robust_accuracy"] for a in resumed.summary["attacks"]] == [
        a["robust_accuracy"] for a in full.summary["attacks"]]


def test_a_batch_killed_between_attacks_goes_on_from_the_last_one_done(digits_model, digits_test, tmp_path,
                                                                      monkeypatch):
    """A long ensemble saves each batch's state between its attacks; a resumed run does not redo the
    attacks a killed batch had finished, and ends with the numbers (and examples) of an uninterrupted run."""
    monkeypatch.setattr(adversarial, "SAVE_SECONDS", 0.0)
    data = digits_test.subset(90)
    attacks = [create_attack("fgsm", LINF), create_attack("pgd", LINF, steps=3), create_attack("square", LINF, queries=20)]
    options = EvalOptions(eps_grid=(), steps_grid=(), batch_size=45, seed=1, sanity=False, examples=90)
    with ResultsStore(tmp_path / "full.db") as store:
        full = evaluate(digits_model, data, attacks, store, options=options)
        full_rows = _rows(store, full.run_id, "main")
        full_examples = store.examples(full.run_id, limit=100)
        full_costs = store.attack_costs(full.run_id)
    # Batch 2 has examples that FGSM or PGD found before Square's turn: the saved state must carry them.
    assert any(r[0] >= 45 and r[3] in (0, 1) for r in full_rows) and any(e.sample_index >= 45 for e in full_examples)

    counts = {"fgsm": 0, "pgd": 0, "square": 0}
    originals = {type(a): type(a).run for a in attacks}

    def counting(cls, name, crash_on=None):
        def run(self, *args, **kwargs):
            counts[name] += 1
            if counts[name] == crash_on:
                raise Crash("killed")
            return originals[cls](self, *args, **kwargs)
        return run

    with ResultsStore(tmp_path / "killed.db") as store:
        for a in attacks:  # Square dies on the second batch, after FGSM and PGD have run on it
            monkeypatch.setattr(type(a), "run", counting(type(a), a.name, crash_on=2 if a.name == "square" else None))
        with pytest.raises(Crash):
            evaluate(digits_model, data, attacks, store, options=options)
        run_id = store.list_runs()[0]["run_id"]
        assert store.done_batches(run_id, "main") == {0}
        assert store.load_partial(run_id, "main", 1) is not None
        counts.update(fgsm=0, pgd=0, square=0)
        resumed = evaluate(digits_model, data, attacks, store, options=options, resume=True)
        assert resumed.resumed and counts == {"fgsm": 0, "pgd": 0, "square": 1}  # only Square on batch 2
        assert _rows(store, run_id, "main") == full_rows
        examples = store.examples(run_id, limit=100)
        assert [(e.sample_index, e.adv_pred) for e in examples] == [(e.sample_index, e.adv_pred) for e in full_examples]
        assert all((a.adv == b.adv).all() and (a.clean == b.clean).all() for a, b in zip(examples, full_examples))
        costs = store.attack_costs(run_id)
        assert [(c["gradients"], c["forwards"]) for c in costs] == [(c["gradients"], c["forwards"]) for c in full_costs]
        assert store.load_partial(run_id, "main", 1) is None  # replaced by the finished batch
    assert resumed.summary["robust_accuracy"] == full.summary["robust_accuracy"]


def test_resume_without_unfinished_run_starts_new_and_a_finished_run_is_given_back(digits_model, digits_test, tmp_path):
    data = digits_test.subset(32)
    messages = []
    with ResultsStore(tmp_path / "r.db") as store:
        a = evaluate(digits_model, data, [create_attack("fgsm", LINF)], store, options=FAST, resume=True,
                     log=messages.append)
        assert any("starting a new run" in m for m in messages)
        # --resume of a finished run: no second copy of it, its stored result instead.
        b = evaluate(digits_model, data, [create_attack("fgsm", LINF)], store, options=FAST, resume=True,
                     log=messages.append)
        assert b.run_id == a.run_id and b.summary == a.summary and len(store.list_runs()) == 1
        assert any("already complete" in m for m in messages)
        # Without --resume the same configuration is a new run, with the same numbers (same seed).
        c = evaluate(digits_model, data, [create_attack("fgsm", LINF)], store, options=FAST)
        assert c.run_id != a.run_id and c.summary["robust_accuracy"] == a.summary["robust_accuracy"]


def test_curves_and_sanity_checks_on_a_real_model(digits_model, digits_test, tmp_path):
    data = digits_test.subset(128)
    options = EvalOptions(eps_grid=(0.0, 0.05, 0.2, 0.3), batch_size=64)
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(digits_model, data, [create_attack("pgd", LINF, steps=10)], store, options=options)
    curve = res.summary["eps_curve"]
    assert [p["eps"] for p in curve] == [0.0, 0.05, 0.1, 0.2, 0.3]
    assert curve[0]["robust_accuracy"] == res.clean_accuracy
    accs = [p["robust_accuracy"] for p in curve]
    assert all(b <= a for a, b in zip(accs, accs[1:]))
    assert accs[-1] < 0.2
    steps = res.summary["steps_curve"]
    assert [p["steps"] for p in steps["points"]] == [1, 5, 10, 20]
    verdicts = {c["name"]: c["status"] for c in res.checks}
    # PGD-20 of the steps curve (other random starts) may break a point PGD-10 left robust: then the
    # reported number counts it broken, and the worst-case check says so.
    worst = verdicts.pop("worst-case")
    assert verdicts == {"eval-mode": "pass", "randomized": "pass", "gradients": "pass", "more-steps": "pass",
                        "large-eps": "pass", "black-box": "pass", "verification": "pass", "binarization": "pass"}
    s = res.summary
    assert (worst == "pass") == (s["robust_accuracy"] == s["ensemble_robust_accuracy"])
    assert s["robust_accuracy"] <= s["ensemble_robust_accuracy"]


def test_reported_robust_accuracy_is_the_worst_case_of_everything_the_run_computed(digits_model, digits_test, tmp_path):
    """An ensemble weaker than a setting the run itself computed (FGSM, against the steps curve's PGD)
    is not reported as more robust than that setting: the headline counts those points broken, and
    the worst-case check warns (the release reported FGSM's number with every check passing)."""
    data = digits_test.subset(128)
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(digits_model, data, [create_attack("fgsm", LINF), create_attack("pgd", LINF, steps=1)], store,
                       options=EvalOptions(steps_grid=(20,), sanity=False, batch_size=64))
        steps20 = store.samples(res.run_id, "steps=20")
    s = res.summary
    pgd20 = sum(r.robust for r in steps20) / len(steps20)
    assert s["ensemble_robust_accuracy"] > pgd20  # the ensemble is the weaker of the two here
    assert s["robust_accuracy"] <= pgd20
    (verdict,) = [c for c in res.checks if c["name"] == "worst-case"]
    assert verdict["status"] == "warn" and "steps=20" in verdict["detail"]


class Quantized(nn.Module):
    """Rounds its input to 4 grey levels first: zero input gradients (a masking defense)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 3) / 3)


class Noisy(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


def test_masked_gradients_and_randomized_models_are_flagged(digits_model, digits_test, tmp_path):
    data = digits_test.subset(64)
    pgd = create_attack("pgd", LINF, steps=5)
    with ResultsStore(tmp_path / "r.db") as store:
        masked = evaluate(Quantized(digits_model), data, [pgd], store, options=EvalOptions(batch_size=64))
        noisy = evaluate(Noisy(digits_model), data, [pgd], store, options=EvalOptions(batch_size=64, steps_grid=()))
    m = {c["name"]: c for c in masked.checks}
    assert m["gradients"]["status"] == "fail"
    assert m["large-eps"]["status"] == "fail"  # gradient attacks cannot move a quantized model
    assert {c["name"]: c["status"] for c in noisy.checks}["randomized"] == "warn"


def test_train_mode_model_is_evaluated_in_eval_mode_and_restored(digits_test, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.ReLU(),
                          nn.Linear(32, 10))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(model, digits_test.subset(64), [create_attack("pgd", LINF, steps=3)], store, options=FAST)
        info = store.get_run(res.run_id)["model_info"]
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert all(p.grad is None for p in model.parameters())
    assert len(info["eval_mode_forced"]) == 2
    assert {c["name"]: c["status"] for c in res.checks}["eval-mode"] == "warn"
    assert {c["name"]: c["status"] for c in res.checks}["randomized"] == "pass"  # dropout is off in eval mode


class ViewNet(nn.Module):
    """Flattens its conv activations with ``view``: fails on channels-last activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = self.conv(x).relu()
        return self.fc(h.view(h.shape[0], -1))


def test_channels_last_gives_the_same_results_and_the_model_back(digits_model, digits_test, tmp_path, monkeypatch):
    data = digits_test.subset(120)
    attacks = [create_attack("pgd", LINF, steps=5), create_attack("square", LINF, queries=50)]
    ptrs = [t.data_ptr() for t in digits_model.state_dict().values()]
    options = EvalOptions(eps_grid=(), steps_grid=(), sanity=False, batch_size=50)
    with ResultsStore(tmp_path / "r.db") as store:
        runs = {}
        for flag in (True, False):
            monkeypatch.setattr(runtime, "FAST_LAYOUT", flag)
            res = evaluate(digits_model, data, attacks, store, options=options)
            runs[flag] = (res.summary["robust_accuracy"], [(r.robust, r.broken_by) for r in store.samples(res.run_id)],
                          store.get_run(res.run_id)["model_info"]["channels_last"])
    assert runs[True][2] is True and runs[False][2] is False  # recorded with the run
    assert runs[True][:2] == runs[False][:2]
    # The caller's very tensors are back, in their own layout.
    assert [t.data_ptr() for t in digits_model.state_dict().values()] == ptrs
    assert all(t.is_contiguous() for t in digits_model.state_dict().values())


def test_attacks_run_channels_last_in_fast_runtime_and_it_gives_the_model_back(digits_model, digits_test, monkeypatch):
    x, y = digits_test.x[:64], digits_test.y[:64]
    conv = next(m for m in digits_model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    seen = []
    hook = conv.register_forward_pre_hook(lambda m, args: seen.append(m.weight.is_contiguous()))
    results = {}
    for flag in (True, False):
        monkeypatch.setattr(runtime, "FAST_LAYOUT", flag)
        seen.clear()
        with fast_runtime(digits_model, x) as info:
            assert info == {"channels_last": flag, "subnormal_weights_zeroed": 0}
            seen.clear()  # the probe's passes
            results[flag] = create_attack("pgd", LINF, steps=5).run(digits_model, x, y, torch.Generator().manual_seed(0))
        assert not any(seen) if flag else all(seen)  # channels-last weights during the attack, or not
        # Outside the context an attack runs the model in the layout it has.
        seen.clear()
        alone = create_attack("pgd", LINF, steps=5).run(digits_model, x, y, torch.Generator().manual_seed(0))
        assert seen and all(seen)
    hook.remove()
    assert torch.equal(alone.x_adv, results[False].x_adv)
    assert torch.equal(results[True].success, results[False].success)
    # Float rounding differs between layouts: a near-zero gradient coordinate may flip its sign.
    assert (results[True].x_adv - results[False].x_adv).abs().gt(1e-5).float().mean() < 0.01
    assert all(t.is_contiguous() for t in digits_model.state_dict().values())


def test_subnormal_weights_are_read_as_zero_and_given_back(digits_model, digits_test, tmp_path, monkeypatch):
    """Weights in the subnormal range (what weight decay leaves of dead units) make CPU arithmetic
    many times slower and change no logit: fast_runtime (which evaluations apply) runs them as zero and
    gives the caller's tensors back, values and all; an attack alone leaves them as they are."""
    model = copy.deepcopy(digits_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p[torch.rand(p.shape, generator=gen) < 0.3] = 1e-39
    tensors = list(model.state_dict().values())
    count = sum(int(runtime.subnormals(t).sum()) for t in tensors)
    assert count > 1000
    ptrs, values = [t.data_ptr() for t in tensors], [t.clone() for t in tensors]
    zeroed = copy.deepcopy(model)
    assert runtime.zero_subnormals_(zeroed.state_dict().values()) == count
    x, y = digits_test.x[:64], digits_test.y[:64]
    with torch.no_grad():
        assert torch.equal(model(x), zeroed(x))  # the same function, bit for bit

    def square_seeing_subnormals(queries, fast=True):
        """Square's result (in fast_runtime, or not), and the subnormal weight count each layer saw at
        each of its calls."""
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(int(runtime.subnormals(m.weight).sum())))
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with fast_runtime(model, x) if fast else contextlib.nullcontext():
                seen.clear()  # the probe's passes
                return create_attack("square", LINF, queries=queries).run(model, x, y, torch.Generator().manual_seed(1)), seen
        finally:
            for h in hooks:
                h.remove()

    result, seen = square_seeing_subnormals(30)
    assert seen and not any(seen)  # none left during the attack
    _, seen = square_seeing_subnormals(5, fast=False)
    assert seen and all(seen)  # an attack alone does not touch the weights
    same = create_attack("square", LINF, queries=30).run(zeroed, x, y, torch.Generator().manual_seed(1))
    assert torch.equal(result.x_adv, same.x_adv) and torch.equal(result.success, same.success)
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(model, digits_test.subset(50), [create_attack("fgsm", LINF)], store,
                       options=EvalOptions(eps_grid=(), steps_grid=(), sanity=False))
        assert store.get_run(res.run_id)["model_info"]["subnormal_weights_zeroed"] == count
    after = list(model.state_dict().values())
    assert [t.data_ptr() for t in after] == ptrs and all(torch.equal(a, b) for a, b in zip(after, values))
    # Switched off (ROBUSTLAB_ZERO_SUBNORMALS=0), the model runs as given.
    monkeypatch.setattr(runtime, "ZERO_SUBNORMALS", False)
    _, seen = square_seeing_subnormals(5)
    assert seen and all(seen)


def test_fast_runtime_runs_a_model_that_fails_channels_last_as_given(monkeypatch):
    torch.manual_seed(0)
    model, x = ViewNet(), torch.rand(16, 3, 8, 8)
    y = model(x).argmax(dim=1)
    results = {}
    for flag in (True, False):
        monkeypatch.setattr(runtime, "FAST_LAYOUT", flag)
        with fast_runtime(model, x) as info:
            assert info["channels_last"] is False  # the probe found it fails
            results[flag] = create_attack("pgd", LINF, steps=3).run(model, x, y, torch.Generator().manual_seed(0))
    # The very same attack as without the fast layout.
    assert torch.equal(results[True].x_adv, results[False].x_adv)
    assert torch.equal(results[True].forwards, results[False].forwards)
    assert all(p.is_contiguous() for p in model.parameters())
    assert model in runtime.UNSAFE  # remembered: the next fast_runtime does not try again


def test_channels_last_is_used_only_where_it_is_safe():
    x = torch.rand(4, 3, 8, 8)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with channels_last(conv, x) as fast:
        assert fast and conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert conv[0].weight.is_contiguous()
    for model in (ViewNet(), nn.Sequential(nn.Flatten(), nn.Linear(192, 10))):  # view() fails; no conv at all
        with channels_last(model, x) as fast:
            assert not fast and all(p.is_contiguous() for p in model.parameters())
        assert model(x).shape == (4, 10)
    with channels_last(conv, x, enabled=False) as fast:
        assert not fast and conv[0].weight.is_contiguous()


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 7)), "classes"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0)), "logits of shape"),
        (nn.Sequential(nn.Flatten(), nn.Linear(100, 10)), "has 1x8x8 images and the model fails on them"),
    ],
)
def test_bad_models_fail_clearly_and_leave_the_store_intact(digits_model, digits_test, tmp_path, model, message):
    db = tmp_path / "r.db"
    with ResultsStore(db) as store:
        evaluate(digits_model, digits_test.subset(16), [create_attack("fgsm", LINF)], store, options=FAST)
    before = sqlite3.connect(db).execute("SELECT COUNT(*) FROM adversarial_samples").fetchone()[0]
    with ResultsStore(db) as store:
        with pytest.raises(RobustlabError, match=message):
            evaluate(model, digits_test.subset(16), [create_attack("fgsm", LINF)], store, options=FAST)
        assert len(store.list_runs()) == 1
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM adversarial_samples").fetchone()[0] == before


def test_ensemble_needs_one_threat_model(digits_model, digits_test, tmp_path):
    with ResultsStore(tmp_path / "r.db") as store, pytest.raises(RobustlabError, match="one threat model"):
        evaluate(digits_model, digits_test.subset(8),
                 [create_attack("fgsm", LINF), create_attack("fgsm", ThreatModel("l2", 1.0))], store)


class FarPGD(Attack):
    """A stand-in minimum-norm attack: PGD at three times the budget, reporting points beyond eps."""

    name = "far-pgd"
    defaults = {}
    minimum_norm = True

    def _attack(self, model, x, y, generator):
        return create_attack("pgd", self.threat.with_eps(3 * self.threat.eps), steps=10).run(model, x, y, generator)


class BlackBoxPGD(FarPGD):
    """Pretends to be score-based; really PGD at the budget (breaks what FGSM missed)."""

    name = "fake-square"
    kind = "score-based"
    minimum_norm = False

    def _attack(self, model, x, y, generator):
        return create_attack("pgd", self.threat, steps=10).run(model, x, y, generator)


def test_minimum_norm_distances_are_recorded_but_only_in_ball_points_count(digits_model, digits_test, tmp_path):
    data = digits_test.subset(128)
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(digits_model, data, [FarPGD(LINF)], store, options=FAST)
        rows = store.samples(res.run_id)
        html = write_report(store, res.run_id, tmp_path / "report")["html"].read_text()
    assert "Minimum-norm attacks (far-pgd)" in html and "white-box" in html
    mn = res.summary["min_norm"]
    assert res.summary["rejected"] == 0  # beyond-eps points of a minimum-norm attack are not rejections
    found = [r for r in rows if r.min_distance is not None]
    assert mn["found"] == len(found) > 0
    for r in rows:
        if r.broken_by is not None:
            assert r.distance <= LINF.eps + 1e-6 and r.min_distance == r.distance
        elif r.min_distance is not None:
            assert r.min_distance > LINF.eps  # found, but outside the ball: still robust at eps
    beyond = sum(1 for r in found if r.min_distance > LINF.eps)
    assert beyond > 0
    # The curve from the distances agrees with the counted robust accuracy at eps.
    at = next(p for p in mn["curve"] if p["eps"] == LINF.eps)
    assert at["robust_accuracy"] == sum(r.robust for r in rows) / len(rows)


def test_black_box_success_after_white_box_is_flagged(digits_model, digits_test, tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(digits_model, digits_test.subset(128), [create_attack("fgsm", LINF), BlackBoxPGD(LINF)],
                       store, options=FAST)
    verdict = {c["name"]: c for c in res.checks}["black-box"]
    assert res.summary["attacks"][1]["broken"] > 0
    assert verdict["status"] in ("warn", "fail") and "fake-square" in verdict["detail"]
    # Out of the points FGSM left robust, not out of all correctly classified ones.
    fgsm, late = res.summary["attacks"]
    left = round(res.summary["clean_accuracy"] * 128) - fgsm["broken"]
    assert f"broke {late['broken']} of {left} points" in verdict["detail"]


def test_evaluation_runs_in_full_float32_and_gives_the_tf32_settings_back(digits_model, digits_test, tmp_path):
    """On recent NVIDIA GPUs PyTorch runs float32 convolutions in TF32 by default, which moves logits
    by about 1e-3: the evaluation turns that off for its duration and restores the caller's flags."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    seen = []
    hook = digits_model.register_forward_pre_hook(
        lambda m, args: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with ResultsStore(tmp_path / "r.db") as store:
            evaluate(digits_model, digits_test.subset(20), [create_attack("fgsm", LINF)], store,
                     options=EvalOptions(eps_grid=(), steps_grid=(), sanity=False))
        assert seen and set(seen) == {(False, False)}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
