"""Streaming data: peak memory of evaluating a 10,000-image 224 px folder, and the in-memory fast path.

Claim 1: a large image folder streams. ``load_dataset("imagefolder", root=...)`` on 10,000 RGB
images of 224x224 (float32 in memory: 6.0 GB) reads only the files' headers, and a pass of a small
conv net over all of them in batches of 100 through ``data.batch(range(a, b))`` keeps the process's
peak resident memory (VmHWM) under 1.5 GB. Measured in a fresh subprocess (nothing else loaded), once
as the folder is and once through the transform seam (``resize_center_crop(192, crop_pct=0.875)``:
shorter side to 219, centre 192x192, applied per batch).

The third measurement runs the whole evaluation (``robustlab.eval.evaluate`` with FGSM, every sample's
row into a results store) on the folder as it is: the runner reads batches through the same seam.

Claim 2: an in-memory set's ``batch(range(a, b))`` costs what slicing costs. On 10,000 CIFAR-sized
images in memory, one pass in batches of 100, interleaved repeats, fastest of each: bare slicing
``x[a:b], y[a:b]`` of local tensors, the runner's ``data.x[a:b], data.y[a:b]`` and
``data.batch(range(a, b))``, alone (pure Python overhead, microseconds) and with the conv net's forward
on each batch (what an evaluation does with it; slicing runs twice there, as a control that measures
the machine's noise).

The folder (9,000 JPEG + 1,000 PNG, 10 class folders, smooth random colour fields with noise) is
generated once into ``benchmarks/.cache/streaming_folder`` (git-ignored; ~40 s) and reused.

Usage: python benchmarks/streaming_memory.py [--repeats 30] [--threads 2]
The report is printed and written to benchmarks/results/streaming_memory.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CACHE, REPO, RESULTS, environment, log, set_threads, time_interleaved, write_report  # noqa: E402

FOLDER = CACHE / "streaming_folder"
N_IMAGES, N_CLASSES, SIDE, BATCH = 10_000, 10, 224, 100
LIMIT_BYTES = 1.5 * 2**30
MARKER = f"{N_IMAGES} images, {N_CLASSES} classes, {SIDE}x{SIDE}, v1"


def tiny_net(num_classes: int = N_CLASSES) -> nn.Module:
    """A small conv net that takes any image size (adaptive pooling)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    ).eval()


def generate_folder(folder: Path = FOLDER) -> Path:
    """Write the benchmark folder once (a marker file says it is complete)."""
    from PIL import Image

    marker = folder / "COMPLETE"
    if marker.is_file() and marker.read_text() == MARKER:
        return folder
    log(f"generating {N_IMAGES} images of {SIDE}x{SIDE} in {folder} (once)")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(N_IMAGES):
        label = i % N_CLASSES
        coarse = rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8)
        coarse[..., label % 3] = coarse[..., label % 3] // 2 + 128  # a per-class tint
        field = np.asarray(Image.fromarray(coarse).resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=np.int16)
        noise = rng.integers(-12, 13, size=(SIDE, SIDE, 3), dtype=np.int16)
        image = Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))
        path = folder / f"class{label}" / f"{i:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 10 == 9:
            image.save(path.with_suffix(".png"))
        else:
            image.save(path.with_suffix(".jpg"), quality=90)
    marker.write_text(MARKER)
    log(f"generated in {time.perf_counter() - t0:.0f} s")
    return folder


