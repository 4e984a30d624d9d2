"""Defenses that need a trained model or a trained component, on MNIST and CIFAR-10: thermometer
encoding, image quilting, mixup inference, k-WTA (attacked with sampled gradients), defensive
distillation and input-gradient regularization. The missing rows of ``defenses_adaptive.txt``, in the
same columns: clean, non-adaptive, transfer, adaptive, the per-sample worst case, the undefended
standard model's robust accuracy under the same attack.

    python benchmarks/defenses_trained.py [--n 100] [--only mnist|cifar10] [--rows LABEL,...]

``--rows`` (with ``--only``) runs only the rows whose label contains one of the given words and puts
them into the data set's existing results file in place of the rows of the same label, the others kept.

Models (benchmarks/common.py, trained on first use; small CPU budgets, stated in the output):
thermometer (16 levels) trained on the encoding; mixup, k-WTA (ratio 0.1) and input-gradient
regularization (Adam: SGD diverges on the double-backpropagation loss) fine-tuned from the standard
model; defensive distillation at T = 100 (the first network on hard labels, then the distilled one on
its soft labels; Adam, as SGD has no working learning rate at T = 100 in a short run:
``distillation_training.py``), deployed at T = 1.

Attacks: input defenses (thermometer, quilting, mixup inference, k-WTA with ``sampled-gradients``) are
evaluated as in ``defenses_adaptive.py``: APGD-CE (100 steps) run adaptively (BPDA with the defense's
surrogate -- for the thermometer the piecewise-linear relaxation Athalye et al. used --, EOT over its
draws, sampled gradients for k-WTA) and non-adaptively on the defended model, plus a transfer of the
undefended model's APGD-CE examples. Distillation and gradient regularization are plain models: the
non-adaptive attack is PGD-CE (100 steps, what the defenses' authors used), the adaptive one the
``standard`` suite (APGD-CE, APGD-T on the DLR loss, FAB-T, Square), whose logit-margin losses are
not fooled by a saturated softmax. "transfer" is always the standard model's APGD-CE examples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RECIPES, RESULTS, environment, get_model, load_split, log, set_threads, shared_data_dir  # noqa: E402
from defenses_adaptive import overhead  # noqa: E402

from robustlab.attacks import build_attacks, create_attack  # noqa: E402
from robustlab.data import ImageDataset  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.eval import EvalOptions, ResultsStore, evaluate  # noqa: E402
from robustlab.predictor import predict  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

# row: (label, model key, defense specs or None for a plain model)
DEFAULT_N = {"mnist": 100, "cifar10": 50}  # the sizes the committed tables were measured at
SETTINGS = {
    "mnist": ("mnist_std", 0.3, [
        ("thermometer:levels=16", "mnist_therm", ["thermometer:levels=16"]),
        ("k-WTA 0.1 (sampled gradients)", "mnist_kwta", ["sampled-gradients:sigma=0.1,draws=16"]),
        ("distillation T=100", "mnist_distill", None),
        ("gradient-reg weight=10", "mnist_igr", None),
        ("mixup-inference", "mnist_mixup", ["mixup-inference:reference=mnist:train,draws=16"]),
        # MMC: its card declares margin-loss (cross-entropy saturates on its head), so the adaptive
        # attack is APGD-DLR and the non-adaptive one APGD-CE; the CE model with the same adversarial
        # training beside it (plain model: PGD-CE and the standard suite)
        ("MMC (standard)", "mnist_mmc", ["margin-loss"]),
        ("MMC + PGD-AT", "mnist_mmc_pgd", ["margin-loss"]),
        ("CE + PGD-AT", "mnist_pgd", None),
        ("quilting", "mnist_std", ["quilting:library=mnist:train,library_images=1000,library_patches=5000,"
                                   "patch=4,draws=4"]),
    ]),
    "cifar10": ("cifar_std", 8 / 255, [
        ("thermometer:levels=16", "cifar_therm", ["thermometer:levels=16"]),
        ("quilting", "cifar_std", ["quilting:library=cifar10:train,library_images=2000,patch=4,draws=8"]),
        ("mixup-inference", "cifar_mixup", ["mixup-inference:reference=cifar10:train,draws=16"]),
        ("k-WTA 0.1 (sampled gradients)", "cifar_kwta", ["sampled-gradients:sigma=0.03,draws=16"]),
        ("distillation T=100", "cifar_distill", None),
        ("gradient-reg weight=10", "cifar_igr", None),
    ]),
}


def robust_set(store: ResultsStore, run_id: str, task: str) -> tuple[set[int], set[int]]:
    """(clean-correct indices, robust indices) of one task of a stored run."""
    rows = store.samples(run_id, task)
    return {r.sample_index for r in rows if r.clean_correct}, {r.sample_index for r in rows if r.robust}


def run(dataset: str, n: int, db: Path, partial: Path | None = None, only_rows: list[str] | None = None) -> list[str]:
    """The section of one data set; with ``partial``, the table so far is written there after each row
    (a long run that is stopped still leaves its finished rows). With ``only_rows``, only the rows whose
    label contains one of these words run, and the rows of ``partial`` (if it exists) with other
    labels are kept."""
    key, eps, rows_spec = SETTINGS[dataset]
    if only_rows:
        rows_spec = [r for r in rows_spec if any(w.lower() in r[0].lower() for w in only_rows)]

    def merged(rows: list[str], notes: list[str]) -> tuple[list[str], list[str]]:
        # read at each write, so runs of other rows of the same data set going on beside this one keep theirs
        return _merged(*(_existing(partial) if partial is not None and only_rows else ([], [])), rows, notes)
    std, _ = get_model(key)
    x, y = load_split(dataset, "test")
    x, y = x[:n], y[:n]
    data = ImageDataset(dataset, "test", x, y, [str(i) for i in range(10)])
    threat = ThreatModel("linf", eps)
    apgd = create_attack("apgd-ce", threat, steps=100)
    options = EvalOptions(steps_grid=(), sanity=True, batch_size=100, seed=0)
    std_adv = apgd.run(std, x, y, torch.Generator().manual_seed(0)).x_adv  # the transferred examples
    rows, notes = [], []
    with ResultsStore(db) as store:
        base = evaluate(std, data, [apgd], store, model_name=key, progress=False).summary
        log(f"[{dataset}] undefended {key}: clean {base['clean_accuracy']:.3f} robust {base['robust_accuracy']:.3f}")
        for label, model_key, defenses in rows_spec:
            t0 = time.perf_counter()
            model, card = get_model(model_key)
            if defenses:
                defended = apply_defenses(model, defenses)
                res = evaluate(defended, data, [apgd], store, model_name=f"{model_key}+{label}", options=options,
                               progress=False)
                s, checks = res.summary, {c["name"]: c["status"] for c in res.checks}
                correct, adaptive = robust_set(store, res.run_id, "main")
                _, naive = robust_set(store, res.run_id, "non-adaptive")
                tasks = {t["task"] for t in store.get_run(res.run_id)["tasks"]}
                own_transfer = robust_set(store, res.run_id, "transfer")[1] if "transfer" in tasks else None
                how = defended.needs().describe()
                encoded = x[:100]
                for d in defended.defenses:
                    encoded = d.transform(encoded, torch.Generator().manual_seed(0))
                ratio = overhead(model, defended, x[:100], bare_input=encoded if encoded.shape != x[:100].shape else None)
                judge = defended
                check_cols = (checks.get("adaptive-gap"), checks.get("non-adaptive gradients"))
            else:
                plain = evaluate(model, data, [create_attack("pgd", threat, steps=100)], store,
                                 model_name=f"{model_key} pgd-ce", options=options, progress=False)
                res = evaluate(model, data, build_attacks(["standard"], threat), store, model_name=f"{model_key} standard",
                               options=EvalOptions(steps_grid=(), sanity=False, batch_size=100, seed=0), progress=False)
                s = res.summary
                correct, adaptive = robust_set(store, res.run_id, "main")
                _, naive = robust_set(store, plain.run_id, "main")
                own_transfer = None
                how = "standard suite (" + ", ".join(f"{a['name']} -> {100 * a['robust_accuracy']:.1f}%"
                                                     for a in s["attacks"]) + ")"
                ratio = 1.0
                judge = model
                pc = {c["name"]: c["status"] for c in plain.checks}
                check_cols = ("fail" if len(naive) - len(adaptive) > max(1, n // 100) else "pass", pc.get("gradients"))
            with torch.no_grad():
                judge.eval()
                pred = predict(judge, std_adv, torch.Generator().manual_seed(1))
            transfer = {i for i in correct if int(pred[i]) == int(y[i])}
            worst = adaptive & naive & transfer & (own_transfer if own_transfer is not None else adaptive)
            pct = lambda k: 100 * len(k) / n  # noqa: E731
            clean_acc = 100 * len(correct) / n
            margin = pct(worst) - 100 * base["robust_accuracy"]
            rows.append(f"| {label} | {clean_acc:5.1f}% | {pct(naive):5.1f}% | {pct(transfer):5.1f}% | "
                        f"{pct(adaptive):5.1f}% | {pct(worst):5.1f}% | {margin:+.1f} | {'yes' if margin <= 5 else 'NO'} | "
                        f"{check_cols[0]} | {check_cols[1]} | {ratio:.2f}x | {how} |")
            recipe = RECIPES[model_key]
            notes.append(f"- {label}: model {model_key} ({recipe.architecture}, {recipe.objective or 'standard'}"
                         f"{', init ' + recipe.init if recipe.init else ''}, {recipe.epochs} epoch(s) on "
                         f"{recipe.train_subset or 'all'} training images; clean test accuracy "
                         f"{100 * card['clean_accuracy']:.1f}% on the full test split, as trained: behind its "
                         f"encoding if it has one, else without the defense)")
            log(f"[{dataset}] {rows[-1]} ({time.perf_counter() - t0:.0f} s)")
            if partial is not None:
                partial.write_text("\n".join(_section(dataset, key, eps, n, base, *merged(rows, notes))
                                             + ["", PARTIAL]), encoding="utf-8")
    return _section(dataset, key, eps, n, base, *merged(rows, notes))


PARTIAL = "(partial: the run was still going)"


def _label(line: str) -> str:
    """The row label of a table row ``| label | ...`` or a note ``- label: ...``."""
    return line.split("|")[1].strip() if line.startswith("|") else line[2:].split(": model ")[0]


def _existing(path: Path) -> tuple[list[str], list[str]]:
    """(table rows, notes) of an earlier results file of one data set (empty if there is none); the notes
    are every line after the table, so hand-written notes under it survive a ``--rows`` rerun."""
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| defense") and not ln.startswith("| ---")]
    # the notes: everything after the table (model notes, replaced by label, and free text, kept as written)
    after = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("| ")), len(lines) - 1) + 1
    notes = [ln for ln in lines[after:] if ln != PARTIAL]
    while notes and not notes[0].strip():
        notes.pop(0)
    while notes and not notes[-1].strip():
        notes.pop()
    return rows, notes


def _merged(kept_rows: list[str], kept_notes: list[str], rows: list[str], notes: list[str]) -> tuple[list[str], list[str]]:
    """The earlier rows and notes with those of the labels just run replaced (new labels appended)."""
    new = {_label(r): r for r in rows}
    new_notes = {_label(nt): nt for nt in notes}
    out_rows = [new.pop(_label(r), r) for r in kept_rows] + list(new.values())
    out_notes = [new_notes.pop(_label(nt), nt) for nt in kept_notes] + list(new_notes.values())
    return out_rows, out_notes


def _section(dataset: str, key: str, eps: float, n: int, base: dict, rows: list[str], notes: list[str]) -> list[str]:
    head = [f"## {dataset}: Linf {eps:.4g}, first {n} test images (trained defenses)",
            f"undefended {key}: clean {100 * base['clean_accuracy']:.1f}%, robust (APGD-CE) "
            f"{100 * base['robust_accuracy']:.1f}%", "",
            "| defense | clean | non-adaptive | transfer (from the standard model) | adaptive | reported (worst case) | "
            "vs undefended | within 5 pts | adaptive-gap check | non-adaptive gradients | forward overhead | adaptive attack |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    return head + rows + ["", *notes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, help="first N test images (default: the size of the data set's table, "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_N.items()) + ")")
    p.add_argument("--only", choices=sorted(SETTINGS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", help="with --only: run only the rows whose label contains one of these comma-separated "
                                  "words, replacing those rows in the data set's results file")
    p.add_argument("--merge", action="store_true",
                   help="only copy the tables of defenses_trained*.txt into defenses_adaptive.txt (its last section)")
    args = p.parse_args()
    if args.merge:
        merge()
        return
    if args.rows and not args.only:
        p.error("--rows needs --only")
    set_threads(args.threads)
    os.environ.setdefault("ROBUSTLAB_DATA", str(shared_data_dir()))  # the quilting library, MI reference set
    lines = ["# Trained defenses: non-adaptive vs adaptive robust accuracy", "", environment(), ""]
    for dataset in ([args.only] if args.only else list(SETTINGS)):
        n = args.n or DEFAULT_N[dataset]
        table = RESULTS / f"defenses_trained_{dataset}.txt"
        if args.rows and table.is_file() and f"first {n} test images" not in table.read_text(encoding="utf-8"):
            p.error(f"{table.name} was measured on another number of test images than --n {n}: rerun every row "
                    "or give its --n, so one table never mixes sizes")
        db = RESULTS.parent / ".cache" / f"defenses_trained_{dataset}{'_' + args.rows.replace(',', '_') if args.rows else ''}.db"
        db.parent.mkdir(exist_ok=True)
        db.unlink(missing_ok=True)
        lines += run(dataset, n, db, RESULTS / f"defenses_trained_{dataset}.txt" if args.only else None,
                     args.rows.split(",") if args.rows else None) + [""]
    name = "defenses_trained" + (f"_{args.only}" if args.only else "")
    write = RESULTS / f"{name}.txt"
    write.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


MARKER = "# Defenses that need a trained model or component (benchmarks/defenses_trained.py)"


def merge() -> None:
    """Put the tables of the trained-defense results (per data set files, or the combined one) into
    defenses_adaptive.txt as its last section, replacing an earlier copy."""
    files = [RESULTS / f"defenses_trained_{d}.txt" for d in SETTINGS]
    files = [f for f in files if f.is_file()] or [RESULTS / "defenses_trained.txt"]
    parts = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        parts.append(text[text.index("## "):].strip())
    target = RESULTS / "defenses_adaptive.txt"
    head = target.read_text(encoding="utf-8").split(MARKER)[0].rstrip()
    doc = " ".join(next(p for p in __doc__.split("\n\n") if p.startswith("Attacks:")).split())
    target.write_text("\n\n".join([head, MARKER, doc, *parts]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
