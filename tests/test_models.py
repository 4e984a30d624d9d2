"""robustlab.models: architectures, Normalize, checkpoints with cards, load_model specs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.errors import RobustlabError
from robustlab.models import (
    MODELS,
    LoadedModel,
    ModelCard,
    Normalize,
    create_model,
    list_models,
    load_checkpoint,
    load_model,
    model_config,
    save_checkpoint,
)

STABLE_NAMES = [
    "digits_mlp",
    "digits_cnn",
    "smallcnn",
    "lenet",
    "preact_resnet18",
    "wrn_28_10",
    "wrn_34_10",
    "wideresnet",
    "cifar_cnn",
]
BIG = {"preact_resnet18", "wrn_28_10", "wrn_34_10"}  # forward a single image only
OPTIONS = {"wideresnet": {"depth": 16, "widen_factor": 1}}  # the cheap WRN-16-1
PARAMS = {  # parameter counts of the published architectures (10 classes)
    "smallcnn": 312_202,
    "lenet": 61_706,
    "preact_resnet18": 11_172_170,
    "wrn_28_10": 36_479_194,
    "wrn_34_10": 46_160_474,
    "wideresnet": 175_066,  # WRN-16-1
}


def _images(name: str, n: int, seed: int = 0) -> torch.Tensor:
    cfg = model_config(name)
    return torch.rand(n, cfg["in_channels"], *cfg["input_size"], generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- architectures


def test_stable_names_are_registered():
    assert set(STABLE_NAMES) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_architecture_maps_images_to_logits(name):
    model = create_model(name, num_classes=7, **OPTIONS.get(name, {})).eval()
    x = _images(name, 1 if name in BIG else 2)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (x.shape[0], 7)
    assert torch.isfinite(logits).all()
    assert isinstance(model.normalize, Normalize)
    cfg = model_config(name)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(cfg["mean"])
    if name in PARAMS:  # the published sizes (count the head for 10 classes)
        head = [m for m in model.net.modules() if isinstance(m, nn.Linear)][-1]
        count = sum(p.numel() for p in model.parameters()) + 3 * (head.in_features + 1)
        assert count == PARAMS[name]


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "smallcnn", "lenet", "cifar_cnn", "wideresnet"])
def test_architectures_accept_in_channels(name):
    cfg = model_config(name)
    channels = 3 if cfg["in_channels"] == 1 else 1
    model = create_model(name, in_channels=channels, mean=0.5, std=0.25, **OPTIONS.get(name, {})).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, *cfg["input_size"]))
    assert out.shape == (2, 10)
    assert model.normalize.mean.shape == (1, channels, 1, 1)


def test_model_config_and_defaults():
    cfg = model_config("preact_resnet18")
    assert cfg["input_size"] == (32, 32) and cfg["in_channels"] == 3 and cfg["dataset"] == "cifar10"
    assert cfg["mean"] == (0.4914, 0.4822, 0.4465) and cfg["std"] == (0.2471, 0.2435, 0.2616)
    small = model_config("smallcnn")
    assert (small["in_channels"], small["input_size"], small["mean"], small["std"]) == (1, (28, 28), (0.0,), (1.0,))
    cfg["mean"] = (1.0,)  # a copy: the registry is not mutated
    assert model_config("preact_resnet18")["mean"] == (0.4914, 0.4822, 0.4465)


def test_smallcnn_is_the_trades_architecture():
    net = create_model("smallcnn").net
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert [f.out_features for f in fcs] == [200, 200, 10]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 2
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.5]
    assert [m.p for m in create_model("smallcnn", dropout=0.0).net.modules() if isinstance(m, nn.Dropout)] == [0.0]


def test_create_model_rejects_bad_arguments():
    with pytest.raises(RobustlabError, match="known: .*smallcnn"):
        create_model("resnet9000")
    with pytest.raises(RobustlabError, match="no option colour"):
        create_model("smallcnn", colour="red")
    with pytest.raises(RobustlabError, match="depth must be 6n \\+ 4"):
        create_model("wideresnet", depth=20, widen_factor=1)
    with pytest.raises(RobustlabError, match="mean="):
        create_model("preact_resnet18", in_channels=1)  # CIFAR mean has 3 values: say which to use
    with pytest.raises(RobustlabError, match="2 values"):
        create_model("preact_resnet18", mean=(0.5, 0.5))
    with pytest.raises(RobustlabError, match="num_classes"):
        create_model("lenet", num_classes=0)


# ---------------------------------------------------------------------------------- Normalize


def test_normalize_math_and_buffers():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.rand(4, 3, 5, 6)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25, x[:, 2] / 2.0], dim=1)
    torch.testing.assert_close(norm(x), expected)
    assert norm.mean.shape == norm.std.shape == (1, 3, 1, 1)
    assert set(norm.state_dict()) == {"mean", "std"}
    assert not list(norm.parameters())
    assert "mean=(0.5, 0.25, 0)" in repr(norm) and "std=(0.5, 0.25, 2)" in repr(norm)
    # gradients flow to the input (attacks differentiate through it): d/dx = 1/std
    x.requires_grad_(True)
    norm(x).sum().backward()
    torch.testing.assert_close(x.grad[:, 2], torch.full_like(x.grad[:, 2], 0.5))


def test_normalize_rejects_bad_values():
    with pytest.raises(RobustlabError, match="> 0"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(RobustlabError, match="std has"):
        Normalize((0.5, 0.5), (1.0,))
    with pytest.raises(RobustlabError, match="3-channel"):
        Normalize((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))(torch.rand(1, 1, 4, 4))


# ---------------------------------------------------------------------------------- checkpoints


def _bn_model() -> tuple[nn.Module, ModelCard]:
    """A WRN-10-1 with non-trivial batch-norm statistics and its card."""
    torch.manual_seed(0)
    model = create_model("wideresnet", num_classes=5, depth=10, widen_factor=1)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))  # move running stats away from their init
    card = ModelCard.for_architecture(
        "wideresnet",
        num_classes=5,
        arch_kwargs={"depth": 10, "widen_factor": 1},
        training={"epochs": 1, "lr": 0.1, "attack": "pgd"},
        clean_accuracy=0.5,
        robust_accuracy={"linf:8/255": 0.25},
        notes="test",
    )
    return model, card


def test_save_load_round_trip(tmp_path):
    model, card = _bn_model()
    weights = save_checkpoint(model, tmp_path / "sub" / "wrn", card)
    assert weights == tmp_path / "sub" / "wrn.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file()

    loaded, loaded_card = load_checkpoint(weights)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for key, value in card.to_dict().items():
        if key != "sha256":
            assert getattr(loaded_card, key) == getattr(card, key), key
    assert len(loaded_card.sha256) == 64
    assert loaded_card.input_size == (32, 32) and loaded_card.dataset == "cifar10"
    assert loaded_card.mean == (0.4914, 0.4822, 0.4465)
    on_disk = json.loads(weights.with_suffix(".json").read_text())
    assert on_disk["arch_kwargs"] == {"depth": 10, "widen_factor": 1} and on_disk["sha256"] == loaded_card.sha256


def test_shared_tensors_are_saved(tmp_path):
    model = create_model("digits_mlp", hidden=(64, 64))  # 8*8 inputs: two Linear(64, 64) layers
    model.net[3].weight = model.net[1].weight  # tie them
    card = ModelCard.for_architecture("digits_mlp", arch_kwargs={"hidden": (64, 64)})
    loaded, loaded_card = load_checkpoint(save_checkpoint(model, tmp_path / "tied.safetensors", card))
    assert loaded_card.arch_kwargs == card.arch_kwargs == {"hidden": [64, 64]}
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_tampered_weights_fail_the_hash_check(tmp_path):
    model, card = _bn_model()
    weights = save_checkpoint(model, tmp_path / "m.safetensors", card)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits of the last weight byte
    weights.write_bytes(bytes(data))
    with pytest.raises(RobustlabError, match="sha256"):
        load_checkpoint(weights)


def test_missing_card_is_a_clear_error(tmp_path):
    model, card = _bn_model()
    weights = save_checkpoint(model, tmp_path / "m.safetensors", card)
    weights.with_suffix(".json").unlink()
    with pytest.raises(RobustlabError, match="m.json"):
        load_checkpoint(weights)
    with pytest.raises(RobustlabError, match="not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_card_that_does_not_fit_the_model_is_refused(tmp_path):
    model = create_model("lenet")
    with pytest.raises(RobustlabError, match="does not match the card"):
        save_checkpoint(model, tmp_path / "m", ModelCard.for_architecture("smallcnn"))
    with pytest.raises(RobustlabError, match="differs from the card"):
        save_checkpoint(model, tmp_path / "m", ModelCard.for_architecture("lenet", mean=(0.5,), std=(0.5,)))


def test_weights_that_do_not_fit_the_card_are_refused(tmp_path):
    model, card = _bn_model()
    weights = save_checkpoint(model, tmp_path / "m.safetensors", card)
    data = json.loads(weights.with_suffix(".json").read_text())
    data["num_classes"] = 6
    weights.with_suffix(".json").write_text(json.dumps(data))
    with pytest.raises(RobustlabError, match="wrong shape: net.fc.weight"):
        load_checkpoint(weights)


def test_card_from_dict(tmp_path):
    card = ModelCard.for_architecture("lenet", training={"epochs": 3})
    data = card.to_dict()
    json.dumps(data)  # JSON-serializable
    data["from_the_future"] = 1
    assert ModelCard.from_dict(data) == card
    del data["mean"], data["architecture"]
    with pytest.raises(RobustlabError, match="architecture, mean"):
        ModelCard.from_dict(data)
    with pytest.raises(RobustlabError, match="one per channel"):
        ModelCard.from_dict({**card.to_dict(), "mean": [0.1, 0.2]})
    with pytest.raises(RobustlabError, match="JSON-serializable"):
        bad = ModelCard.for_architecture("lenet", training={"optimizer": object()})
        save_checkpoint(create_model("lenet"), tmp_path / "m", bad)


def test_raw_torch_state_dict_with_a_card(tmp_path):
    model = create_model("lenet").eval()
    path = tmp_path / "lenet.pt"
    torch.save(model.net.state_dict(), path)  # a bare architecture state dict: normalization from the card
    card = ModelCard.for_architecture("lenet")
    path.with_suffix(".json").write_text(json.dumps(card.to_dict()))  # no sha256: loads with a warning
    with pytest.warns(UserWarning, match="no sha256"):
        loaded, _ = load_checkpoint(path)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    with pytest.raises(RobustlabError, match="raw state dict"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_checkpoint(path)


# ---------------------------------------------------------------------------------- load_model


ENTRY = """
import torch.nn as nn
from robustlab.models import create_model

