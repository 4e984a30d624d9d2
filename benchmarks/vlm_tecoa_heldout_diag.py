"""Post-hoc diagnostic for ``vlm_tecoa_heldout_strong.txt`` (NOT part of the selection protocol: it reads the
cifar10-B test images for models the validation rule did not select): TeCoA full fine-tuning at lr 1e-4, 2 epochs,
on the stronger cached tiny CLIP (run ``vlm_tecoa_heldout.py`` with the strong options first); prints the clean
5-way zero-shot accuracy on cifar10-B and how often each class is predicted.

Run: ``OMP_NUM_THREADS=1 nice python benchmarks/vlm_tecoa_heldout_diag.py`` (about 2 CPU-minutes).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CACHE, set_threads, shared_data_dir
from benchmarks.vlm_tecoa import captions
from benchmarks.vlm_tecoa_heldout import CLASSES_A, CLASSES_B, cifar_split, take
from robustlab.data import load_dataset
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective, train
from robustlab.vlm.adapt import prepare
from robustlab.vlm.tiny_clip import load_tiny_clip
from robustlab.vlm.zeroshot import ZeroShotClassifier, text_classifier


def main() -> None:
    set_threads(1)
    root = shared_data_dir(); path = CACHE / "tiny_clip_heldout_3000_10_vision_width96_cifarB_flip.safetensors"
    cifar, _, rest = cifar_split(root, 3000)
    pool = take(cifar, rest, "a", CLASSES_A); tr = take(pool, torch.arange(len(pool) - 300), "a")
    names, templates = captions("cifar10", cifar)
    test = load_dataset("cifar10", "test", root=root)
    b = take(test, torch.arange(len(test)), "b", CLASSES_B)
    idx = torch.randperm(len(b), generator=torch.Generator().manual_seed(1))[:400].sort().values
    b = take(b, idx, "b")
    for eps, lr in ((4, 1e-4), (1, 1e-4)):
        vlm = load_tiny_clip(path).eval()
        head = text_classifier(vlm, [names[c] for c in CLASSES_A], templates)
        ad = prepare(vlm, "full", torch.Generator().manual_seed(0))
        train(ZeroShotClassifier(ad, head), tr, TrainConfig(epochs=2, batch_size=128, lr=lr, optimizer="adam", weight_decay=0.0, seed=0),
              create_objective("tecoa", ThreatModel("linf", eps / 255), steps=2), progress=False)
        ad.eval()
        clf = ZeroShotClassifier(ad, text_classifier(ad, [names[c] for c in CLASSES_B], templates))
        with torch.no_grad():
            p = clf(b.x).argmax(1)
        print(f"TeCoA {eps}/255 full lr {lr:g} 2ep: cifar10-B clean {100*float((p==b.y).float().mean()):.1f}%, "
              f"prediction counts {torch.bincount(p, minlength=5).tolist()}", flush=True)


if __name__ == "__main__":
    main()
