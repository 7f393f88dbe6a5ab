"""``repedit store ...`` and ``repedit export gguf``: the vector store and GGUF control vectors from the command line.

    repedit store list     --store DIR
    repedit store add      --store DIR --pairs pairs.jsonl [--model M] [--method caa|stylevector|...] [--layers L ...]
    repedit store update   --store DIR --pairs new.jsonl [--model M] [--decay G]
    repedit store forget   --store DIR --user ID [ID ...]          (delete the users completely)
    repedit store forget   --store DIR --decay G [--user ID ...]   (down-weight old evidence instead)
    repedit store compress --store DIR --k K [--model M [--prompts FILE]] [--report report.json]
    repedit store import-gguf --store DIR --gguf file.gguf --user ID [--model M]
    repedit export gguf    --store DIR --user ID --out file.gguf [--factor S | --no-bake]
"""

from __future__ import annotations

import argparse
import json

from ..io import InputError, write_json
from .common import add_model_argument, parse_positions


def _open(args: argparse.Namespace, create: bool = False):
    from ..store.vectors import VectorStore

    return VectorStore(args.store, create=create)


def _list(args: argparse.Namespace) -> None:
    entries = _open(args).entries()
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
        return
    for user, entry in entries.items():
        weight = "-" if entry["weight"] is None else f"{entry['weight']:g}"
        print(f"{user}\t{entry['method'] or '-'}\t{','.join(entry['sites'])}\tweight {weight}\t{'compressed' if entry['compressed'] else 'full'}")
    print(f"{len(entries)} users in {args.store}")


def _add(args: argparse.Namespace) -> None:
    from ..model.loading import load_model
    from ..pairs.synthesis import read_pairs

    pairs = read_pairs(args.pairs)
    store = _open(args, create=True)
    model, tokenizer = load_model(args.model)
    edits = store.add(model, tokenizer, pairs, method=args.method, layers=args.layers, strength=args.strength,
                      positions=parse_positions(args.positions), replace_existing=args.replace, batch_size=args.batch_size)
    for user, edit in edits.items():
        print(f"{user}: {edit.method} at {', '.join(edit.sites)} from {edit.provenance['n_pairs']} pairs")
    print(f"{len(edits)} users added -> {args.store}")


def _update(args: argparse.Namespace) -> None:
    from ..model.loading import load_model
    from ..pairs.synthesis import read_pairs

    pairs = read_pairs(args.pairs)
    store = _open(args)
    model, tokenizer = load_model(args.model)
    edits = store.update(model, tokenizer, pairs, decay=args.decay, batch_size=args.batch_size)
    for user in edits:
        print(f"{user}: {edits[user].provenance['n_pairs']} pairs in total, evidence weight {store.weight(user):g}")
    print(f"{len(edits)} users updated in {args.store}")


def _forget(args: argparse.Namespace) -> None:
    store = _open(args)
    if args.decay is not None:
        store.decay(args.decay, args.user)
        print(f"evidence of {', '.join(args.user) if args.user else 'every user'} multiplied by {args.decay:g}")
        return
    if not args.user:
        raise InputError("forget needs --user ID (to delete) or --decay G (to down-weight old evidence)")
    for user in args.user:
        store.forget(user)
        print(f"{user}: deleted from {args.store}")


def _compress(args: argparse.Namespace) -> None:
    store = _open(args)
    model = tokenizer = prompts = None
    if args.model is not None:
        from ..model.loading import load_model
        from ..pairs.users import demo_prompts_path, read_prompts

        model, tokenizer = load_model(args.model)
        prompts = read_prompts(demo_prompts_path() if args.prompts == "demo" else args.prompts)[: args.max_prompts]
    report = store.compress(args.k, model=model, tokenizer=tokenizer, prompts=prompts)
    for user in report.users:
        errors = ", ".join(f"{site} {error:.3f}" for site, error in report.reconstruction_error[user].items())
        effect = report.effect[user] if report.effect else None
        extra = f"; effect lost {effect['effect_lost']:.3f}, KL to original {effect['kl_to_original']:.4f} nats/token" if effect else ""
        print(f"{user}: relative reconstruction error {errors}{extra}")
    for user, reason in report.skipped.items():
        print(f"{user}: not compressed ({reason})")
    print(f"k={args.k}: vectors {report.tensor_bytes_before} -> {report.tensor_bytes_after} bytes ({report.tensor_ratio:.2f}x), "
          f"with metadata {report.total_bytes_before} -> {report.total_bytes_after} bytes ({report.total_ratio:.2f}x)")
    if args.report:
        write_json(args.report, report.to_dict())
        print(f"report -> {args.report}")


