"""robustlab.models: architectures, Normalize, checkpoints with cards, load_model specs."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY_NET, save_tiny_net
from safetensors.torch import load_file

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
GOLDEN = Path(__file__).parent / "golden"
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
    dense = model_config(name)["task"] == "segmentation"  # per-pixel logits at the input's size
    assert logits.shape == ((x.shape[0], 7, *x.shape[2:]) if dense else (x.shape[0], 7))
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
    del data["preprocessing"]["mean"], data["architecture"]
    with pytest.raises(RobustlabError, match="architecture, preprocessing.mean"):
        ModelCard.from_dict(data)
    two_channels = {**card.preprocessing, "mean": [0.1, 0.2], "std": [0.3, 0.3]}
    with pytest.raises(RobustlabError, match="one per channel"):
        ModelCard.from_dict({**card.to_dict(), "preprocessing": two_channels})
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


# ---------------------------------------------------------------------------------- cards for any model


def test_entry_point_model_round_trip(tmp_path, monkeypatch):
    model, weights = save_tiny_net(tmp_path / "ckpt", width=12)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["source"] == "entry-point" and card["architecture"] is None
    # The file is recorded with an absolute path, so the checkpoint loads from anywhere.
    assert card["entry_point"] == f"{tmp_path / 'ckpt' / 'tiny_net.py'}:build"
    assert card["arch_kwargs"] == {"width": 12} and card["defense"] == []
    assert card["preprocessing"] == {"input_size": [8, 8]} and len(card["sha256"]) == 64
    monkeypatch.chdir(tmp_path)
    loaded = load_model(str(weights))
    assert (loaded.source, loaded.defense, loaded.card.source) == ("checkpoint", [], "entry-point")
    assert not loaded.model.training and loaded.card.mean is None and loaded.card.input_size == (8, 8)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    # Weights of other kwargs do not fit what the card builds: refused before anything is written.
    other = ModelCard.for_entry_point(f"{tmp_path / 'ckpt' / 'tiny_net.py'}:build", {"width": 5})
    with pytest.raises(RobustlabError, match="does not match the card's entry point .*wrong shape"):
        save_checkpoint(model, tmp_path / "other.safetensors", other)
    assert not (tmp_path / "other.safetensors").exists()


def test_external_model_from_a_module_entry_point(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    card = ModelCard.for_entry_point("torch.nn:Linear", {"in_features": 64, "out_features": 10}, source="external")
    loaded, loaded_card = load_checkpoint(save_checkpoint(model, tmp_path / "linear", card))
    assert (loaded_card.source, loaded_card.entry_point) == ("external", "torch.nn:Linear")
    x = torch.rand(4, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_defense_list_round_trips(tmp_path):
    defense = [{"name": "jpeg", "params": {"quality": 75}}, {"name": "bit-depth"}]
    model, weights = save_tiny_net(tmp_path, defense=defense)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["source"] == "defended"
    assert card["defense"] == [{"name": "jpeg", "params": {"quality": 75}}, {"name": "bit-depth", "params": {}}]
    loaded = load_model(str(weights))
    assert loaded.defense == card["defense"] and loaded.card == ModelCard.from_dict(card)
    loaded.defense[0]["params"]["quality"] = 1  # a copy: the card is not changed through it
    assert loaded.card.defense[0]["params"]["quality"] == 75
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():  # the bare model: the defenses are the caller's to apply
        assert torch.equal(model(x), loaded.model(x))
    # A registry model behind a defense: its card keeps the architecture it is rebuilt from.
    registry = ModelCard.for_architecture("digits_mlp").with_defense([{"name": "median", "params": {"k": 3}}])
    _, back = load_checkpoint(save_checkpoint(create_model("digits_mlp"), tmp_path / "mlp", registry))
    assert (back.source, back.architecture, back.defense) == ("defended", "digits_mlp", registry.defense)


def test_old_card_loads_unchanged(tmp_path):
    """A checkpoint written by the release before cards had source/preprocessing/defense."""
    for suffix in (".json", ".safetensors"):
        shutil.copyfile(GOLDEN / f"digits_cnn{suffix}", tmp_path / f"old{suffix}")
    text = (tmp_path / "old.json").read_text()
    assert "source" not in json.loads(text)
    loaded = load_model(str(tmp_path / "old.safetensors"))
    card = loaded.card
    assert (card.source, card.architecture, card.entry_point, card.defense, loaded.defense) == (
        "registry", "digits_cnn", None, [], [])
    assert card.preprocessing == {"input_size": [8, 8], "mean": [0.3053], "std": [0.3761]}
    assert (card.input_size, card.mean, card.std) == ((8, 8), (0.3053,), (0.3761,))
    assert card.sha256 == json.loads(text)["sha256"] and card.robustlab_version == "0.1.0"
    assert (tmp_path / "old.json").read_text() == text  # loading never rewrites a card
    reference = create_model("digits_cnn", mean=(0.3053,), std=(0.3761,))
    reference.load_state_dict(load_file(str(tmp_path / "old.safetensors")))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reference.eval()(x), loaded.model(x))


def _one_line_error(path, match):
    with pytest.raises(RobustlabError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_cards_that_cannot_be_honoured_are_one_line_errors(tmp_path):
    _, weights = save_tiny_net(tmp_path)
    card_file = weights.with_suffix(".json")
    card = json.loads(card_file.read_text())
    # The entry point's function was renamed, then its file was removed.
    (tmp_path / "tiny_net.py").write_text(TINY_NET.replace("def build(", "def make("))
    _one_line_error(weights, "cannot rebuild the model of .*tiny.safetensors from its card: "
                             ".*'build' not found in .*tiny_net.py$")
    (tmp_path / "tiny_net.py").unlink()
    _one_line_error(weights, "cannot rebuild .*entry point file not found: .*tiny_net.py")
    # Arguments the entry point does not take.
    (tmp_path / "tiny_net.py").write_text(TINY_NET)
    card_file.write_text(json.dumps({**card, "arch_kwargs": {"depth": 3}}))
    _one_line_error(weights, "cannot rebuild .*takes no argument.* depth")
    # The weights were changed after the card was written.
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    _one_line_error(weights, "does not match its card .*sha256")
    # A source this release does not know.
    card_file.write_text(json.dumps({**card, "source": "magic"}))
    _one_line_error(weights, "unknown source 'magic'; expected one of registry, entry-point, defended, external")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"source": "entry-point"}, "source 'entry-point' needs an entry_point"),
        ({"source": "external", "entry_point": "not an entry point"}, "entry_point must be"),
        ({"source": "defended", "entry_point": "m:f"}, "'defended' needs a non-empty defense list"),
        ({"source": "entry-point", "entry_point": "m:f", "defense": [{"name": "jpeg"}]}, "has source 'defended'"),
        ({"source": "defended", "entry_point": "m:f", "defense": [{"params": {}}]}, "every defense needs a name"),
        ({"source": "defended", "entry_point": "m:f", "defense": [{"name": "jpeg", "quality": 7}]},
         "unknown key.*quality.*params"),
        ({"source": "registry", "entry_point": "m:f", "architecture": "lenet"}, "registry model has no entry_point"),
        ({"source": "entry-point", "entry_point": "m:f", "preprocessing": {"input_size": [8]}}, "input_size must be"),
        ({"source": "entry-point", "entry_point": "m:f", "preprocessing": {"crop": 0}}, "crop must be"),
        ({"source": "entry-point", "entry_point": "m:f", "preprocessing": {"mean": [0.5], "std": [0.5, 0.5]}},
         "one value per channel"),
        ({"architecture": "lenet"}, "missing required field.*num_classes, in_channels, preprocessing.input_size"),
    ],
)
def test_malformed_cards_are_refused(fields, message):
    with pytest.raises(RobustlabError, match=message):
        ModelCard(**fields)


def test_card_keeps_preprocessing_for_streaming_loaders():
    streaming = {"resize": 32, "crop": [28, 28], "interpolation": "bilinear"}
    card = ModelCard.for_architecture("smallcnn", preprocessing=streaming)
    assert card.preprocessing == {"input_size": [28, 28], "mean": [0.0], "std": [1.0],
                                  "resize": 32, "crop": [28, 28], "interpolation": "bilinear"}
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


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
