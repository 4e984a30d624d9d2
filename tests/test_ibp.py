"""Interval bound propagation and CROWN-IBP: bounds hold for every sampled point of the ball, agree
with bounds computed by hand, refuse what they cannot bound with one line naming the layer; the IBP
recipe lowers its loss; the verified protocol's certificates survive PGD on a trained model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from robustlab.certify.ibp import interval_bounds, margin_bounds, verify, worst_margin
from robustlab.errors import RobustlabError
from robustlab.eval.metrics import VerifiedAccuracy
from robustlab.eval.protocols import PROTOCOLS
from robustlab.eval.protocols.verified import VerifiedProtocol
from robustlab.eval.runner import run
from robustlab.eval.store import ResultsStore
from robustlab.models import Normalize, create_model
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective, train


def _net(pooling: bool = True) -> nn.Sequential:
    """Every supported layer kind, nested; BatchNorm with non-trivial statistics; eval mode."""
    torch.manual_seed(0)
    body = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    if pooling:
        body += [nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2)]
    else:
        body += [nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU()]
    net = nn.Sequential(Normalize(0.3, 0.4), nn.Sequential(*body), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(),
                        nn.Dropout(0.2), nn.Linear(16, 5))
    bn = net[1][1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-1.5, 1.5)  # negative scales too
    return net.eval()


def _samples(x: torch.Tensor, eps: float, norm: str, draws: int, gen: torch.Generator) -> torch.Tensor:
    """Points of the ball (in the box): random vertices and interior points (Linf), random directions
    at random radii and on the sphere (L2)."""
    shape = (draws, *x.shape)
    if norm == "linf":
        d = torch.rand(shape, generator=gen) * 2 - 1
        d[: draws // 2] = d[: draws // 2].sign()  # vertices of the cube
        d = d * eps
    else:
        d = torch.randn(shape, generator=gen)
        d = d / d.flatten(2).norm(dim=2)[..., None, None, None]
        r = torch.rand(draws, x.shape[0], 1, 1, 1, generator=gen)
        r[: draws // 2] = 1.0
        d = d * eps * r
    return (x.unsqueeze(0) + d).clamp(0, 1)


@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("l2", 0.3)])
@pytest.mark.parametrize("pooling", [True, False])
def test_bounds_contain_every_sampled_output(norm, eps, pooling):
    net = _net(pooling)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=gen)
    y = net(x).argmax(1)
    lo, hi = interval_bounds(net, x, eps, norm)
    margins = {"ibp": margin_bounds(net, x, y, eps, norm, "ibp")}
    if not pooling:
        margins["crown-ibp"] = margin_bounds(net, x, y, eps, norm, "crown-ibp")
    with torch.no_grad():
        z = net(_samples(x, eps, norm, 400, gen).flatten(0, 1)).view(400, 6, 5)
    assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all()
    true_margin = (z.gather(2, y.view(1, 6, 1).expand(400, 6, 1)) - z).min(dim=0).values
    for method, m in margins.items():
        assert (m <= true_margin + 1e-5).all(), method
        assert (m.gather(1, y[:, None]) == 0).all()
    assert (hi - lo).min() > 0  # not trivially tight: the test would catch a wrong sign


def _hand_net() -> nn.Sequential:
    """h = relu([[1, -1], [1, 1]] x + [0, -1]); z = [[1, 1], [1, -1]] h."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    return net.eval()


