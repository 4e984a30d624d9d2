"""Post-hoc diagnostic for ``vlm_tecoa_broad.txt`` (NOT part of its protocol; it reads only the ORIGINAL model):
why do adapted models put the unseen cifar10-B images into "cat"? Prints, for the stronger cached tiny CLIP, each
classes-B text embedding's cosine with (a) the mean direction of the original's image embeddings of the 400
cifar10-B test images (where an embedding that lost its class information ends up), (b) the mean of the 25
adaptation classes' text embeddings, (c) its nearest adaptation class text.

Run (after ``vlm_tecoa_heldout.py`` with the strong options cached the model):
``OMP_NUM_THREADS=1 nice python benchmarks/vlm_tecoa_broad_diag.py`` (seconds).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CACHE, set_threads, shared_data_dir
from benchmarks.vlm_tecoa import captions
from benchmarks.vlm_tecoa_heldout import CLASSES_A, CLASSES_B, take
from robustlab.data import load_dataset
from robustlab.vlm.tiny_clip import load_tiny_clip
from robustlab.vlm.zeroshot import text_classifier


def main() -> None:
    set_threads(1)
    root = shared_data_dir()
    vlm = load_tiny_clip(CACHE / "tiny_clip_heldout_3000_10_vision_width96_cifarB_flip.safetensors").eval()
    test = load_dataset("cifar10", "test", root=root)
    names, templates = captions("cifar10", test)
    b = take(test, torch.arange(len(test)), "b", CLASSES_B)
    idx = torch.randperm(len(b), generator=torch.Generator().manual_seed(1))[:400].sort().values
    b = take(b, idx, "b")
    head_b = text_classifier(vlm, [names[c] for c in CLASSES_B], templates)
    adapt_names, adapt_rows = [], []
    for name in ("mnist", "fashion_mnist"):
        data = load_dataset(name, "test", root=root)
        n, t = captions(name, data)
        adapt_names += n
        adapt_rows.append(text_classifier(vlm, n, t))
    adapt_names += [names[c] for c in CLASSES_A]
    adapt_rows.append(text_classifier(vlm, [names[c] for c in CLASSES_A], templates))
    head_adapt = torch.cat(adapt_rows)
    with torch.no_grad():
        img = F.normalize(vlm.encode_image(b.x), dim=-1)
    centre = F.normalize(img.mean(0), dim=0)
    adapt_centre = F.normalize(head_adapt.mean(0), dim=0)
    print(f"{'class B':12s} {'cos(img mean)':>14s} {'cos(adapt-text mean)':>21s}  nearest adaptation class (cos)")
    for i, c in enumerate(CLASSES_B):
        sims = head_adapt @ head_b[i]
        j = int(sims.argmax())
        print(f"{names[c]:12s} {float(head_b[i] @ centre):14.3f} {float(head_b[i] @ adapt_centre):21.3f}  "
              f"{adapt_names[j]} ({float(sims[j]):.3f})")


if __name__ == "__main__":
    main()
