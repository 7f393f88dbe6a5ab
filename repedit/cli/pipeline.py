"""``repedit demo``: the main job, the whole pipeline behind one command."""

from __future__ import annotations

import argparse

from .common import add_model_argument


def _demo(args: argparse.Namespace) -> None:
    from ..pipeline import DemoSettings, run_demo

    settings = DemoSettings(
        n_users=args.n_users, n_prompts=args.n_prompts, hold_out=args.hold_out, pair_tokens=args.pair_tokens, probe_every=args.probe_every,
        layers=tuple(args.layers), strengths=tuple(args.strengths), max_kl=args.max_kl, eval_tokens=args.eval_tokens, method=args.method,
        train_epochs=args.train_epochs,
    )
    run_demo(args.model, args.out, settings)


def _demo_defaults():
    from ..pipeline import DemoSettings

    return DemoSettings()


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the main job: the whole pipeline on the demo users and the default model, one HTML report; resumable")
    add_model_argument(demo)
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    defaults = _demo_defaults()
    demo.add_argument("--n-users", type=int, default=defaults.n_users, help="use the first N demo users")
    demo.add_argument("--n-prompts", type=int, default=defaults.n_prompts, help="self-generated pairs per user")
    demo.add_argument("--hold-out", type=int, default=defaults.hold_out, help="history items per user kept unseen for evaluation")
    demo.add_argument("--pair-tokens", type=int, default=defaults.pair_tokens, help="max new tokens of generated pair answers")
    demo.add_argument("--probe-every", type=int, default=defaults.probe_every, help="probe every n-th resid_post layer")
    demo.add_argument("--method", default=defaults.method, choices=["trained", "trained_lowrank", "stylevector", "caa", "pca", "chameleon"],
                      help="edit method (default: trained vectors, strength chosen by the fluency of generated answers)")
    demo.add_argument("--train-epochs", type=int, default=defaults.train_epochs, help="most epochs of the trained edits (early stopping per user)")
    demo.add_argument("--layers", type=int, nargs="+", default=list(defaults.layers), help="layers swept by the KL-limited selection (fit methods)")
    demo.add_argument("--strengths", type=float, nargs="+", default=list(defaults.strengths), help="strengths swept by the selection")
    demo.add_argument("--max-kl", type=float, default=defaults.max_kl, help="fluency limit, nats/token")
    demo.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, help="max new tokens of evaluation answers")
    demo.set_defaults(run=_demo)
