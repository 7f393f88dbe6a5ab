"""Command line: ``repedit <command> ...`` (see ``repedit --help``)."""

from __future__ import annotations

import argparse
import sys

from .io import InputError


def _capture(args: argparse.Namespace) -> None:
    from .capture import capture
    from .inputs import read_inputs_jsonl
    from .models import load_model

    items, metadata = read_inputs_jsonl(args.inputs)
    model, tokenizer = load_model(args.model)
    acts = capture(
        model, tokenizer, items, sites=args.sites, position=args.position,
        span=args.span, batch_size=args.batch_size, padding_side=args.padding_side, max_length=args.max_length,
        truncation=args.truncation, metadata=metadata, backend=args.backend, out_dir=args.out,
        shard_size=args.shard_size,
    )
    print(f"captured {acts.n_items} inputs x {len(acts.sites)} sites ({acts.position}, span {acts.span}) -> {args.out}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.model, args.out, position=args.position)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repedit", description="Representation editing for per-user LLM personalisation.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main job on the embedded default model and write an HTML report")
    demo.add_argument("--model", default="smollm2-135m-instruct", help="model alias, HF id, local folder or .gguf path")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--position", default="mean", choices=["last", "mean"])
    demo.set_defaults(run=_demo)

    cap = commands.add_parser("capture", help="capture hidden states of inputs from a JSONL file")
    cap.add_argument("--inputs", required=True, help="JSONL: strings, or objects with 'text', 'messages', or 'prompt'+'response' (other fields kept as metadata)")
    cap.add_argument("--out", required=True, help="output directory (activations.json + safetensors shards; an interrupted run resumes)")
    cap.add_argument("--model", default="smollm2-135m-instruct", help="model alias, HF id, local folder or .gguf path")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as err:
        print(f"repedit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
