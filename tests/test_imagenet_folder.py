"""ImageNet-style validation folders: streamed with the model's resize/crop, labels in the order of a
synset mapping file (so label i is the model's output i), and the whole path from the command line
(a torchvision model from a weights file on such a folder) into the store and the leaderboard."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli import main
from robustlab.data import load_dataset, transform_for_model
from robustlab.data.image_folder import data_fingerprint
from robustlab.errors import RobustlabError
from robustlab.eval.store import ResultsStore
from robustlab.models import load_model
from robustlab.report import build_leaderboard

# Five classes in the model's order; the folder has images of three of them, each in its own colour.
SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
COLOURS = {"n01443537": (255, 0, 0), "n01491361": (0, 255, 0), "n01494475": (0, 0, 255)}
SIZES = [(50, 40), (64, 80), (33, 90)]  # (width, height): every image its own size


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet") / "val"
    for wnid, colour in COLOURS.items():
        for k, size in enumerate(SIZES[:2] if wnid == "n01491361" else SIZES):
            (root / wnid).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, colour).save(root / wnid / f"ILSVRC2012_val_{k:08d}.JPEG", quality=100)
    (root.parent / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}, a name\n" for i, w in enumerate(SYNSETS)))
    return root


def test_streamed_with_the_models_resize_and_crop(folder):
    transform = transform_for_model({"input_size": [32, 32], "resize": 36})
    data = load_dataset("imagenet-val", root=folder, transform=transform, stream=True)
    assert len(data) == 8 and data.image_shape == (3, 32, 32) and not data.in_memory
    assert data.classes == SYNSETS and data.num_classes == 5  # from the mapping file beside the folder
    x, y = data.batch(range(len(data)))
    assert x.shape == (8, 3, 32, 32)
    # Each image keeps its folder's colour through resize and crop, and its label is the mapping's.
    for image, label in zip(x, y.tolist()):
        colour = torch.tensor(COLOURS[SYNSETS[label]], dtype=torch.float32) / 255
        assert torch.allclose(image.mean(dim=(1, 2)), colour, atol=0.02)
    assert y.tolist() == [1] * 3 + [3] * 2 + [4] * 3


def test_class_order_without_a_mapping_and_with_a_wrong_one(folder, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain / "val")
    # The files and labels identify the data wherever the folder lies; one file less is other data.
    shutil.copy(folder.parent / "LOC_synset_mapping.txt", plain)
    same = transform_for_model({"input_size": [16, 16]})
    original = data_fingerprint(load_dataset("imagenet-val", root=folder, transform=same, stream=True))
    assert original is not None and len(original) == 16
    copy = load_dataset("imagenet-val", root=plain / "val", transform=same, stream=True)
    assert original == data_fingerprint(copy.subset(8))
    assert original != data_fingerprint(load_dataset("imagenet-val", root=folder, transform=same, stream=True).subset(7))
    assert data_fingerprint(load_dataset("digits")) is None
    (plain / "LOC_synset_mapping.txt").unlink()
    data = load_dataset("imagenet-val", root=plain, transform=transform_for_model({"input_size": [16, 16]}))
    assert data.classes == sorted(COLOURS) and sorted(set(data.labels.tolist())) == [0, 1, 2]
    (plain / "synsets.txt").write_text("n01440764\nn01443537\n")
    with pytest.raises(RobustlabError, match=r"class folder\(s\) n01491361, n01494475 are not in .*synsets\.txt"):
        load_dataset("imagenet-val", root=plain, transform=transform_for_model({"input_size": [16, 16]}))
    (plain / "synsets.txt").unlink()
    with pytest.raises(RobustlabError, match="images have different sizes"):
        load_dataset("imagenet-val", root=plain)  # no resize: said in one line, naming two files


def _eval(tmp_path: Path, weights: Path, folder: Path, db: Path, capsys) -> dict:
    code = main(["eval", "--model", "torchvision:mobilenet_v3_small", "--weights", str(weights), "--num-classes", "5",
                 "--data", f"imagenet-val:{folder}", "--norm", "linf", "--eps", "1/255", "--attack", "fgsm",
                 "--no-sanity", "--steps-grid", "none", "--batch-size", "8", "--db", str(db), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_cli_torchvision_model_on_an_imagenet_folder(folder, tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=5)  # light: ~0.06 GFLOPs an image
    weights = tmp_path / "mobilenet.pt"
    torch.save(net.state_dict(), weights)
    db = tmp_path / "runs.db"
    out = _eval(tmp_path, weights, folder, db, capsys)
    assert out["n"] == 8 and out["dataset"] == "imagenet-val"
    with ResultsStore(db) as store:
        run = store.get_run(out["run_id"])
        card = run["model_info"]["card"]
        assert run["config"]["model_sha256"] == card["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert card["preprocessing"]["input_size"] == [224, 224] and card["preprocessing"]["resize"] == 256
        assert len(run["config"]["data_fingerprint"]) == 16  # which files: the leaderboard compares like with like
        (model,) = build_leaderboard(store).models.values()
    assert model.sha256 == card["sha256"]  # the leaderboard knows the model by its weights
    # The same weights under another file name are the same model.
    copy = tmp_path / "elsewhere" / "same-weights.pt"
    copy.parent.mkdir()
    shutil.copy(weights, copy)
    assert load_model("torchvision:mobilenet_v3_small", weights=copy, num_classes=5).card.sha256 == model.sha256
    # The images were read at 224 x 224 as torchvision reads them: the same predictions.
    expected = _expected_predictions(net, folder)
    with ResultsStore(db) as store:
        preds = [r.clean_pred for r in store.samples(out["run_id"])]
    assert preds == expected


def _expected_predictions(net, folder: Path) -> list[int]:
    """The torchvision way: resize the shorter side to 256, centre-crop 224, normalize, predict."""
    from PIL import Image
    from torchvision.transforms import functional as F

    files = sorted(p for p in folder.rglob("*.JPEG"))
    preds = []
    with torch.no_grad():
        for f in files:
            with Image.open(f) as im:
                x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            x = F.center_crop(F.resize(x, 256, antialias=True), 224)
            x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
            preds.append(int(net.eval()(x[None]).argmax()))
    return preds


def test_cli_says_when_the_folder_has_fewer_classes_than_the_model(folder, tmp_path, capsys):
    import torchvision

    weights = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None, num_classes=5).state_dict(), weights)
    plain = tmp_path / "plain" / "val"
    shutil.copytree(folder, plain)  # no mapping file: three folders, three labels, five outputs
    code = main(["eval", "--model", "torchvision:mobilenet_v3_small", "--weights", str(weights), "--num-classes", "5",
                 "--data", str(plain),  # a folder path
                 "--norm", "linf", "--eps", "1/255", "--attack", "fgsm", "--db", str(tmp_path / "r.db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("robustlab: error:")
    assert "5 classes but the data has 3" in err[0]
