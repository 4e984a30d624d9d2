"""Zero-shot fidelity against open_clip and transformers, and the cost of a zero-shot robust evaluation.

1. Fidelity. On randomly initialised models (several seeds, a ViT and a ResNet image tower for
   open_clip, a ViT CLIPModel for transformers), robustlab's zero-shot logits
   (``ZeroShotClassifier(vlm, text_classifier(vlm, classes, templates))``) are compared with

   - open_clip's own zero-shot classifier (``open_clip.build_zero_shot_classifier``, 10 classes x the
     12 ``photo`` templates) times the model's logit scale on the same normalized images;
   - transformers' ``CLIPModel(...).logits_per_image`` (one template: the model's own forward), and
     with several templates its ``get_text_features`` averaged as CLIP does.

   Reported: the largest absolute logit difference and whether the argmax agrees everywhere.

2. Cost. One zero-shot task (PGD-10 at Linf 4/255 on n CIFAR-10 test images, every claim re-verified,
   rows written to a results store; images labelled with the random model's own predictions, so all n
   are attacked) through ``robustlab.eval.runner.zero_shot``, against the physical
   floor: one forward + backward pass of the image encoder to its input on the same n images. The ideal
   ratio is about steps + 2 (the clean forward and the verification forward come on top of the 10
   gradient steps). CPU time (time.process_time) of interleaved repeats, medians.

3. Streaming. A zero-shot run over an ImageNet-size folder (the first 3,000 and all 10,000 RGB images
   of 224x224, 5.6 GiB as float32; the folder of benchmarks/streaming_memory.py, generated once into
   benchmarks/.cache) with a tiny 224-pixel ViT, PGD-2 at 1/255, every row into a store: the peak
   resident memory (VmHWM) of a fresh subprocess, against the same process before the data.

Needs open-clip-torch and transformers (``pip install 'robustlab[vlm]'``). Data: CIFAR-10 from
../shared/data (or $ROBUSTLAB_SHARED_DATA), else the embedded digits.

Usage: OMP_NUM_THREADS=1 python benchmarks/vlm_fidelity.py [--n 64] [--repeats 3] [--steps 10]
Writes benchmarks/results/vlm_fidelity.txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustlab.vlm import ZeroShotClassifier, text_classifier
from robustlab.vlm.open_clip_adapter import OpenClipVLM
from robustlab.vlm.prompts import template_set

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _open_clip_model(kind: str, seed: int):
    import open_clip

    torch.manual_seed(seed)
    text = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
    vision = ({"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32} if kind == "vit"
              else {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16})
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()
    with torch.no_grad():  # a trained-like temperature (100), so differences are on the scale real logits have
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))
    return model, open_clip.tokenizer.SimpleTokenizer(context_length=32)


def fidelity_open_clip(kind: str, seed: int, n: int = 32) -> tuple[float, bool]:
    import open_clip

    model, tok = _open_clip_model(kind, seed)
    vlm = OpenClipVLM(model, tok)
    templates = template_set("photo")
    x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, templates))(x)
        weights = open_clip.build_zero_shot_classifier(model, tok, CLASSES, templates, device="cpu")
        feats = model.encode_image(vlm.normalize(x), normalize=True)
        theirs = model.logit_scale.exp() * feats @ weights
    return float((ours - theirs).abs().max()), bool((ours.argmax(1) == theirs.argmax(1)).all())


def _hf_model(seed: int, folder: Path):
    import open_clip
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    st = open_clip.tokenizer.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in st.encoder.items()}))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "max_position_embeddings": 32},
                     vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
                     projection_dim=32, logit_scale_init_value=4.605170)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def fidelity_hf(seed: int, n: int = 32) -> tuple[float, bool, float]:
    """(max |diff| single template vs logits_per_image, argmax agrees, max |diff| 12 templates vs the
    features averaged by hand)."""
    from robustlab.vlm.hf_adapter import load_hf_clip

    with tempfile.TemporaryDirectory() as d:
        model, tok = _hf_model(seed, Path(d))
        vlm = load_hf_clip(d)
    x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    pixels = vlm.normalize(x)
    with torch.no_grad():
        ours = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, ["a photo of a {}."]))(x)
        enc = tok([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
        theirs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels).logits_per_image
        templates = template_set("photo")
        ours_many = ZeroShotClassifier(vlm, text_classifier(vlm, CLASSES, templates))(x)
        rows = []
        for c in CLASSES:
            e = tok([t.replace("{}", c) for t in templates], padding=True, return_tensors="pt")
            out = model.get_text_features(input_ids=e["input_ids"], attention_mask=e["attention_mask"])
            f = torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
            rows.append(torch.nn.functional.normalize(f.mean(0), dim=0))
        img = model.get_image_features(pixel_values=pixels)
        img = torch.nn.functional.normalize(img if isinstance(img, torch.Tensor) else img.pooler_output, dim=-1)
        theirs_many = model.logit_scale.exp() * img @ torch.stack(rows).T
    return (float((ours - theirs).abs().max()), bool((ours.argmax(1) == theirs.argmax(1)).all()),
            float((ours_many - theirs_many).abs().max()))


def cost(n: int, steps: int, repeats: int) -> dict[str, float]:
    """CPU seconds (medians) of one zero-shot PGD task and of the encoder's forward + backward floor."""
    import open_clip

    from robustlab.attacks import build_attacks
    from robustlab.data import ImageDataset
    from robustlab.eval.runner import zero_shot
    from robustlab.eval.store import ResultsStore
    from robustlab.threat import ThreatModel
    from robustlab.vlm.suite import build_sets

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": 32, "layers": 4, "width": 128, "patch_size": 4,
                                                     "head_width": 32},
                           text_cfg={"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4,
                                     "layers": 2}).eval()
    vlm = OpenClipVLM(model, open_clip.tokenizer.SimpleTokenizer(context_length=32))
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    import os

    root = os.environ.get("ROBUSTLAB_SHARED_DATA") or (str(shared) if (shared / "cifar10_test.npz").is_file() else None)
    name = "cifar10" if root else "digits"
    sets = build_sets(vlm, [name], root=root, n=n)
    attacks = build_attacks([f"pgd:steps={steps}"], ThreatModel("linf", 4 / 255))
    x = sets[0].data.batch(range(n))[0]
    # A random model is right on ~10% of the images and only those are attacked: label every image with
    # the model's own prediction so that all n are attacked, as they would be for an accurate model.
    with torch.no_grad():
        pred = sets[0].head(x).argmax(1)
    sets[0].data = ImageDataset(name, "test", x.clone(), pred, list(sets[0].data.classes))

    def floor() -> float:
        xs = x.clone().requires_grad_(True)
        t = time.process_time()
        vlm.encode_image(xs).sum().backward()
        return time.process_time() - t

    spent: dict[str, float] = {}

    def evaluation() -> float:
        with tempfile.TemporaryDirectory() as d:
            store = ResultsStore(Path(d) / "r.db")
            t = time.process_time()
            result = zero_shot(sets, attacks, store, eps=(4 / 255,), sanity_checks=False, batch_size=n, progress=False)
            out = time.process_time() - t
            costs = store.attack_costs(result.run_id, result.summary["datasets"][0]["dataset"] + "@4/255")
            spent.update(gradients=sum(c["gradients"] for c in costs), forwards=sum(c["forwards"] for c in costs))
            store.close()
        return out

    def forward() -> float:
        t = time.process_time()
        with torch.no_grad():
            vlm.encode_image(x)
        return time.process_time() - t

    floor()  # warm-up
    f, fw, e = [], [], []
    for _ in range(repeats):
        f.append(floor())
        fw.append(forward())
        e.append(evaluation())
    return {"data": name, "floor": statistics.median(f), "forward": statistics.median(fw), "eval": statistics.median(e),
            **spent}


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(folder: str) -> None:
    """The streaming measurement (run in a fresh process): prints one JSON line."""
    import open_clip

    from robustlab.attacks import build_attacks
    from robustlab.eval.runner import zero_shot
    from robustlab.eval.store import ResultsStore
    from robustlab.threat import ThreatModel
    from robustlab.vlm.suite import build_sets

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                                                     "head_width": 32},
                           text_cfg={"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4,
                                     "layers": 2}).eval()
    vlm = OpenClipVLM(model, open_clip.tokenizer.SimpleTokenizer(context_length=32))
    before = _peak_rss()
    t = time.perf_counter()
    sets = build_sets(vlm, [folder], n=int(__import__("os").environ.get("ZS_MEMORY_N", "0")) or None)
    attacks = build_attacks(["pgd:steps=2"], ThreatModel("linf", 1 / 255))
    with tempfile.TemporaryDirectory() as d:
        result = zero_shot(sets, attacks, ResultsStore(Path(d) / "r.db"), eps=(1 / 255,), sanity_checks=False,
                           batch_size=100, progress=False)
    data = sets[0].data
    print(json.dumps({"n": len(data), "shape": list(data.image_shape), "in_memory": data.in_memory,
                      "nbytes": data.nbytes, "before": before, "peak": _peak_rss(), "seconds": time.perf_counter() - t,
                      "rows": result.summary["n"]}))


