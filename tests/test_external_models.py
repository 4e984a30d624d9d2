"""Models people already have, from weights on disk (nothing downloaded): torchvision and timm
architectures by name, registry architectures with a state dict, RobustBench's zoo (when installed);
logits equal the directly built model's; each failure is one line."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models import Normalize, create_model, load_model

tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return tvm.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _expected(net: nn.Module, x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    with torch.no_grad():
        return net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_torchvision_state_dict_gives_the_same_logits(resnet18, images, tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(resnet18.state_dict(), path)
    loaded = load_model("torchvision:resnet18", weights=path, num_classes=10)
    torch.testing.assert_close(_logits(loaded.model, images), _expected(resnet18, images), rtol=1e-5, atol=1e-5)
    assert isinstance(loaded.model.normalize, Normalize) and not loaded.model.training
    card = loaded.card
    assert card.source == "external" and card.architecture == "torchvision:resnet18" and card.num_classes == 10
    assert card.preprocessing == {"input_size": [224, 224], "resize": 256, "mean": list(MEAN), "std": list(STD)}
    assert card.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # The card rebuilds the same architecture (so the model can go into the zoo).
    from robustlab.models.entry_points import build_from_entry_point

    rebuilt = build_from_entry_point(card.entry_point, card.arch_kwargs)
    assert rebuilt.state_dict().keys() == loaded.model.state_dict().keys()


def test_checkpoint_layouts_are_accepted(resnet18, images, tmp_path):
    wrapped = tmp_path / "ddp.pth"  # a training checkpoint: the state dict of a DataParallel model, nested
    torch.save({"epoch": 3, "state_dict": OrderedDict((f"module.{k}", v) for k, v in resnet18.state_dict().items())},
               wrapped)
    safetensors = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18.state_dict().items()}, str(safetensors))
    want = _expected(resnet18, images)
    for path in (wrapped, safetensors):
        got = _logits(load_model("torchvision:resnet18", weights=path, num_classes=10).model, images)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_registry_architecture_with_a_state_dict(tmp_path):
    torch.manual_seed(3)
    model = create_model("smallcnn", num_classes=10).eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    full, bare = tmp_path / "full.pt", tmp_path / "bare.pt"
    torch.save(model.state_dict(), full)
    torch.save(model.net.state_dict(), bare)  # without the Normalize layer: the registry's mean/std fill in
    for path in (full, bare):
        loaded = load_model("smallcnn", weights=path)
        torch.testing.assert_close(_logits(loaded.model, x), _logits(model, x))
        assert loaded.source == "external" and loaded.card.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(RobustlabError, match=r"do not fit lenet .*(missing keys|wrong shapes)"):
        load_model("lenet", weights=full)


def _one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(RobustlabError, match=match) as info:
        load_model(**kwargs)
    text = str(info.value)
    assert "\n" not in text and len(text) < 600, text
    return text


def test_errors_are_one_line(resnet18, tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(resnet18.state_dict(), path)
    text = _one_line_error(r"weights file not found: .*missing\.pt", spec="torchvision:resnet18",
                           weights=tmp_path / "missing.pt", num_classes=10)
    text = _one_line_error(r"the weights are for 10 classes \(net\.fc\.\w+ \(10.*pass --num-classes 10",
                           spec="torchvision:resnet18", weights=path, num_classes=100)
    assert "net.fc" in text
    text = _one_line_error(r"do not fit torchvision:resnet34.*missing keys: net\.layer1\.2\.",
                           spec="torchvision:resnet34", weights=path, num_classes=10)
    _one_line_error(r"torchvision has no classification architecture 'resnet1800'; did you mean resnet18",
                    spec="torchvision:resnet1800", weights=path, num_classes=10)
    pickled = tmp_path / "model.pt"
    torch.save(resnet18, pickled)  # a whole pickled module: refused, never unpickled
    _one_line_error(r"cannot read .*model\.pt with torch\.load\(weights_only=True\)", spec="torchvision:resnet18",
                    weights=pickled, num_classes=10)
    notes = tmp_path / "notes.pt"
    torch.save({"epoch": 1, "lr": 0.1}, notes)
    _one_line_error(r"holds no state dict of tensors", spec="torchvision:resnet18", weights=notes, num_classes=10)
    _one_line_error(r"--num-classes must be a positive integer, got 0", spec="torchvision:resnet18", weights=path,
                    num_classes=0)
    _one_line_error(r"--weights and --num-classes go with", spec="zoo-less-name", weights=path)
    with pytest.warns(UserWarning, match="random"):
        assert load_model("torchvision:resnet18", num_classes=10).card.sha256 == ""


def test_timm_architecture(tmp_path, images):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'robustlab[timm]')")
    torch.manual_seed(4)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    path = tmp_path / "timm.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model("timm:resnet18", weights=path, num_classes=10)
    cfg = net.pretrained_cfg
    torch.testing.assert_close(_logits(loaded.model, images), _expected(net, images, cfg["mean"], cfg["std"]),
                               rtol=1e-5, atol=1e-5)
    assert loaded.card.preprocessing["input_size"] == [224, 224]
    assert loaded.card.preprocessing["crop_pct"] == pytest.approx(cfg["crop_pct"])
    _one_line_error(r"timm has no architecture 'resnet1800'", spec="timm:resnet1800", weights=path, num_classes=10)


def test_robustbench_architecture(tmp_path):
    try:
        import robustbench  # noqa: F401
    except ImportError:
        text = _one_line_error(r"robustbench: models need the optional robustbench package",
                               spec="robustbench:Standard", weights=tmp_path / "x.pt")
        assert "separate environment" in text
        pytest.skip("robustbench is not installed (optional extra; it pins an older timm): only its error was checked")
    from robustlab.models.external import robustbench_model

    net = robustbench_model("Wong2020Fast", "cifar10", "Linf").eval()  # a PreAct ResNet-18: quick to build
    path = tmp_path / "wong.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_model("robustbench:cifar10/Linf/Wong2020Fast", weights=path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded.model, x), _logits(net, x))
    assert loaded.card.architecture == "robustbench:cifar10/Linf/Wong2020Fast"
    assert loaded.card.preprocessing == {"input_size": [32, 32]}
    _one_line_error(r"RobustBench model 'Wong2020Fast' is in several zoos; write one of: cifar10/Linf/Wong2020Fast, "
                    r"imagenet/Linf/Wong2020Fast", spec="robustbench:Wong2020Fast", weights=path)
    _one_line_error(r"RobustBench's model zoo has no model 'Wong2020Fastt'.*did you mean Wong2020Fast",
                    spec="robustbench:Wong2020Fastt", weights=path)
