"""``repedit capture`` and ``repedit probe``: hidden states of inputs, and where personalisation is represented."""

from __future__ import annotations

import argparse

from ..io import InputError
from .common import add_model_argument


def _capture(args: argparse.Namespace) -> None:
    from ..capture.activations import capture
    from ..model.inputs import read_inputs_jsonl
    from ..model.loading import load_model

    items, metadata = read_inputs_jsonl(args.inputs)
    model, tokenizer = load_model(args.model)
    acts = capture(
        model, tokenizer, items, sites=args.sites, position=args.position,
        span=args.span, batch_size=args.batch_size, padding_side=args.padding_side, max_length=args.max_length,
        truncation=args.truncation, metadata=metadata, backend=args.backend, out_dir=args.out,
        shard_size=args.shard_size,
    )
    print(f"captured {acts.n_items} inputs x {len(acts.sites)} sites ({acts.position}, span {acts.span}) -> {args.out}")


def _probe(args: argparse.Namespace) -> None:
    from ..capture.activations import Activations
    from ..probes.validation import probe_sites
    from ..report.probe_report import item_texts, write_report

    acts = Activations.load(args.acts)
    model = tokenizer = None
    if args.model is not None:
        from ..model.loading import load_model, model_fingerprint

        model, tokenizer = load_model(args.model)
        # A direction only means something in the space of the model it was found in.
        if model_fingerprint(model) != acts.model_fingerprint:
            raise InputError(
                f"--model {args.model} (fingerprint {model_fingerprint(model)}) is not the model the activations in "
                f"{args.acts} were captured with ({acts.model_name or '?'}, fingerprint {acts.model_fingerprint})"
            )
    report = probe_sites(
        acts, methods=args.methods, sites=args.sites, users=not args.pooled_only, folds=args.folds, seed=args.seed,
        min_user_pairs=args.min_user_pairs, top=args.top,
    )
    path = write_report(report, acts, args.out, texts=item_texts(acts), model=model, tokenizer=tokenizer)
    print(f"probed {len(report.settings.get('sites', acts.sites))} sites x {len(args.methods)} methods on {acts.n_items} items "
          f"({len(report.settings.get('users', []))} users evaluated separately)")
    for rank, entry in enumerate(report.selected, start=1):
        print(f"  #{rank} {entry['site']} {entry['method']}: accuracy {entry['accuracy']:.3f}, "
              f"selectivity {entry['selectivity']:.3f}, margin {entry['margin']:.2f}")
    print(f"report -> {path}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    cap = commands.add_parser("capture", help="capture hidden states of inputs from a JSONL file")
    cap.add_argument("--inputs", required=True, help="JSONL: strings, or objects with 'text', 'messages', or 'prompt'+'response' (other fields kept as metadata)")
    cap.add_argument("--out", required=True, help="output directory (activations.json + safetensors shards; an interrupted run resumes)")
    add_model_argument(cap)
    cap.add_argument("--sites", nargs="+", default=["resid_post"], help="site names (resid_post.6) or kinds (resid_post = every layer)")
    cap.add_argument("--position", default="last", choices=["last", "mean", "all"])
    cap.add_argument("--span", default="full", choices=["full", "prompt", "response"])
    cap.add_argument("--batch-size", type=int, default=8)
    cap.add_argument("--padding-side", default="right", choices=["left", "right"])
    cap.add_argument("--max-length", type=int, default=None, help="context limit in tokens (default: the model's)")
    cap.add_argument("--truncation", default="left", choices=["left", "right", "error"])
    cap.add_argument("--backend", default="torch", choices=["torch", "transformer_lens", "nnsight"])
    cap.add_argument("--shard-size", type=int, default=512)
    cap.set_defaults(run=_capture)
    from ..probes.methods import METHODS
    from ..probes.validation import DEFAULT_METHODS

    probe = commands.add_parser("probe", help="find where personalisation is represented: cross-validated probes by site, HTML report")
    probe.add_argument("--acts", required=True, help="activations directory of pairs (repedit capture / capture_pairs, position mean or last)")
    probe.add_argument("--out", required=True, help="output directory: report.html, report.json, probes.safetensors + probes.json")
    probe.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS), metavar="METHOD",
                       help=f"probe methods, from {', '.join(sorted(METHODS))} (default: {' '.join(DEFAULT_METHODS)})")
    probe.add_argument("--sites", nargs="+", default=None, help="sites to probe (default: every captured site)")
    probe.add_argument("--folds", type=int, default=5, help="group-aware cross-validation folds (default 5)")
    probe.add_argument("--top", type=int, default=3, help="how many best sites to select (default 3)")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--min-user-pairs", type=int, default=8, help="evaluate a user separately only with at least this many pairs")
    probe.add_argument("--pooled-only", action="store_true", help="skip the per-user evaluations")
    probe.add_argument("--model", default=None, help="the model the activations come from: enables the logit lens in the report")
    probe.set_defaults(run=_probe)