def _import_gguf(args: argparse.Namespace) -> None:
    from ..model.loading import load_model
    from ..store.gguf import import_gguf

    model, _ = load_model(args.model)
    edit = import_gguf(args.gguf, user_id=args.user, model=model)
    _open(args, create=True).put(edit, replace_existing=args.replace)
    print(f"{edit.user_id}: {len(edit.edits)} control-vector layers ({', '.join(edit.sites)}) imported into {args.store}")


def _export_gguf(args: argparse.Namespace) -> None:
    from ..store.gguf import export_gguf

    edit = _open(args).get(args.user)
    result = export_gguf(edit, args.out, factor=1.0 if args.factor is None else args.factor, bake=not args.no_bake)
    print(f"{args.user}: direction.{', direction.'.join(map(str, result.layers))} -> {result.path}")
    print(f"llama.cpp: llama-cli -m MODEL.gguf {result.llama_cpp_flag()}")


def _guard(run):
    def wrapped(args: argparse.Namespace) -> None:
        from ..store.vectors import UnknownUserError

        try:
            run(args)
        except UnknownUserError as err:  # a KeyError: turn it into the CLI's clean error path
            raise InputError(str(err)) from None

    return wrapped


def add_commands(commands) -> None:
    """Register ``store`` and ``export`` on the top-level subparsers of :func:`repedit.cli.main.build_parser`."""
    store = commands.add_parser("store", help="per-user vector store: list, add, update, forget, compress, import-gguf")
    sub = store.add_subparsers(dest="store_command", required=True)

    def command(name: str, help_text: str, run) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--store", required=True, help="store directory (a `repedit fit` output is one)")
        parser.set_defaults(run=_guard(run))
        return parser

    listing = command("list", "list the users: method, sites, evidence weight, compressed or not", _list)
    listing.add_argument("--json", action="store_true", help="print the index entries as JSON")

    add = command("add", "fit new users from pairs and add them (the store is created if needed)", _add)
    add.add_argument("--pairs", required=True, help="pairs JSONL/CSV (repedit pairs output, or your own)")
    add_model_argument(add)
    add.add_argument("--method", default="caa", choices=["caa", "pca", "chameleon", "stylevector"],
                     help="caa and stylevector keep running statistics (update works on them)")
    add.add_argument("--layers", type=int, nargs="+", default=None, help="resid_post layers (default: 40%% depth)")
    add.add_argument("--strength", type=float, default=1.0)
    add.add_argument("--positions", default="all", help="all, prompt, generated, or a token index")
    add.add_argument("--replace", action="store_true", help="refit users already in the store from these pairs only")
    add.add_argument("--batch-size", type=int, default=8)

    update = command("update", "fold new pairs into users' running means (no refit from scratch)", _update)
    update.add_argument("--pairs", required=True)
    add_model_argument(update)
    update.add_argument("--decay", type=float, default=1.0, help="weight of the old evidence, in (0, 1] (1 = plain running mean)")
    update.add_argument("--batch-size", type=int, default=8)

    forget = command("forget", "delete users completely, or (--decay) down-weight their old evidence", _forget)
    forget.add_argument("--user", nargs="+", default=None)
    forget.add_argument("--decay", type=float, default=None, help="multiply the evidence weight by G in (0, 1] instead of deleting")

    compress = command("compress", "shared PCA basis per site; users keep only k coefficients", _compress)
    compress.add_argument("--k", type=int, required=True, help="basis size per site")
    compress.add_argument("--model", default=None, help="measure the steering effect lost on this model (the edits' model)")
    compress.add_argument("--prompts", default="demo", help="prompts for the effect measurement (.txt/.jsonl, or 'demo')")
    compress.add_argument("--max-prompts", type=int, default=8)
    compress.add_argument("--report", default=None, help="write the full report as JSON here")

    imp = command("import-gguf", "import a GGUF control vector (repeng, llama.cpp, repedit) as a user's edit", _import_gguf)
    imp.add_argument("--gguf", required=True, help="control-vector .gguf file")
    imp.add_argument("--user", required=True)
    add_model_argument(imp, "the model the vector was made for")
    imp.add_argument("--replace", action="store_true")

    export = commands.add_parser("export", help="export a user's edit for other runtimes (llama.cpp GGUF control vector)")
    export_sub = export.add_subparsers(dest="export_command", required=True)
    gguf = export_sub.add_parser("gguf", help="write a llama.cpp control vector (.gguf) of a user's additive edit")
    gguf.add_argument("--store", required=True)
    gguf.add_argument("--user", required=True)
    gguf.add_argument("--out", required=True, help="output .gguf file")
    scale = gguf.add_mutually_exclusive_group()
    scale.add_argument("--factor", type=float, default=None, help="strength factor baked into the vectors, x the edit's strength (default 1)")
    scale.add_argument("--no-bake", action="store_true", help="write unscaled vectors; use llama.cpp's --control-vector-scaled")
    gguf.set_defaults(run=_guard(_export_gguf))