NOT_A_FUNCTION = 3

def build():
    return create_model("digits_mlp", num_classes=4)

def needs_args(width):
    return nn.Identity()

def not_a_model():
    return "model"
"""


def test_load_model_from_a_checkpoint(tmp_path):
    model, card = _bn_model()
    weights = save_checkpoint(model, tmp_path / "m.safetensors", card)
    loaded = load_model(str(weights))
    assert isinstance(loaded, LoadedModel)
    assert (loaded.source, loaded.spec, loaded.card.architecture) == ("checkpoint", str(weights), "wideresnet")
    assert not loaded.model.training


def test_load_model_from_an_entry_point_file(tmp_path):
    (tmp_path / "zoo_file.py").write_text(ENTRY)
    loaded = load_model(f"{tmp_path / 'zoo_file.py'}:build")
    assert (loaded.source, loaded.card) == ("entry_point", None)
    # The user's module keeps the mode it was returned in: the evaluation runner reports a model handed
    # over in train mode, which it could not if loading silently switched it to eval mode.
    assert loaded.model.training
    assert loaded.model(torch.rand(2, 1, 8, 8)).shape == (2, 4)


def test_load_model_from_an_entry_point_module(tmp_path, monkeypatch):
    package = tmp_path / "my_zoo_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(ENTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("my_zoo_pkg.models:build")
    assert loaded.source == "entry_point"
    assert loaded.model(torch.rand(1, 1, 8, 8)).shape == (1, 4)


def test_load_model_from_the_registry_warns():
    with pytest.warns(UserWarning, match="untrained"):
        loaded = load_model("digits_cnn")
    assert (loaded.source, loaded.card) == ("registry", None)
    assert not loaded.model.training


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{dir}/missing.py:build", "not found"),
        ("{dir}/zoo_bad.py:nothing", "'nothing' not found"),
        ("{dir}/zoo_bad.py:NOT_A_FUNCTION", "not a function"),
        ("{dir}/zoo_bad.py:needs_args", "requires argument"),
        ("{dir}/zoo_bad.py:not_a_model", "must return a torch.nn.Module"),
        ("no_such_module_xyz.models:build", "cannot import module"),
        ("{dir}/missing.safetensors", "not found"),
        ("resnet9000", "entry point.*registry name.*digits_cnn"),
        ("", "model spec is one of"),
    ],
)
def test_bad_specs_are_clear_errors(tmp_path, spec, message):
    (tmp_path / "zoo_bad.py").write_text(ENTRY)
    with pytest.raises(RobustlabError, match=message):
        load_model(spec.format(dir=tmp_path))


# ---------------------------------------------------------------------------------- sanity: it learns


def test_digits_cnn_learns_sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    torch.manual_seed(0)
    model = create_model("digits_cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        for idx in torch.randperm(len(x_train)).split(64):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.9
