"""``robustlab zoo``: list, show and add models of the local zoo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustlab.cli.common import DEFAULT_DB, _require_db
from robustlab.errors import RobustlabError


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _model_text(card) -> str:
    """The architecture, or the entry point without its folder (file.py:function, module:function)."""
    if card.architecture:
        return _cut(card.architecture, 24)
    target, _, function = card.entry_point.rpartition(":")
    return _cut(f"{Path(target).name}:{function}", 24)


def cmd_zoo(args: argparse.Namespace) -> int:
    from robustlab.models.checkpoint import read_card
    from robustlab.models.zoo import add_to_zoo, list_zoo, zoo_card, zoo_root

    if args.zoo_command == "list":
        entries = list_zoo(args.zoo)
        if not entries:
            print(f"the zoo at {zoo_root(args.zoo)} is empty; add a checkpoint with `robustlab zoo add`")
            return 0
        print(f"{'name':<28} {'source':<11} {'model':<24} {'defense':<16} {'dataset':<22} {'clean':>8}  "
              f"robust accuracy  sha256")
        for name, card in entries:
            robust = ", ".join(f"{k}: {100 * v:.2f}%" for k, v in (card.robust_accuracy or {}).items()) or "—"
            clean = f"{100 * card.clean_accuracy:.2f}%" if card.clean_accuracy is not None else "—"
            defense = "+".join(d["name"] for d in card.defense) or "—"
            print(f"{name:<28} {card.source:<11} {_model_text(card):<24} {_cut(defense, 16):<16} "
                  f"{card.dataset[:22]:<22} {clean:>8}  {robust}  {card.sha256[:12]}")
        return 0
    if args.zoo_command == "show":
        print(json.dumps(zoo_card(args.name, args.zoo).to_dict(), indent=2))
        return 0
    from robustlab.defenses import build_defenses

    defense = [d.config() for d in build_defenses(args.defense or [])]
    robust, clean = None, None
    if args.run:
        from robustlab.eval.store import ResultsStore

        _require_db(args.db)
        with ResultsStore(args.db, readonly=True) as store:
            run = store.get_run(args.run)
        if run["status"] != "complete":
            raise RobustlabError(f"run {run['run_id']} is not complete; finish it with --resume first")
        if run["protocol"] != "adversarial":
            raise RobustlabError(f"run {run['run_id']} is a {run['protocol']} run; zoo add records adversarial runs")
        ran = run["config"].get("defenses") or []
        if args.defense is None:
            defense = ran  # the entry is the model the run evaluated
        elif defense != ran:
            raise RobustlabError(f"run {run['run_id']} evaluated the model behind defenses "
                                 f"{[d['name'] for d in ran] or 'none'}, not {[d['name'] for d in defense]}: "
                                 "its accuracies do not describe this entry")
        s, attacks = run["summary"], "+".join(a["name"] for a in run["attacks"])
        threat = s["threat"]
        # The run's clean accuracy is on its n examples: it goes with the robust number, and becomes
        # the card's clean accuracy only if the card has none (the trainer measures it on the whole
        # test split).
        robust = {f"{threat['norm']}:{threat['eps']:g} {attacks} (n={s['n']}, clean {100 * s['clean_accuracy']:.2f}%, "
                  f"run {run['run_id']})": s["robust_accuracy"]}
        clean = s["clean_accuracy"] if read_card(args.checkpoint).clean_accuracy is None else None
    path = add_to_zoo(args.checkpoint, args.name, args.zoo, robust, clean, overwrite=args.overwrite, defense=defense)
    print(path)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zoo", help="the local model zoo: list, show, add (models load as --model zoo:NAME)")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zl = zsub.add_parser("list", help="list the zoo's models with their measured accuracies")
    zs = zsub.add_parser("show", help="print a model's card")
    zs.add_argument("name", help="the entry's name (as in `robustlab zoo list`)")
    za = zsub.add_parser("add", help="add a checkpoint (verified by hash) under a name")
    za.add_argument("checkpoint", help="X.safetensors with its card X.json beside it")
    za.add_argument("--name", required=True, help="the entry's name: letters, digits, '.', '_' and '-'; the model then "
                    "loads as --model zoo:NAME")
    za.add_argument("--run", help="record the accuracies of this complete run (id, prefix or 'latest')")
    za.add_argument("--db", default=DEFAULT_DB, help="results store holding --run")
    za.add_argument("--defense", action="append", metavar="NAME[:key=value,...]",
                    help="the entry is the model behind this defense (repeat: applied in order); default: the "
                         "defenses --run evaluated, if any")
    za.add_argument("--overwrite", action="store_true",
                    help="replace the entry NAME; with the same weights, the accuracies its card records are kept")
    for zp in (zl, zs, za):
        zp.add_argument("--zoo", help="zoo folder (default $ROBUSTLAB_ZOO or ~/.robustlab/zoo)")
    z.set_defaults(func=cmd_zoo)