def _peak_rss_bytes() -> tuple[int, int]:
    """(VmHWM from /proc/self/status, ru_maxrss) in bytes: the process's peak resident memory."""
    hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(folder: Path, crop: int | None, threads: int, evaluate: bool = False) -> dict:
    """In a fresh process: load the folder, run the net over every image (or, with ``evaluate``, the
    whole adversarial evaluation: ``robustlab.eval.evaluate`` under FGSM into a results store), report
    peak memory."""
    from robustlab.data import ImageFolderDataset, TransformedDataset, load_dataset, resize_center_crop

    set_threads(threads)
    model = tiny_net()
    before = _peak_rss_bytes()[0]
    t0 = time.perf_counter()
    transform = resize_center_crop(crop, crop_pct=0.875) if crop else None
    data = load_dataset("imagefolder", root=folder, transform=transform)
    load_s = time.perf_counter() - t0
    assert isinstance(data, (ImageFolderDataset, TransformedDataset)), type(data)  # streams: no x
    t1 = time.perf_counter()
    counts = torch.zeros(data.num_classes, dtype=torch.long)
    checksum = 0.0
    if evaluate:
        import tempfile

        from robustlab.attacks import create_attack
        from robustlab.eval import EvalOptions, ResultsStore, evaluate as run_evaluation
        from robustlab.threat import ThreatModel

        with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "r.db") as store:
            result = run_evaluation(model, data, [create_attack("fgsm", ThreatModel("linf", 4 / 255))], store,
                                    options=EvalOptions(steps_grid=(), sanity=False, batch_size=BATCH), progress=False)
            counts[0] = len(store.samples(result.run_id))
            checksum = result.robust_accuracy
    with torch.no_grad():
        for a in range(0, len(data) if not evaluate else 0, BATCH):
            x, y = data.batch(range(a, min(a + BATCH, len(data))))
            counts += torch.bincount(model(x).argmax(1), minlength=data.num_classes)
            checksum += float(x.sum())
    hwm, maxrss = _peak_rss_bytes()
    return {
        "kind": type(data).__name__, "n": len(data), "image_shape": list(data.image_shape),
        "in_memory_bytes": data.nbytes, "load_s": load_s, "pass_s": time.perf_counter() - t1,
        "vmhwm": hwm, "ru_maxrss": maxrss, "rss_before_data": before, "predictions": int(counts.sum()),
        "checksum": checksum,
    }


