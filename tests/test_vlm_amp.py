"""Mixed precision in adaptation: TeCoA and FARE run their attack and training step under the one
loop's autocast (bfloat16 on CPU; float16 with loss scaling, CUDA's path, exercised here on CPU by
switching the CPU's autocast type), keep float32 weights, and move the weights as float32 does.
(CUDA itself is not available where these tests run.)"""

from __future__ import annotations

import pytest
import torch

from robustlab.data import load_dataset
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective, loop
from robustlab.vlm.adapt import adapt
from robustlab.vlm.tiny_clip import TinyCLIP, TinyCLIPConfig, build_vocab

NAMES = [str(i) for i in range(10)]
TEMPLATES = ["the digit {}."]
SMALL = TinyCLIPConfig(image_size=16, patch_size=4, vision_width=32, vision_layers=2, text_width=32, text_layers=1,
                       embed_dim=32)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "train").subset(192)


def fresh() -> TinyCLIP:
    torch.manual_seed(0)
    return TinyCLIP(SMALL, build_vocab([t.format(n) for n in NAMES for t in TEMPLATES])).eval()


def run(data, recipe: str, amp: bool):
    """Adapt a fresh tiny CLIP one epoch; returns (weights before, after, dtypes seen by the first MLP
    layer of the image tower during training, history)."""
    vlm = fresh()
    before = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    seen = set()
    hook = vlm.visual.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    objective = create_objective(recipe, ThreatModel("linf", 8 / 255), steps=2)
    config = TrainConfig(epochs=1, batch_size=64, lr=1e-3, optimizer="adam", weight_decay=0.0, amp=amp, seed=1)
    _, history = adapt(vlm, data, NAMES, TEMPLATES, objective, "full", config, progress=False)
    hook.remove()
    after = vlm.visual.state_dict()
    return before, after, seen, history


def delta(before, after) -> torch.Tensor:
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in before])


# Cosine of the weight update under autocast with the float32 update, measured on this CPU: TeCoA 0.997,
# FARE 0.53 (FARE's loss is a small squared difference of two nearly equal embeddings, so bfloat16's
# 8-bit mantissa shows; float16's 10 bits give 0.65). The bounds leave room for other CPUs' kernels.
MIN_COSINE = {"tecoa": 0.95, "fare": 0.3}


@pytest.mark.parametrize("recipe", ["tecoa", "fare"])
def test_bfloat16_autocast_adaptation_moves_the_weights_as_float32_does(data, recipe):
    b32, a32, seen32, h32 = run(data, recipe, amp=False)
    b16, a16, seen16, h16 = run(data, recipe, amp=True)
    assert seen32 == {torch.float32}
    assert torch.bfloat16 in seen16  # the attack and the step ran under autocast
    assert all(v.dtype == torch.float32 for v in a16.values())  # master weights stay float32
    d32, d16 = delta(b32, a32), delta(b16, a16)
    assert d16.norm() > 0
    cos = torch.nn.functional.cosine_similarity(d32, d16, dim=0)
    assert cos > MIN_COSINE[recipe], float(cos)
    if recipe == "tecoa":
        assert h16[-1]["loss"] == pytest.approx(h32[-1]["loss"], rel=0.01)


def test_float16_with_loss_scaling_path_adapts_and_saves_the_scaler(data, monkeypatch, tmp_path):
    # CUDA's --amp path (float16 autocast + GradScaler), run on CPU by making float16 the CPU's AMP type
    monkeypatch.setitem(loop.AMP_DTYPES, "cpu", torch.float16)
    b32, a32, _, _ = run(data, "tecoa", amp=False)
    vlm = fresh()
    before = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    seen = set()
    vlm.visual.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    objective = create_objective("tecoa", ThreatModel("linf", 8 / 255), steps=2)
    config = TrainConfig(epochs=1, batch_size=64, lr=1e-3, optimizer="adam", weight_decay=0.0, amp=True, seed=1)
    _, history = adapt(vlm, data, NAMES, TEMPLATES, objective, "full", config, progress=False,
                       checkpoint_dir=tmp_path / "state")
    assert torch.float16 in seen
    after = vlm.visual.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())
    assert history[-1]["loss"] == history[-1]["loss"]  # finite
    cos = torch.nn.functional.cosine_similarity(delta(b32, a32), delta(before, after), dim=0)
    assert cos > 0.7, float(cos)  # measured 0.89: the first steps' overflowing loss scale skips them
    import json

    meta = json.loads((tmp_path / "state" / "state.json").read_text())
    assert meta.get("scaler") and meta["scaler"]["scale"] > 1  # the loss scale was in use and is saved for --resume
