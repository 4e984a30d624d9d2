"""``robustlab zeroshot``: zero-shot clean and robust accuracy of a vision-language model (CLIP-like) on
many data sets in one run, recorded in the results store."""

from __future__ import annotations

import argparse

from robustlab.cli.common import (
    _argument_type,
    DEFAULT_DB,
    _device,
    _floats,
    print_run,
    rank_store,
    _say,
    _threat,
)
from robustlab.cli.inputs import check_data_spec
from robustlab.errors import RobustlabError

DEFAULT_EPS_TEXT = "1/255,4/255"


def _prompt_files(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, path = item.partition("=")
        if not sep or not key.strip() or not path.strip():
            raise RobustlabError(f"--prompts takes DATASET=FILE (e.g. imagenet-val=names.txt), got {item!r}")
        out[key.strip()] = path.strip()
    return out


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from robustlab import distributed
    from robustlab.attacks import build_attacks
    from robustlab.eval.runner import zero_shot
    from robustlab.report.zero_shot import format_zero_shot
    from robustlab.vlm.loading import load_vlm
    from robustlab.vlm.suite import build_sets, parse_data_list

    eps = tuple(args.eps)
    if not eps or any(e <= 0 for e in eps):
        raise RobustlabError(f"--eps needs radii > 0, got {', '.join(f'{e:g}' for e in eps) or 'none'}")
    threat = _threat(args.norm, max(eps))
    attacks = build_attacks(args.attack or ["pgd"], threat)
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    specs = parse_data_list(args.data)
    for spec in specs:  # unknown names and missing folders fail before the model is loaded
        check_data_spec(spec)
    prompts = _prompt_files(args.prompts)
    device = _device(args.device)
    vlm, info = load_vlm(args.vlm, args.weights, device)
    sets = build_sets(vlm, specs, split=args.split, root=args.data_root, n=args.n, prompts=prompts,
                      templates=args.templates, at_model_size=args.at_model_size)
    with rank_store(args.db) as store:
        result = zero_shot(sets, attacks, store, eps=eps, sanity_checks=not args.no_sanity, vlm_info=info,
                           seed=args.seed, batch_size=args.batch_size, model_name=args.vlm, resume=args.resume,
                           device=device, log=_say)
    if not distributed.is_main():
        return 0
    return print_run(args, result, format_zero_shot(result.summary, result.checks),
                     {**result.summary, "checks": result.checks})


def add_parser(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zeroshot", help="zero-shot clean and robust accuracy of a CLIP-like model on many data sets")
    z.add_argument("--vlm", required=True, help="the vision-language model: open_clip:NAME with --weights FILE (an open_clip architecture such as "
                   "ViT-B-32, or ViT-B-32-quickgelu for OpenAI's weights), hf:FOLDER (a saved transformers CLIPModel "
                   "with its tokenizer), or another kind registered with robustlab.vlm.loading; nothing is downloaded")
    z.add_argument("--weights", metavar="FILE",
                   help="open_clip checkpoint on disk (.safetensors, or .pt/.bin read with weights_only=True)")
    z.add_argument("--data", required=True,
                   help="comma-separated data sets: names (digits, mnist, fashion_mnist, cifar10, cifar100, svhn; read "
                   "from --data-root at their own resolution), image folder paths, or imagenet-val:DIR (streamed from "
                   "disk, resized and centre-cropped to the model's input size)")
    z.add_argument("--split", default="test")
    z.add_argument("--data-root")
    z.add_argument("--n", "--num-examples", dest="n", type=int,
                   help="evaluate the first N examples of each data set, in order (default: all)")
    z.add_argument("--norm", default="linf", help="threat model norm: linf (default), l2 or l1")
    z.add_argument("--eps", type=_argument_type(_floats), default=_floats(DEFAULT_EPS_TEXT),
                   help=f"comma-separated radii in [0, 1] pixel units, one task per data set and radius "
                   f"(default {DEFAULT_EPS_TEXT})")
    z.add_argument("--attack", action="append", metavar="NAME[:key=value,...]",
                   help="attack to run (repeat for an ensemble), or a suite (standard: AutoAttack's); default pgd. "
                   "TeCoA's protocol: pgd:steps=100; the leaderboard ranks runs with the standard suite")
    z.add_argument("--prompts", action="append", metavar="DATASET=FILE",
                   help="class names (and templates) for a data set from a file: JSON {\"classes\": [...] or "
                   "{folder: name}, \"templates\": [...]}, or text (one class per line in label order, or "
                   "'FOLDER: name'; lines with {} are templates); repeat per data set")
    z.add_argument("--templates", metavar="SET",
                   help="prompt template set for every data set: photo, digits, clothing, single or tecoa (default: "
                   "each data set's own)")
    z.add_argument("--at-model-size", action="store_true",
                   help="resize named data sets to the model's input size before the attack (TeCoA's protocol: "
                   "eps then holds at 224x224); default: attack at the data set's own resolution, the model resizes "
                   "after. Image folders are always resized and cropped to the model's input size")
    z.add_argument("--batch-size", type=int, default=64)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--device", default="auto")
    z.add_argument("--db", default=DEFAULT_DB)
    z.add_argument("--resume", action="store_true", help="continue an unfinished run with the same configuration")
    z.add_argument("--no-sanity", action="store_true", help="skip the gradient and large-epsilon sanity checks")
    z.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    z.set_defaults(func=cmd_zeroshot)
