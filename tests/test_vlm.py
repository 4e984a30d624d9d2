"""Vision-language models: robustlab's zero-shot logits equal open_clip's and transformers' own on small
random models; checkpoints load from local files only (one error line when they do not fit); prompts
and their errors; the zero-shot protocol over several data sets into the store, report and leaderboard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustlab.errors import RobustlabError
from robustlab.vlm import ZeroShotClassifier, text_classifier
from robustlab.vlm.open_clip_adapter import OpenClipVLM, load_open_clip
from robustlab.vlm.prompts import prompts_for, read_prompts_file

open_clip = pytest.importorskip("open_clip")

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLASSES = ["cat", "dog", "ship", "seven"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "the {}."]


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    """A tiny open_clip architecture registered under a name (as a user's config file would be)."""
    folder = tmp_path_factory.mktemp("oc_cfg")
    (folder / "robustlab-tiny-test.json").write_text(json.dumps(TINY))
    other = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 48}}
    (folder / "robustlab-tiny-wide.json").write_text(json.dumps(other))
    open_clip.add_model_config(folder)
    return "robustlab-tiny-test"


@pytest.fixture(scope="module")
def tiny(tiny_name):
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_name, pretrained=None, load_weights=False).eval()
    return model, OpenClipVLM(model, open_clip.get_tokenizer(tiny_name), tiny_name)


def test_open_clip_zero_shot_logits_equal_open_clips_own(tiny):
    model, vlm = tiny
    tokenizer = open_clip.get_tokenizer("robustlab-tiny-test")
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, TEMPLATES))(x)
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSES, TEMPLATES, device="cpu")
    with torch.no_grad():
        pixels = (x - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / \
            torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        theirs = model.logit_scale.exp() * model.encode_image(pixels, normalize=True) @ weights
    assert ours.shape == (5, 4)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_images_are_perturbed_before_resize_and_grey_is_repeated(tiny):
    _, vlm = tiny
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    head = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, TEMPLATES[:1]))
    head(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable through resize + normalize
    same = head(x.detach().expand(-1, 3, -1, -1))
    assert torch.allclose(head(x.detach()), same)
    assert vlm.preprocess(torch.rand(1, 3, 20, 30)).shape == (1, 3, 16, 16)  # shorter side + centre crop


def test_text_classifier_rows_are_unit_means_of_unit_prompt_embeddings(tiny):
    _, vlm = tiny
    w = text_classifier(vlm, CLASSES, TEMPLATES)
    with torch.no_grad():
        e = torch.nn.functional.normalize(vlm.encode_text([t.replace("{}", "dog") for t in TEMPLATES]), dim=-1)
    expected = torch.nn.functional.normalize(e.mean(0), dim=0)
    assert torch.allclose(w[1], expected, atol=1e-6) and torch.allclose(w.norm(dim=1), torch.ones(4))


def test_checkpoint_round_trip_and_one_line_errors(tiny, tmp_path):
    from safetensors.torch import save_file

    model, vlm = tiny
    x = torch.rand(3, 3, 16, 16)
    for path in (tmp_path / "tiny.safetensors", tmp_path / "tiny.pt"):
        if path.suffix == ".pt":
            torch.save(model.state_dict(), path)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        loaded = load_open_clip("robustlab-tiny-test", path)
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(x), vlm.encode_image(x))
            assert torch.equal(loaded.encode_text(["a dog"]), vlm.encode_text(["a dog"]))
    wide = tmp_path / "wide.pt"
    torch.save(open_clip.create_model("robustlab-tiny-wide", pretrained=None, load_weights=False).state_dict(), wide)
    with pytest.raises(RobustlabError, match=r"does not match open_clip architecture 'robustlab-tiny-test': "
                       r"\d+ of another shape \(first: visual\.") as err:
        load_open_clip("robustlab-tiny-test", wide)
    assert "\n" not in str(err.value)
    state = dict(model.state_dict())
    state.pop("logit_scale")
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(RobustlabError, match=r"1 missing \(first: logit_scale\)"):
        load_open_clip("robustlab-tiny-test", tmp_path / "short.pt")
    with pytest.raises(RobustlabError, match="not a file; robustlab never downloads"):
        load_open_clip("robustlab-tiny-test", "openai")
    with pytest.raises(RobustlabError, match="Hugging Face hub"):
        load_open_clip("hf-hub:timm/ViT-B-32", None)


