"""Command line: ``repedit <command> ...`` (see ``repedit --help``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .io import InputError
from .pairs import DEFAULT_SETTINGS as PAIR_SETTINGS


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


def _pairs(args: argparse.Namespace) -> None:
    from .generation import GenerationSettings
    from .models import load_model
    from .pairs import generate
    from .userdata import demo_prompts_path, demo_users_path, read_prompts, read_users

    users = read_users(demo_users_path() if args.users == "demo" else args.users)[: args.max_users]
    if args.hold_out:
        from .userdata import split_history

        users, _ = split_history(users, args.hold_out)  # keep them unseen for `repedit eval --hold-out`
    prompts = read_prompts(demo_prompts_path() if args.prompts == "demo" else args.prompts)[: args.max_prompts]
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, batch_size=args.batch_size, repetition_penalty=args.repetition_penalty,
    )
    model, tokenizer = load_model(args.model)
    pairs = generate(
        model, tokenizer, users, prompts, out=args.out, k=args.k, settings=settings, near_duplicate=args.near_duplicate,
        real_history=not args.no_real_history, truncated=args.truncated,
    )
    by_source: dict[str, int] = {}
    for pair in pairs:
        by_source[pair.source] = by_source.get(pair.source, 0) + 1
    print(f"{len(pairs)} pairs for {len(users)} users x {len(prompts)} prompts -> {args.out} ({by_source}); "
          f"dropped pairs and their reasons are in {args.out}.state.json")


def _probe(args: argparse.Namespace) -> None:
    from .capture import Activations
    from .probes.evaluate import probe_sites
    from .probes.report import item_texts, write_report

    acts = Activations.load(args.acts)
    model = tokenizer = None
    if args.model is not None:
        from .models import load_model, model_fingerprint

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


def _fit(args: argparse.Namespace) -> None:
    from .models import load_model
    from .pairs import read_pairs
    from .steering.fit import fit_user_edits, save_edits

    pairs = read_pairs(args.pairs)
    model, tokenizer = load_model(args.model)
    positions = int(args.positions) if args.positions.isdigit() else args.positions
    if args.method in ("trained", "trained_lowrank"):
        edits = _fit_trained(args, model, tokenizer, pairs)
        edits = {user: dataclasses.replace(edit, positions=positions) for user, edit in edits.items()}
    elif args.auto:
        from .io import write_json
        from .steering.fit import default_layers
        from .steering.select import select_layer_strength, split_for_selection

        train, held_out, neutral = split_for_selection(pairs, args.held_out_fraction)
        layers = args.layers or sorted({max(1, int(default_layers(model)[0] * f)) for f in (0.5, 0.75, 1.0, 1.25)})
        selection = select_layer_strength(
            model, tokenizer, train, held_out, neutral, method=args.method, layers=layers, strengths=args.strengths,
            max_kl=args.max_kl, batch_size=args.batch_size,
        )
        edits = {user: dataclasses.replace(edit, positions=positions) for user, edit in selection.edits.items()}
        write_json(f"{args.out}/selection.json", {"max_kl": selection.max_kl, "choices": selection.choices, "grid": selection.grid})
        for user, choice in selection.choices.items():
            print(f"{user}: layer {choice['layer']}, strength {choice['strength']}, held-out gain {choice['gain']:+.3f} nats/token, KL {choice['kl']:.3f}")
    else:
        edits = fit_user_edits(
            model, tokenizer, pairs, method=args.method, layers=args.layers, strength=args.strength,
            neutral_strength=args.neutral_strength, positions=positions, batch_size=args.batch_size,
        )
    save_edits(edits, args.out)
    for user_id, edit in edits.items():
        print(f"{user_id}: {edit.method} at {', '.join(edit.sites)} from {edit.provenance['n_pairs']} pairs")
    print(f"{len(edits)} edits -> {args.out}")


def _fit_trained(args: argparse.Namespace, model, tokenizer, pairs) -> dict:
    """``repedit fit --method trained|trained_lowrank``: train, then (with ``--auto``) pick each user's
    strength by the fluency of generated answers on their validation items; writes ``training.json``."""
    from .io import write_json
    from .pairs import REAL_HISTORY
    from .steering.train import TrainSettings, train_user_edits, validation_items

    settings = TrainSettings(
        kind="lowrank" if args.method == "trained_lowrank" else "vector", layers=tuple(args.layers) if args.layers else None,
        rank=args.rank, epochs=args.epochs, lr=args.lr, kl_weight=args.kl_weight, preference_weight=args.preference_weight,
        val_items=args.val_items, batch_size=args.batch_size, seed=args.seed,
    )
    result = train_user_edits(model, tokenizer, pairs, settings=settings)
    record = {"settings": result.settings, "best": result.best, "history": result.history, "seconds": result.seconds}
    edits = result.edits
    if args.auto:
        from .steering.strength import select_strength_by_generation

        validation = validation_items(pairs, settings.val_items)
        neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in pairs if p.source != REAL_HISTORY))[:4]
        selection = select_strength_by_generation(model, tokenizer, edits, validation, neutral=neutral, factors=args.strengths)
        edits = selection.edits
        record["selection"] = {"choices": selection.choices, "grid": selection.grid}
        write_json(f"{args.out}/selection.json", {"max_kl": None, "choices": selection.choices, "grid": selection.grid, "rule": "fluency"})
        for user, choice in selection.choices.items():
            print(f"{user}: strength {choice['strength']}, validation gain {choice['gain']:+.3f} nats/token, KL {choice['kl']:.3f}, "
                  f"fluent {choice['fluent']}")
    write_json(f"{args.out}/training.json", record)
    for user, best in result.best.items():
        print(f"{user}: validation NLL {best['unsteered_val_nll']:.3f} unsteered -> {best['init_val_nll']:.3f} mean difference -> "
              f"{best['val_nll']:.3f} trained (epoch {best['epoch']})")
    print(f"trained {len(result.edits)} users jointly in {result.seconds:.1f} s")
    return edits


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .embedding import default_embedder, minilm_embedder, model_embedder
    from .generation import GenerationSettings
    from .io import read_json
    from .models import load_model
    from .pairs import read_pairs
    from .steering.eval_report import format_conditions_table, write_eval_report
    from .store import VectorStore
    from .steering.evaluation import EVAL_SETTINGS, eval_inputs, evaluate_users
    from .userdata import demo_users_path, read_users

    users = read_users(demo_users_path() if args.users == "demo" else args.users)
    inputs = eval_inputs(users, read_pairs(args.pairs), args.hold_out)
    edits_dir = Path(args.edits)
    store = VectorStore(edits_dir)  # a `repedit fit` directory or a `repedit store` store
    model, tokenizer = load_model(args.model)
    edits = {user: store.get(user, model=model) for user in store.list_users()}
    embedder = {"auto": lambda: default_embedder(model, tokenizer), "minilm": minilm_embedder,
                "model": lambda: model_embedder(model, tokenizer)}[args.embedder]()
    selection = read_json(edits_dir / "selection.json") if (edits_dir / "selection.json").exists() else {}
    settings = GenerationSettings(**{**EVAL_SETTINGS.to_dict(), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size})
    evaluation = evaluate_users(
        model, tokenizer, inputs.test_items, edits, insights=inputs.insights, history=inputs.history, neutral=inputs.neutral,
        embedder=embedder, examples=inputs.examples, factors=args.factors, settings=settings, max_kl=selection.get("max_kl") or args.max_kl,
    )
    path = write_eval_report(evaluation, args.out, grid=selection.get("grid"))
    s = evaluation.summary
    for user, metrics in evaluation.per_user.items():
        print(f"{user}: held-out loglik unsteered {metrics['unsteered']['loglik']:.3f}, prompt-only {metrics['prompt_only']['loglik']:.3f}, "
              f"steered {metrics['steered']['loglik']:.3f} (KL {metrics['steered']['kl']:.3f}); style margin "
              f"{metrics['unsteered']['style_margin']:+.3f} / {metrics['prompt_only']['style_margin']:+.3f} / {metrics['steered']['style_margin']:+.3f}")
    print(f"steered beats unsteered on held-out log-likelihood for {s['steered']['users_loglik_better']}/{s['n_users']} users "
          f"(mean {s['steered']['loglik_gain']:+.3f} nats/token), prompt-only for {s['prompt_only']['users_loglik_better']}/{s['n_users']}")
    print(format_conditions_table(evaluation))
    print(f"report -> {path}")


def _serve(args: argparse.Namespace) -> None:
    from .serve.app import run_server
    from .serve.protocol import Limits

    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                    default_temperature=args.default_temperature)
    run_server(args.model, args.store, host=args.host, port=args.port, tokens=args.tokens, served_name=args.served_name, limits=limits,
               max_batch_size=args.max_batch_size, batch_window=args.batch_window_ms / 1000, log_level=args.log_level)


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        n_users=args.n_users, n_prompts=args.n_prompts, hold_out=args.hold_out, pair_tokens=args.pair_tokens, probe_every=args.probe_every,
        layers=tuple(args.layers), strengths=tuple(args.strengths), max_kl=args.max_kl, eval_tokens=args.eval_tokens, method=args.method,
        train_epochs=args.train_epochs,
    )
    run_demo(args.model, args.out, settings)


def _demo_defaults():
    from .demo import DemoSettings

    return DemoSettings()


def _lamp_convert(args: argparse.Namespace) -> None:
    from .lamp import read_lamp, write_lamp

    data = read_lamp(args.questions, args.outputs, task=args.task)
    users_path, items_path = write_lamp(data, args.out)
    n_history = sum(len(user.history) for user in data.users)
    print(f"{data.task}: {len(data.users)} users ({n_history} history items), {len(data.items)} held-out items "
          f"({'with' if args.outputs else 'without'} gold outputs) -> {users_path}, {items_path}")


def _lamp_score(args: argparse.Namespace) -> None:
    import json

    from .lamp import score_files

    print(json.dumps(score_files(args.outputs, args.predictions, task=args.task, use_stemmer=args.use_stemmer), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repedit", description="Representation editing for per-user LLM personalisation.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job: the whole pipeline on the demo users and the default model, one HTML report; resumable")
    demo.add_argument("--model", default="smollm2-135m-instruct", help="model alias, HF id, local folder or .gguf path")
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

    pairs = commands.add_parser("pairs", help="self-generate per-user preference pairs (personalised vs neutral); resumable")
    pairs.add_argument("--users", required=True, help="users JSONL (user_id, history, profile), or 'demo' for the built-in users")
    pairs.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl, or 'demo' for the built-in prompts")
    pairs.add_argument("--out", required=True, help="output pairs JSONL; rerun the same command to resume")
    pairs.add_argument("--model", default="smollm2-135m-instruct", help="model alias, HF id, local folder or .gguf path")
    pairs.add_argument("--k", type=int, default=4, help="representative history items shown per user (default 4)")
    pairs.add_argument("--max-new-tokens", type=int, default=PAIR_SETTINGS.max_new_tokens)
    pairs.add_argument("--batch-size", type=int, default=8)
    pairs.add_argument("--repetition-penalty", type=float, default=PAIR_SETTINGS.repetition_penalty)
    pairs.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (use --seed)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--temperature", type=float, default=0.7)
    pairs.add_argument("--top-p", type=float, default=0.95)
    pairs.add_argument("--near-duplicate", type=float, default=0.995, help="drop pairs whose responses' hidden-state cosine exceeds this")
    pairs.add_argument("--truncated", default="trim", choices=["drop", "trim"], help="answers cut at max-new-tokens: trim to the last full sentence (default) or drop the pair")
    pairs.add_argument("--no-real-history", action="store_true", help="skip real-history (StyleVector) pairs")
    pairs.add_argument("--hold-out", type=int, default=0, help="leave each user's last N history items with a prompt out (for repedit eval)")
    pairs.add_argument("--max-users", type=int, default=None, help="use only the first N users")
    pairs.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    pairs.set_defaults(run=_pairs)

    fit = commands.add_parser("fit", help="fit one steering edit per user from pairs (capture -> probes -> edit)")
    fit.add_argument("--pairs", required=True, help="pairs JSONL/CSV (repedit pairs output, or your own)")
    fit.add_argument("--out", required=True, help="output directory: <user>.safetensors + <user>.json, index.json")
    fit.add_argument("--model", default="smollm2-135m-instruct", help="model alias, HF id, local folder or .gguf path")
    fit.add_argument("--method", default="caa", choices=["caa", "pca", "chameleon", "stylevector", "trained", "trained_lowrank"],
                     help="trained / trained_lowrank: gradient-trained edits on the users' real texts (repedit.steering.train)")
    fit.add_argument("--layers", type=int, nargs="+", default=None, help="resid_post layers to edit (default: 40%% depth)")
    fit.add_argument("--strength", type=float, default=1.0, help="strength a of each edit (1 = the fitted vector)")
    fit.add_argument("--neutral-strength", type=float, default=1.0, help="strength b of the CHAMELEON projection-out")
    fit.add_argument("--positions", default="all", help="all, prompt, generated, or a token index")
    fit.add_argument("--batch-size", type=int, default=8)
    fit.add_argument("--auto", action="store_true", help="choose layer and strength per user: best held-out gain with KL <= --max-kl")
    fit.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="strengths swept by --auto")
    fit.add_argument("--max-kl", type=float, default=0.05, help="fluency limit for --auto: KL to the unsteered model, nats/token")
    fit.add_argument("--held-out-fraction", type=float, default=0.3, help="share of each user's real-history pairs held out for --auto")
    fit.add_argument("--epochs", type=int, default=8, help="trained methods: most epochs (early stopping per user)")
    fit.add_argument("--lr", type=float, default=0.05, help="trained methods: Adam learning rate of vectors (model units)")
    fit.add_argument("--kl-weight", type=float, default=0.1, help="trained methods: weight of KL(unsteered || steered) on neutral text")
    fit.add_argument("--preference-weight", type=float, default=0.0, help="trained methods: weight of the BiPO-style preference term")
    fit.add_argument("--rank", type=int, default=4, help="trained_lowrank: rank k of the edit")
    fit.add_argument("--val-items", type=int, default=2, help="trained methods: each user's last N real-history pairs validate (early stopping)")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(run=_fit)

    ev = commands.add_parser("eval", help="held-out evaluation per user: unsteered vs prompt-only vs steered; JSON + HTML report")
    ev.add_argument("--pairs", required=True, help="the pairs the edits were fitted on (made with repedit pairs --hold-out N)")
    ev.add_argument("--edits", required=True, help="edits directory (repedit fit [--auto] output) or a repedit store")
    ev.add_argument("--users", required=True, help="the users JSONL the pairs were made from, or 'demo'")
    ev.add_argument("--hold-out", type=int, default=3, help="the N of repedit pairs --hold-out: each user's last N items with a prompt")
    ev.add_argument("--out", required=True, help="output directory: eval.json + eval.html")
    ev.add_argument("--model", default="smollm2-135m-instruct", help="model alias, HF id, local folder or .gguf path")
    ev.add_argument("--embedder", default="auto", choices=["auto", "minilm", "model"], help="style embedder (auto: MiniLM if installed)")
    ev.add_argument("--factors", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0], help="strength factors for effect vs strength")
    ev.add_argument("--max-kl", type=float, default=0.05, help="fluency limit (nats/token) when the edits directory has no selection.json")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(run=_eval)

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

    from .probes.evaluate import DEFAULT_METHODS
    from .probes.methods import METHODS

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

    from .store_cli import add_commands as add_store_commands

    add_store_commands(commands)  # `repedit store ...` and `repedit export gguf` (repedit/store_cli.py)

    serve = commands.add_parser("serve", help="OpenAI-compatible server (/v1/chat/completions) steering each request with its user's edit")
    serve.add_argument("--model", default="smollm2-135m-instruct", help="model alias, HF id, local folder or .gguf path")
    serve.add_argument("--store", default=None, help="vector store directory (repedit fit output); without it every request is unsteered")
    serve.add_argument("--tokens", default=None, help="JSON file {bearer token: [user ids] or \"*\"}; without it no authentication")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-name", default=None, help="model id clients send (default: --model)")
    serve.add_argument("--max-batch-size", type=int, default=64, help="most requests decoded together")
    serve.add_argument("--batch-window-ms", type=float, default=5.0, help="how long an idle server waits to batch requests arriving together")
    serve.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    serve.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    serve.add_argument("--default-temperature", type=float, default=0.0, help="temperature when a request gives none (0 = greedy)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=_serve)

    lamp = commands.add_parser("lamp", help="LaMP benchmark files: convert to users/items JSONL, score predictions with the official metrics")
    lamp_sub = lamp.add_subparsers(dest="lamp_command", required=True)
    lamp_convert = lamp_sub.add_parser("convert", help="LaMP *_questions.json (+ *_outputs.json) -> DIR/users.jsonl + DIR/items.jsonl")
    lamp_convert.add_argument("--questions", required=True, help="LaMP questions JSON (a list of {id, input, profile})")
    lamp_convert.add_argument("--outputs", default=None, help="LaMP outputs JSON ({task, golds}); without it items have no target")
    lamp_convert.add_argument("--task", default=None, help="LaMP_1, LaMP_2, LaMP_3, LaMP_4, LaMP_5 or LaMP_7 (default: the outputs file's task)")
    lamp_convert.add_argument("--out", required=True, help="output directory: users.jsonl (for repedit pairs) + items.jsonl")
    lamp_convert.set_defaults(run=_lamp_convert)
    lamp_score = lamp_sub.add_parser("score", help="official LaMP metrics of predictions against an outputs file, printed as JSON")
    lamp_score.add_argument("--outputs", required=True, help="LaMP outputs JSON with the gold outputs")
    lamp_score.add_argument("--predictions", required=True, help="predictions: JSON {task, golds: [{id, output}]} like LaMP's, or .jsonl of {id, output}")
    lamp_score.add_argument("--task", default=None, help="override the task of the outputs file")
    lamp_score.add_argument("--use-stemmer", action="store_true", help="Porter stemming in ROUGE (the official LaMP script does not stem)")
    lamp_score.set_defaults(run=_lamp_score)
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
