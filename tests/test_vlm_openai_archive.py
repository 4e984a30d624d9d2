"""OpenAI's TorchScript CLIP archives (the ``.pt`` files of OpenAI's ``clip`` package) load into the
named open_clip architecture, with QuickGELU, and give the source model's zero-shot logits; an archive
of another architecture, or no CLIP at all, is one error line. The archives are built here from a small
random configuration (nothing is downloaded)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from robustlab.errors import RobustlabError
from robustlab.vlm.loading import load_vlm
from robustlab.vlm.open_clip_adapter import is_torchscript_archive
from robustlab.vlm.zeroshot import ZeroShotClassifier, text_classifier

open_clip = pytest.importorskip("open_clip")

# OpenAI's layout: 64-wide attention heads (open_clip infers the head count from the width), GELU in the
# config as in open_clip's ViT-B-32 (OpenAI's weights need QuickGELU: the loader must force it).
ARCH = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
CLASSES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oc_openai_cfg")
    (folder / "robustlab-openai-test.json").write_text(json.dumps(ARCH))
    wide = {**ARCH, "vision_cfg": {**ARCH["vision_cfg"], "width": 128}}
    (folder / "robustlab-openai-wide.json").write_text(json.dumps(wide))
    open_clip.add_model_config(folder)
    return "robustlab-openai-test", "robustlab-openai-wide"


def openai_archive(name: str, path, seed: int = 0):
    """A TorchScript archive in OpenAI's format (float16 weights, ``input_resolution`` in the state dict,
    the attention mask an attribute, not a tensor of the state dict) of a random QuickGELU model of
    architecture ``name``; returns the float32 model it holds."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, load_weights=False, force_quick_gelu=True).eval()
    model.register_buffer("input_resolution", torch.tensor(16))
    open_clip.model.convert_weights_to_lp(model)  # float16, as OpenAI ships them
    mask = model.attn_mask
    del model._buffers["attn_mask"]
    model.attn_mask = mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
    reference = open_clip.create_model(name, pretrained=None, load_weights=False, force_quick_gelu=True).eval()
    state = {k: v.float() for k, v in model.state_dict().items() if k != "input_resolution"}
    reference.load_state_dict(state)
    return reference


def test_an_openai_archive_loads_with_quickgelu_and_gives_the_source_logits(names, tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    reference = openai_archive(names[0], path)
    assert is_torchscript_archive(path)
    vlm, info = load_vlm(f"open_clip:{names[0]}:{path}")
    assert info["weights"] == str(path) and len(info["weights_sha256"]) == 64
    assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in vlm.clip.visual.transformer.resblocks)
    # the source model's own zero-shot logits, built with open_clip's helpers
    tokenizer = open_clip.get_tokenizer(names[0])
    weights = open_clip.build_zero_shot_classifier(reference, tokenizer, CLASSES, TEMPLATES, device="cpu")
    x = torch.rand(4, 3, 16, 16)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = torch.nn.functional.normalize(reference.encode_image((x - mean) / std), dim=-1)
        expected = reference.logit_scale.exp() * image @ weights
        head = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, TEMPLATES))
        got = head(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, torch.zeros_like(expected))
    # the same file given as --weights loads the same model
    again, _ = load_vlm(f"open_clip:{names[0]}", str(path))
    with torch.no_grad():
        assert torch.equal(ZeroShotClassifier(again, text_classifier(again, CLASSES, TEMPLATES))(x), got)


def test_an_archive_of_another_architecture_or_no_clip_is_one_error_line(names, tmp_path):
    wide = tmp_path / "wide.pt"
    openai_archive(names[1], wide)
    with pytest.raises(RobustlabError, match=r"does not match open_clip architecture 'robustlab-openai-test': "
                       r"\d+ of another shape \(first: visual\.") as err:
        load_vlm(f"open_clip:{names[0]}:{wide}")
    assert "\n" not in str(err.value)
    other = tmp_path / "linear.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(other))
    with pytest.raises(RobustlabError, match="is a TorchScript archive but not an OpenAI CLIP model") as err:
        load_vlm(f"open_clip:{names[0]}", str(other))
    assert "\n" not in str(err.value)
    with pytest.raises(RobustlabError, match="names its weights file; leave out --weights"):
        load_vlm(f"open_clip:{names[0]}:{wide}", str(wide))
    state_dict_file = tmp_path / "plain.pt"
    torch.save(open_clip.create_model(names[0], pretrained=None, load_weights=False).state_dict(), state_dict_file)
    assert not is_torchscript_archive(state_dict_file)  # torch.save zips are state dicts, not archives