def test_hand_computed_bounds_of_a_two_layer_net():
    # At x = (0.5, 0.5), Linf 0.1: both pre-activations lie in [-0.2, 0.2], so h in [0, 0.2]^2,
    # z0 = h0 + h1 in [0, 0.4], z1 = h0 - h1 in [-0.2, 0.2]. Subtracting intervals bounds z0 - z1 by
    # -0.2; eliding the last layer gives 2 * h1 >= 0, the true minimum (at x0 + x1 <= 1).
    net, x, y = _hand_net(), torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    lo, hi = interval_bounds(net, x, 0.1, "linf")
    assert torch.allclose(lo, torch.tensor([[0.0, -0.2]]), atol=1e-6)
    assert torch.allclose(hi, torch.tensor([[0.4, 0.2]]), atol=1e-6)
    assert torch.allclose(margin_bounds(net, x, y, 0.1, "linf", "ibp"), torch.zeros(1, 2), atol=1e-6)
    assert torch.allclose(margin_bounds(net, x, y, 0.1, "linf", "crown-ibp"), torch.zeros(1, 2), atol=1e-6)
    # Class 1 against 0: z1 - z0 = -2 h1 >= -2 * 0.2.
    assert torch.allclose(margin_bounds(net, x, torch.tensor([1]), 0.1, "linf", "ibp"), torch.tensor([[-0.4, 0.0]]))
    # L2 0.1: the first layer's rows have norm sqrt(2), so pre-activations lie in +-0.1 * sqrt(2),
    # tighter than the box's +-0.2: z0 in [0, 0.2 sqrt 2].
    lo, hi = interval_bounds(net, x, 0.1, "l2")
    r = 0.1 * 2**0.5
    assert torch.allclose(lo, torch.tensor([[0.0, -r]]), atol=1e-6)
    assert torch.allclose(hi, torch.tensor([[2 * r, r]]), atol=1e-6)
    # Near the box edge the box clips the ball: at x = (0.05, 0.95), x0 - x1 in [-1, -0.7], not [-1.1, -0.7].
    lo, hi = interval_bounds(nn.Sequential(net[0]), torch.tensor([[0.05, 0.95]]), 0.1, "linf")
    assert torch.allclose(lo[0, 0], torch.tensor(-1.0)) and torch.allclose(hi[0, 0], torch.tensor(-0.7))


def test_eps_zero_gives_the_output():
    net = _net(pooling=False)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = net(x)
        y = z.argmax(1)
        lo, hi = interval_bounds(net, x, 0.0)
        assert torch.allclose(lo, z, atol=1e-5) and torch.allclose(hi, z, atol=1e-5)
        exact = z.gather(1, y[:, None]) - z
        for method in ("ibp", "crown-ibp"):
            assert torch.allclose(margin_bounds(net, x, y, 0.0, "linf", method), exact, atol=1e-5)


def test_crown_ibp_is_at_least_as_tight_as_ibp_in_aggregate(digits_train):
    torch.manual_seed(0)
    model = create_model("digits_mlp", hidden=(64, 32))
    train(model, digits_train, TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0), progress=False)
    model.eval()
    x, y = digits_train.x[:200], digits_train.y[:200]
    with torch.no_grad():
        ibp = worst_margin(margin_bounds(model, x, y, 0.01, "linf", "ibp"), y)
        crown = worst_margin(margin_bounds(model, x, y, 0.01, "linf", "crown-ibp"), y)
    assert crown.mean() > ibp.mean()
    assert (crown >= ibp - 1e-4).float().mean() > 0.9
    assert verify(model, x, y, 0.01, method="crown-ibp")[0].sum() >= verify(model, x, y, 0.01)[0].sum()


def test_unsupported_layers_are_named_with_their_position():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Sequential(nn.Tanh()), nn.Linear(3, 2))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(RobustlabError, match=r"^ibp cannot bound layer 2 '2\.0' \(Tanh\); supported layers: "):
        verify(net, x, y, 0.1)
    with pytest.raises(RobustlabError, match=r"layer 1 'net' \(SmallCNN\)"):
        verify(create_model("smallcnn").eval(), torch.rand(1, 1, 28, 28), torch.tensor([0]), 0.1)
    pooled = _net(pooling=True)
    with pytest.raises(RobustlabError, match=r"^crown-ibp cannot bound layer 4 '1\.3' \(MaxPool2d\)"):
        margin_bounds(pooled, torch.rand(1, 1, 8, 8), torch.tensor([0]), 0.1, "linf", "crown-ibp")
    relu_first = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(RobustlabError, match=r"l2 bounds need a Linear or Conv2d layer first .*layer 0 '0' \(ReLU\)"):
        verify(relu_first, x, y, 0.1, "l2")
    with pytest.raises(RobustlabError, match="linf or l2 balls, not 'l1'"):
        verify(_hand_net(), torch.rand(1, 2), torch.tensor([0]), 0.1, "l1")
    assert "\n" not in str(pytest.raises(RobustlabError, verify, net, x, y, 0.1).value)