def run_child(folder: Path, crop: int | None, threads: int, evaluate: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--threads", str(threads)]
    if evaluate:
        cmd.append("--evaluate")
    if crop:
        cmd += ["--crop", str(crop)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_memory_timing(repeats: int) -> dict[str, dict]:
    """One pass in batches of 100 over 10,000 in-memory 3x32x32 images: slicing vs batch(range)."""
    from robustlab.data import ImageDataset

    gen = torch.Generator().manual_seed(0)
    data = ImageDataset("bench", "test", torch.rand(N_IMAGES, 3, 32, 32, generator=gen),
                        torch.randint(0, N_CLASSES, (N_IMAGES,), generator=gen), [str(i) for i in range(N_CLASSES)])
    x, y, model = data.x, data.y, tiny_net()
    starts = range(0, len(data), BATCH)

    def sliced() -> None:
        for a in starts:
            x[a : a + BATCH], y[a : a + BATCH]

    def runner_today() -> None:
        for a in starts:
            data.x[a : a + BATCH], data.y[a : a + BATCH]

    def batched() -> None:
        for a in starts:
            data.batch(range(a, a + BATCH))

    def with_model(read):
        def run() -> None:
            with torch.no_grad():
                for a in starts:
                    xb, _ = read(a)
                    model(xb)
        return run

    for a in starts:  # the claim itself: identical tensors, views of the same memory
        xb, yb = data.batch(range(a, a + BATCH))
        assert torch.equal(xb, x[a : a + BATCH]) and xb.data_ptr() == x[a : a + BATCH].data_ptr()
        assert torch.equal(yb, y[a : a + BATCH])
    bare = time_interleaved(
        {"x[a:b], y[a:b]": sliced, "data.x[a:b], data.y[a:b]": runner_today, "data.batch(range(a, b))": batched},
        repeats, warmup=True,
    )
    forward = time_interleaved(
        {"x[a:b] + forward": with_model(lambda a: (x[a : a + BATCH], y[a : a + BATCH])),
         "x[a:b] + forward (control)": with_model(lambda a: (x[a : a + BATCH], y[a : a + BATCH])),
         "data.batch(range) + forward": with_model(lambda a: data.batch(range(a, a + BATCH)))},
        max(3, repeats // 2), warmup=True,
    )
    return {**bare, **forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="interleaved repeats of the in-memory timing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the streaming passes")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--crop", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.crop, args.threads, args.evaluate)))
        return

    set_threads(1)  # the in-memory timing: one thread is the steadiest on a shared machine
    folder = generate_folder()
    gib = 2**30
    lines = [f"Streaming data: peak memory of a pass over {N_IMAGES:,} images of {SIDE}x{SIDE}, and batch() vs slicing",
             f"environment: {environment()}; the streaming passes ran with {args.threads} thread(s)", ""]
    verdicts = []
    for crop, evaluate in ((None, False), (192, False), (None, True)):
        log(f"streaming pass {'as the folder is' if crop is None else f'with resize_center_crop({crop})'}"
            f"{' through robustlab.eval.evaluate (FGSM)' if evaluate else ''} ...")
        r = run_child(folder, crop, args.threads, evaluate)
        ok = r["vmhwm"] <= LIMIT_BYTES and r["predictions"] == N_IMAGES
        what = "as stored" if crop is None else f"resize_center_crop({crop}, crop_pct=0.875) per batch"
        if evaluate:
            what = (f"the adversarial evaluation (evaluate(): clean pass, FGSM at Linf 4/255, verification, every "
                    f"sample into a results store; robust accuracy {r['checksum']:.3f})")
        lines += [
            f"streaming, {what}: {r['kind']}, {r['n']} images {tuple(r['image_shape'])}",
            f"  in memory as float32 these would take {r['in_memory_bytes'] / gib:.2f} GiB",
            f"  peak RSS (VmHWM) {r['vmhwm'] / gib:.3f} GiB (ru_maxrss {r['ru_maxrss'] / gib:.3f} GiB; "
            f"{r['rss_before_data'] / gib:.3f} GiB after imports and the model, before the data)",
            f"  load {r['load_s']:.1f} s (file list + headers), pass {r['pass_s']:.1f} s "
            f"({r['n'] / r['pass_s']:.0f} images/s, batches of {BATCH}: decode + forward)",
        ]
        verdicts.append(f"{'PASS' if ok else 'FAIL'}: peak memory {r['vmhwm'] / gib:.3f} GiB <= 1.5 GiB ({what})")
    log("in-memory timing ...")
    t = in_memory_timing(args.repeats)
    base, runner, batch = (t[k]["wall_min"] for k in ("x[a:b], y[a:b]", "data.x[a:b], data.y[a:b]", "data.batch(range(a, b))"))
    fwd_slice, fwd_control = t["x[a:b] + forward"]["cpu_min"], t["x[a:b] + forward (control)"]["cpu_min"]
    fwd_batch = t["data.batch(range) + forward"]["cpu_min"]
    noise = abs(fwd_control / fwd_slice - 1)
    per = 1e6 / (N_IMAGES // BATCH)
    lines += [
        "",
        f"in memory: {N_IMAGES:,} images 3x32x32, one pass in batches of {BATCH} (fastest of {args.repeats} "
        "interleaved repeats; per batch)",
        f"  x[a:b], y[a:b] (local tensors)   {base * per:7.2f} us",
        f"  data.x[a:b], data.y[a:b] (runner) {runner * per:7.2f} us",
        f"  data.batch(range(a, b))           {batch * per:7.2f} us   ratio {batch / base:.2f} vs local slicing, "
        f"{batch / runner:.2f} vs the runner's slicing (identical views of the same memory)",
        f"  with the conv net's forward (process CPU time, fastest of {max(3, args.repeats // 2)}): slicing "
        f"{fwd_slice * per:.0f} us, the same again as a control {fwd_control * per:.0f} us (noise "
        f"{noise:.1%}), batch() {fwd_batch * per:.0f} us per batch: ratio {fwd_batch / fwd_slice:.3f}",
        "",
    ]
    ratio = fwd_batch / fwd_slice
    status = "PASS" if ratio <= 1.02 else "NOISE" if ratio <= 1 + 2 * noise else "FAIL"
    verdicts.append(f"{status}: batch(range) + forward costs what slicing + forward costs (ratio {ratio:.3f}; "
                    f"budget 2%, NOISE when within twice the slicing-vs-slicing control's {noise:.1%})")
    write_report("\n".join(lines + verdicts) + "\n", RESULTS / "streaming_memory.txt")


if __name__ == "__main__":
    main()