def memory(n: int, threads: int = 1) -> dict:
    import os
    import subprocess

    from benchmarks.streaming_memory import generate_folder

    folder = generate_folder()
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(folder)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads), "ZS_MEMORY_N": str(n)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images in the cost measurement")
    p.add_argument("--steps", type=int, default=10, help="PGD steps in the cost measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians)")
    p.add_argument("--seeds", type=int, default=3, help="random models per fidelity row")
    args = p.parse_args()
    torch.set_num_threads(1)
    lines = ["Zero-shot fidelity and cost (benchmarks/vlm_fidelity.py)", ""]
    import open_clip
    import transformers

    lines.append(f"open_clip {open_clip.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
                 "1 thread, float32")
    lines.append("")
    lines.append("1. Fidelity on random models (10 CIFAR-10 class names, 32 random 64x64 images, logit scale 100)")
    for kind in ("vit", "resnet"):
        diffs = [fidelity_open_clip(kind, s) for s in range(args.seeds)]
        lines.append(f"  open_clip {kind:<6} x 12 templates vs build_zero_shot_classifier: max |logit diff| "
                     f"{max(d for d, _ in diffs):.2e} over {args.seeds} seeds; argmax identical: "
                     f"{all(a for _, a in diffs)}")
    hf = [fidelity_hf(s) for s in range(args.seeds)]
    lines.append(f"  transformers CLIPModel, 1 template vs logits_per_image: max |logit diff| {max(h[0] for h in hf):.2e}; "
                 f"argmax identical: {all(h[1] for h in hf)}")
    lines.append(f"  transformers CLIPModel, 12 templates vs its features averaged by hand: max |logit diff| "
                 f"{max(h[2] for h in hf):.2e}")
    lines.append("")
    c = cost(args.n, args.steps, args.repeats)
    ratio = c["eval"] / c["floor"]
    lines.append(f"2. Cost: one zero-shot task, PGD-{args.steps} at Linf 4/255 on {args.n} {c['data']} test images "
                 "(ViT 4 layers x 128 wide, patch 4, 32x32 input), with re-verification and the store, vs one forward + "
                 "backward of the image encoder to its input (CPU time, medians of "
                 f"{args.repeats} interleaved repeats)")
    # a gradient's forward is counted in "forwards" too; forward-only passes: the last iterate's check, the clean
    # prediction and the re-verification
    grads, fwds = c["gradients"] / args.n, (c["forwards"] - c["gradients"]) / args.n + 2
    ideal = grads * c["floor"] + fwds * c["forward"]
    lines.append(f"  floor (forward + backward) {c['floor']:.3f} s, forward only {c['forward']:.3f} s, evaluation "
                 f"{c['eval']:.3f} s: {ratio:.1f}x the forward + backward floor")
    lines.append(f"  the work done: {grads:.1f} input gradients per image (PGD stops on a point once it is broken) and "
                 f"{fwds:.1f} forward-only passes per image (the last iterate, the clean prediction, re-verification): "
                 f"its floor is {ideal:.3f} s, so the evaluation costs {c['eval'] / ideal:.2f}x the floor of the work it "
                 f"does (overhead: text heads, store writes, bookkeeping)")
    gib = 2**30
    lines.append("")
    for i, n in enumerate((3000, 10_000)):
        m = memory(n)
        if i == 0:
            lines.append(f"3. Streaming: a zero-shot run (PGD-2 at Linf 1/255, every row into a store) over the first N "
                         f"images of a folder of {m['shape'][1]}x{m['shape'][2]} images (held in memory: "
                         f"{m['in_memory']}), tiny 224-pixel ViT, batches of 100, a fresh process each")
        lines.append(f"  N = {m['n']:,} ({m['nbytes'] / gib:.2f} GiB as float32): peak resident memory "
                     f"{m['peak'] / gib:.3f} GiB ({m['before'] / gib:.3f} GiB after imports and the model, before the "
                     f"data); {m['rows']:,} samples in {m['seconds']:.0f} s")
    lines.append("  (the peak does not grow with N: what is above the imports is the working set of a batch and the "
                 "allocators' reserve, not the data)")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vlm_fidelity.txt").write_text(text)


if __name__ == "__main__":
    main()
