"""One zero-shot head over the classes of several data sets (each with its own templates), and the
class-balance-aware numbers that show a collapsed classifier: balanced accuracy, largest predicted share."""

from __future__ import annotations

import pytest
import torch

from robustlab.data import ImageDataset
from robustlab.errors import RobustlabError
from robustlab.eval.metrics import balanced_accuracy, class_recalls, largest_class_share
from robustlab.vlm import ZeroShotClassifier, prompt_classifier, text_classifier
from robustlab.vlm.pretrain import CaptionSource, caption_dataset
from robustlab.vlm.tiny_clip import TinyCLIP, TinyCLIPConfig, build_vocab

DIGITS = (["zero", "one", "two"], ['a photo of the number: "{}".', "the digit {}."])
PHOTOS = (["cat", "ship"], ["a photo of a {}.", "a blurry photo of the {}.", "the {}."])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    texts = [t.replace("{}", c) for names, temps in (DIGITS, PHOTOS) for c in names for t in temps]
    cfg = TinyCLIPConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                         embed_dim=16)
    return TinyCLIP(cfg, build_vocab(texts)).eval()


def test_combined_head_is_each_data_sets_own_head_stacked_in_the_pooled_label_order(tiny):
    grey = ImageDataset("digitsish", "train", torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 2, 2, 1, 0]), DIGITS[0])
    rgb = ImageDataset("photos", "train", torch.rand(4, 3, 16, 16), torch.tensor([1, 0, 1, 1]), PHOTOS[0])
    pooled, prompts = caption_dataset([CaptionSource("d", grey, *DIGITS), CaptionSource("p", rgb, *PHOTOS)], 16)
    head = prompt_classifier(tiny, prompts)
    expected = torch.cat([text_classifier(tiny, *DIGITS), text_classifier(tiny, *PHOTOS)])
    assert head.shape == (5, 16) and torch.allclose(head, expected, atol=1e-6)
    # labels of the second source are offset by the first source's class count; grey became 3 channels
    assert pooled.y.tolist() == [0, 1, 2, 2, 1, 0, 4, 3, 4, 4] and pooled.x.shape == (10, 3, 16, 16)
    logits = ZeroShotClassifier(tiny, head)(pooled.x)
    assert logits.shape == (10, 5)
    with pytest.raises(RobustlabError, match="class 1 has no prompts"):
        prompt_classifier(tiny, [["a cat."], []])


def test_balanced_accuracy_and_largest_share_expose_a_one_class_model():
    y = torch.tensor([0] * 8 + [1] * 2)              # 80% of the samples are class 0
    constant = torch.zeros(10, dtype=torch.long)     # predicts class 0 for everything
    correct = constant == y
    assert float(correct.float().mean()) == pytest.approx(0.8)
    assert class_recalls(correct, y, 3) == [1.0, 0.0, None]
    assert balanced_accuracy(correct, y, 3) == pytest.approx(0.5)  # classes without samples do not count
    assert largest_class_share(constant, 3) == (0, 1.0)
    spread = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    assert largest_class_share(spread) == (2, pytest.approx(0.4))
    perfect = torch.ones(10, dtype=torch.bool)
    assert balanced_accuracy(perfect, y) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        balanced_accuracy(torch.ones(3, dtype=torch.bool), y)