def test_batchnorm_in_training_mode_is_refused():
    net = _net().train()
    with pytest.raises(RobustlabError, match=r"^ibp needs eval mode: layer 2 '1\.1' \(BatchNorm2d\) is in training mode"):
        verify(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1)


def test_ibp_recipe_steps_lower_the_ibp_loss():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = create_model("dm_small", input_size=(12, 12))
    x, y = torch.rand(32, 1, 12, 12, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    recipe = create_objective("ibp", ThreatModel("linf", 0.05), ramp_start=0.0, ramp_end=0.0, kappa_start=0.0,
                              kappa_end=0.0)
    recipe.set_progress(0, 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, logs = recipe(model, x, y)
        losses.append(float(logs["bound_loss"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0]
    # The schedule: clean before the ramp; in its middle epsilon and kappa (1 -> 0.5) are halfway.
    ramped = create_objective("crown-ibp", ThreatModel("linf", 0.2), ramp_start=0.2, ramp_end=0.6)
    ramped.set_progress(0, 0.1)
    assert ramped.current_eps() == 0.0 and "bound_loss" not in ramped(model, x, y)[1]
    ramped.set_progress(0, 0.4)
    assert ramped.current_eps() == pytest.approx(0.1) and ramped._between("kappa") == pytest.approx(0.75)
    with pytest.raises(RobustlabError, match="linf or l2 balls"):
        create_objective("ibp", ThreatModel("l1", 1.0))


def test_verified_points_are_never_broken_by_pgd_on_a_trained_model(tmp_path, digits_train, digits_test):
    torch.manual_seed(0)
    model = create_model("digits_mlp", hidden=(64,))
    recipe = create_objective("crown-ibp", ThreatModel("linf", 0.05), ramp_start=0.1, ramp_end=0.5)
    train(model, digits_train, TrainConfig(epochs=6, batch_size=64, lr=2e-3, optimizer="adam", weight_decay=0.0,
                                           seed=0), recipe, progress=False)
    model.eval()
    data = digits_test.subset(150)
    with ResultsStore(tmp_path / "r.db") as store:
        result = run(model, data, VerifiedProtocol("crown-ibp", 0.05, attack_steps=20), store, batch_size=64,
                     progress=False)
        s = result.summary
        rows = store.sample_rows("verified_samples", result.run_id, "main")
    assert s["lies"] == 0 and s["verified_accuracy"] > 0.3
    assert s["verified_accuracy"] <= s["empirical_robust_accuracy"] <= s["clean_accuracy"]
    assert {c["name"]: c["status"] for c in result.checks}["soundness"] == "pass"
    assert all(r["clean_correct"] or not r["verified"] for r in rows)
    assert all((r["margin_lower"] > 0) == bool(r["verified"]) for r in rows if r["clean_correct"])
    assert PROTOCOLS["verified"] is VerifiedProtocol
    key, title = VerifiedProtocol.leaderboard_group(store_run := {"dataset": "digits", "config": {
        "norm": "linf", "eps": 0.05, "method": "crown-ibp"}})
    assert key == ("digits", "linf", 0.05, "crown-ibp") and "crown-ibp" in title and store_run


def test_verified_accuracy_merges_like_one_pass():
    a = VerifiedAccuracy().update([1, 1, 0], [1, 0, 0], [1, 1, 0])
    b = VerifiedAccuracy().update([1, 1], [1, 1], [0, 1])
    whole = VerifiedAccuracy().update([1, 1, 0, 1, 1], [1, 0, 0, 1, 1], [1, 1, 0, 0, 1])
    assert a.merge(b) == whole
    c = whole.compute()
    assert c["verified_accuracy"] == 0.6 and c["empirical_robust_accuracy"] == 0.6 and c["lies"] == 1


def test_run_from_cli_arguments_and_text_summary(tmp_path, digits_test):
    from argparse import Namespace

    from robustlab.eval.protocols.verified import run_from_args
    from robustlab.report.verified import format_verified

    torch.manual_seed(0)
    model = create_model("digits_mlp", hidden=(32,)).eval()
    args = Namespace(method="ibp", eps=0.01, norm="l2", attack_steps=5, seed=0, batch_size=50, model="m", resume=False)
    with ResultsStore(tmp_path / "r.db") as store:
        result = run_from_args(args, model, digits_test.subset(60), store, torch.device("cpu"), {})
    s = result.summary
    assert s["method"] == "ibp" and s["threat"] == {"norm": "l2", "eps": 0.01} and s["n"] == 60
    assert s["soundness_attack"]["params"]["steps"] == 5 and s["lies"] == 0
    text = format_verified(s, result.checks, "m on digits:test")
    assert "verified by ibp" in text and "PGD-5 accuracy" in text and "[pass] soundness" in text
    # A model the method cannot bound is refused before anything is stored.
    args.method = "crown-ibp"
    pooled = create_model("digits_cnn")
    with ResultsStore(tmp_path / "r2.db") as store:
        with pytest.raises(RobustlabError, match=r"^crown-ibp cannot bound layer 3 'net.pool1' \(MaxPool2d\)"):
            run_from_args(args, pooled, digits_test.subset(10), store, torch.device("cpu"), {})
        assert store.list_runs() == []


def test_certify_cli_ibp_json_store_report_and_errors(tmp_path, capsys):
    import json

    from robustlab.cli import main

    ckpt = tmp_path / "mlp.safetensors"
    assert main(["train", "--model", "digits_mlp", "--data", "digits", "--epochs", "2", "--batch-size", "64",
                 "--out", str(ckpt), "--device", "cpu"]) == 0
    capsys.readouterr()
    db = tmp_path / "v.db"
    base = ["certify", "--model", str(ckpt), "--data", "digits", "--samples", "40", "--db", str(db)]
    assert main([*base, "--method", "crown-ibp", "--eps", "1/255", "--attack-steps", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "crown-ibp" and out["threat"]["eps"] == pytest.approx(1 / 255) and out["n"] == 40
    assert out["lies"] == 0 and out["certified_accuracy"] == {f"{1 / 255:g}": out["verified_accuracy"]}
    with ResultsStore(db) as store:
        rows = store.sample_rows("verified_samples", out["run_id"])
    assert len(rows) == 40 and sum(r["verified"] for r in rows) / 40 == pytest.approx(out["verified_accuracy"])
    assert main(["report", out["run_id"], "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Verification report" in page and "No certificate may lie" in page
    assert main([*base, "--method", "crown-ibp", "--eps", "1/255", "--attack-steps", "5", "--samples", "30"]) == 0
    assert main([*base, "--method", "ibp", "--eps", "0.01", "--norm", "l2", "--no-attack-check"]) == 0
    assert "verified by ibp" in capsys.readouterr().out
    from robustlab.report.leaderboard import build_leaderboard

    with ResultsStore(db) as store:
        groups = {g.title: g for g in build_leaderboard(store).groups}
    crown = next(g for t, g in groups.items() if "crown-ibp" in t and "linf" in t)
    assert crown.columns[0] == "verified_accuracy" and crown.full_n == 40
    (row,) = crown.rows  # one model, its two runs; the full-size one is its entry, ranked first
    assert row.rank == 1 and row.n == 40 and len(row.runs) == 2
    assert row.verified_accuracy == pytest.approx(out["verified_accuracy"])
    (l2,) = next(g for t, g in groups.items() if "l2" in t).rows
    assert l2.rank is None and "certificates not checked by an attack" in l2.notes
    assert main([*base, "--method", "ibp"]) == 2
    assert "--method ibp needs --eps E" in capsys.readouterr().err