def test_prompt_errors_are_one_line(tmp_path, tiny):
    _, vlm = tiny
    with pytest.raises(RobustlabError, match=r"template 'a photo' has no '\{\}' slot"):
        text_classifier(vlm, CLASSES, ["a photo"])
    with pytest.raises(RobustlabError, match="class names missing for data set 'imagenet-val'"):
        prompts_for("imagenet-val", ["n01440764", "n01443537"])
    (tmp_path / "names.txt").write_text("cat_folder: cat\n")
    with pytest.raises(RobustlabError, match="image folder classes dog_folder are not covered by the prompts"):
        read_prompts_file(tmp_path / "names.txt", ["cat_folder", "dog_folder"])
    (tmp_path / "list.json").write_text(json.dumps({"classes": ["a"], "templates": ["x {}"]}))
    with pytest.raises(RobustlabError, match="names 1 classes but the data has 2"):
        read_prompts_file(tmp_path / "list.json", ["p", "q"])
    (tmp_path / "synsets").mkdir()
    (tmp_path / "synsets" / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    p = prompts_for("imagenet-val", ["n01443537", "n01440764"], folder=tmp_path / "synsets" / "val")
    assert p.classnames == ["goldfish", "tench"] and p.templates[0] == "a photo of a {}."
    p = prompts_for("fashion_mnist", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                      "Sneaker", "Bag", "Ankle boot"])
    assert p.classnames[0] == "t-shirt" and "clothing" in p.templates[1]


def _hf_folder(folder, seed=0):
    """A tiny random transformers CLIPModel saved with a CLIP tokenizer (open_clip's BPE vocabulary)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    st = open_clip.tokenizer.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in st.encoder.items()}))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 16},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                     projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_hf_zero_shot_logits_equal_clipmodels_own(tmp_path):
    pytest.importorskip("transformers")
    from robustlab.vlm.hf_adapter import load_hf_clip

    model, tokenizer = _hf_folder(tmp_path)
    vlm = load_hf_clip(tmp_path)  # the round trip through a local folder
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ours = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, ["a photo of a {}."]))(x)
    enc = tokenizer([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    mean = torch.tensor(vlm.mean).view(1, 3, 1, 1)
    std = torch.tensor(vlm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       pixel_values=(x - mean) / std).logits_per_image
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    with pytest.raises(RobustlabError, match="not a Hugging Face model folder"):
        load_hf_clip(tmp_path / "nothing")


def _png_folder(root, classes, per_class=3, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_zero_shot_protocol_on_two_data_sets_rows_summary_report_leaderboard(tiny, tmp_path):
    from robustlab.attacks import build_attacks
    from robustlab.eval.runner import zero_shot
    from robustlab.eval.store import ResultsStore
    from robustlab.report.html import write_report
    from robustlab.report.leaderboard import leaderboard
    from robustlab.threat import ThreatModel
    from robustlab.vlm.suite import build_sets

    _, vlm = tiny
    _png_folder(tmp_path / "pets", ["cat", "dog"])
    sets = build_sets(vlm, ["digits", str(tmp_path / "pets")], n=24)
    assert [s.key for s in sets] == ["digits", "pets"] and sets[1].data.image_shape == (3, 16, 16)
    assert not sets[1].data.in_memory  # image folders stream from disk
    attacks = build_attacks(["pgd:steps=3"], ThreatModel("linf", 4 / 255))
    store = ResultsStore(tmp_path / "r.db")
    result = zero_shot(sets, attacks, store, batch_size=10, vlm_info={"spec": "open_clip:tiny", "weights_sha256": "ab" * 32},
                       model_name="open_clip:tiny", progress=False)
    s = result.summary
    assert s["dataset"] == "zero-shot:digits+pets" and s["complete"]
    assert [d["n"] for d in s["datasets"]] == [24, 6]
    rows = {t: store.sample_rows("zero_shot_samples", result.run_id, t) for t in ("digits@1/255", "digits@4/255",
                                                                                 "pets@1/255", "pets@4/255")}
    assert [len(r) for r in rows.values()] == [24, 24, 6, 6]
    for d in s["datasets"]:  # robust accuracy never above clean, and falls (weakly) with epsilon
        assert d["robust_accuracy"]["4/255"] <= d["robust_accuracy"]["1/255"] <= d["clean_accuracy"]
        name = d["dataset"]
        assert d["clean_accuracy"] == pytest.approx(np.mean([r["clean_correct"] for r in rows[f"{name}@1/255"]]))
    assert s["average_clean_accuracy"] == pytest.approx(np.mean([d["clean_accuracy"] for d in s["datasets"]]))
    assert s["average_robust_accuracy"]["4/255"] == pytest.approx(
        np.mean([d["robust_accuracy"]["4/255"] for d in s["datasets"]]))
    assert {c["name"]: c["status"] for c in result.checks}["large-eps"] == "pass"
    # adversarial examples live at the data set's own resolution (perturbed before the model's resize)
    for task, shape in (("digits@4/255", (1, 8, 8)), ("pets@4/255", (3, 16, 16))):
        for e in store.examples(result.run_id, task):
            assert e.adv.shape == shape and np.abs(e.adv - e.clean).max() <= 4 / 255 + 1e-6
    paths = write_report(store, result.run_id, tmp_path / "report")
    assert "average (2 data sets)" in paths["html"].read_text()
    group = next(g for g in leaderboard(store) if g.protocol == "zero-shot")
    assert group.columns[:2] == ("average_robust_accuracy@1/255", "average_robust_accuracy@4/255")
    assert group.rows[0].entry.metrics["average_robust_accuracy@1/255"] == s["average_robust_accuracy"]["1/255"]
    assert group.rows[0].rank is None  # PGD alone is weaker than the standard ensemble: shown, not ranked


def test_cli_zeroshot_runs_and_refuses_bad_input(tiny, tmp_path, capsys):
    from robustlab.cli import main

    model, _ = tiny
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    base = ["zeroshot", "--vlm", "open_clip:robustlab-tiny-test", "--weights", str(ckpt), "--db", str(tmp_path / "z.db"),
            "--n", "10", "--attack", "pgd:steps=2", "--no-sanity", "--device", "cpu"]
    assert main([*base, "--data", "digits", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eps"] == [1 / 255, 4 / 255] and out["datasets"][0]["n"] == 10
    assert out["datasets"][0]["templates"] == 4  # the digits template set
    assert main([*base, "--data", "digits", "--templates", "nosuch"]) == 2
    assert "unknown template set 'nosuch'" in capsys.readouterr().err
    assert main([*base, "--data", "digits", "--prompts", "cifar10=x.txt"]) == 2
    assert "--prompts for cifar10, which is not among the data sets" in capsys.readouterr().err


def test_at_model_size_resizes_named_data_before_the_attack_streaming(tiny):
    from robustlab.vlm.suite import build_sets

    _, vlm = tiny
    native, resized = (build_sets(vlm, ["digits"], n=5, templates="tecoa", at_model_size=flag)[0] for flag in (False, True))
    assert native.data.image_shape == (1, 8, 8) and resized.data.image_shape == (1, 16, 16)
    assert not resized.data.in_memory and resized.prompts.templates == ["This is a photo of a {}"]
    assert resized.describe()["image_shape"] == [1, 16, 16]  # part of the run's configuration


def test_interrupted_zero_shot_run_resumes_to_the_numbers_of_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    from robustlab.attacks import build_attacks
    from robustlab.eval.protocols.zero_shot import ZeroShotProtocol
    from robustlab.eval.runner import zero_shot
    from robustlab.eval.store import ResultsStore
    from robustlab.threat import ThreatModel
    from robustlab.vlm.suite import build_sets

    _, vlm = tiny
    sets = build_sets(vlm, ["digits"], n=30)
    attacks = build_attacks(["pgd:steps=3"], ThreatModel("linf", 4 / 255))
    kw = {"batch_size": 10, "progress": False, "sanity_checks": False}
    full = zero_shot(sets, attacks, ResultsStore(tmp_path / "a.db"), **kw)
    original, calls = ZeroShotProtocol.run_batch, []

    def killed_at_the_fourth_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ZeroShotProtocol, "run_batch", killed_at_the_fourth_batch)
    store = ResultsStore(tmp_path / "b.db")
    with pytest.raises(KeyboardInterrupt):
        zero_shot(sets, attacks, store, **kw)
    monkeypatch.setattr(ZeroShotProtocol, "run_batch", original)
    resumed = zero_shot(sets, attacks, store, resume=True, **kw)
    assert resumed.resumed and resumed.summary["datasets"] == full.summary["datasets"]
    for task in ("digits@1/255", "digits@4/255"):
        a = [tuple(r) for r in ResultsStore(tmp_path / "a.db").sample_rows("zero_shot_samples", full.run_id, task)]
        b = [tuple(r) for r in store.sample_rows("zero_shot_samples", resumed.run_id, task)]
        assert [r[2:] for r in a] == [r[2:] for r in b]  # every per-sample outcome, not only the totals


def test_zero_shot_head_saves_as_safetensors_every_tensor_once(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, vlm = tiny
    head = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, TEMPLATES))
    assert set(dict(vlm.visual.named_parameters())) and all(
        p is q for p, q in zip(vlm.visual.parameters(), vlm.clip.visual.parameters()))
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))  # refuses tensors that share memory
    assert torch.equal(load_file(str(tmp_path / "head.safetensors"))["weights"], head.weights)


def test_imagenet_style_folder_streams_with_names_from_its_synset_file(tiny, tmp_path):
    from robustlab.vlm.suite import build_sets

    _, vlm = tiny
    _png_folder(tmp_path / "val", ["n01443537", "n01440764"], per_class=2, size=(20, 24))
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01443537 goldfish, Carassius\nn01440764 tench, Tinca tinca\n")
    (s,) = build_sets(vlm, [f"imagenet-val:{tmp_path}"])
    assert s.key == "imagenet-val" and not s.data.in_memory and s.data.image_shape == (3, 16, 16)
    assert s.prompts.classnames == ["goldfish", "tench"]  # label order from the mapping file, names from it too
    assert s.data.labels.tolist() == [1, 1, 0, 0]  # files sorted by folder: n01440764 (tench, label 1) first
    with pytest.raises(RobustlabError, match="class names missing for data set 'imagenet-val'"):
        (tmp_path / "LOC_synset_mapping.txt").unlink()
        build_sets(vlm, [f"imagenet-val:{tmp_path}"])


def test_resize_follows_pils_bicubic_and_squash_keeps_everything():
    from PIL import Image

    from robustlab.vlm.base import resize_square

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    ours = resize_square(x, 20)  # shorter side 40 -> 20, then the centre 20 x 20 of 20 x 30
    pil = np.asarray(Image.fromarray(img).resize((30, 20), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    ref = torch.from_numpy(pil[:, 5:25]).permute(2, 0, 1)[None]
    assert (ours - ref).abs().max() < 2.5 / 255  # PIL rounds to uint8 on the way
    assert resize_square(x, 20, crop=False).shape == (1, 3, 20, 20)
