"""The main job: the whole pipeline on the built-in demo users and the embedded default model.

Stages (each prints its time; a rerun with the same settings skips finished stages and resumes the
pair generation where it stopped):

1. **pairs** — each demo user's last ``hold_out`` history items with a prompt are set aside for
   evaluation; the model writes insights, personalised and neutral answers and real-history pairs
   from the rest (:func:`repedit.pairs.synthesis.generate`);
2. **probes** — capture the pairs' hidden states at every other ``resid_post`` layer and probe where
   personalised vs neutral is separable (:func:`repedit.probes.probe_sites`);
3. **select** — by default train every user's edit jointly (:func:`repedit.steering.train_user_edits`)
   and pick each user's strength by the fluency of generated answers
   (:func:`repedit.evaluate.select_strength_by_generation`); for the fit methods, fit at several
   layers and pick layer and strength by held-out gain under the KL limit
   (:func:`repedit.evaluate.select_layer_strength`). The edits go to the per-user store
   ``store/`` (:class:`repedit.store.VectorStore`), the choices to ``selection.json``;
4. **evaluate** — five conditions on the held-out items (:mod:`repedit.evaluate.evaluation`);
5. **export** — one llama.cpp GGUF control vector per steered user (:func:`repedit.store.export_gguf`);
6. **report** — ``report.html``, self-contained (plotly.js embedded, opens offline;
   :func:`repedit.report.demo_report.write_demo_report`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .capture.activations import Activations
from .evaluate.evaluation import Evaluation, eval_inputs, evaluate_users
from .evaluate.select import Selection, select_layer_strength, split_for_selection
from .io import read_json, sha256_of, write_json
from .model.generation import GenerationSettings
from .model.loading import DEFAULT_MODEL, load_model
from .pairs.synthesis import generate, read_pairs
from .pairs.users import demo_prompts, demo_users, split_history
from .probes import ProbeReport, capture_pairs, probe_sites
from .steering import UserEdit
from .store.vectors import VectorStore, save_edits


@dataclass(frozen=True)
class DemoSettings:
    """Settings of the demo run (small enough for ≤ 15 minutes on a 2-core CPU)."""

    n_users: int = 8  # the first n demo users
    n_prompts: int = 8  # self-generated pairs per user (the neutral prompt set)
    hold_out: int = 3  # history items per user kept unseen for evaluation
    pair_tokens: int = 48  # max_new_tokens of the generated answers (cut answers are trimmed to a full sentence)
    probe_every: int = 3  # probe resid_post at every n-th layer
    probe_methods: tuple[str, ...] = ("diff_of_means", "logistic_regression", "pca_of_differences")
    method: str = "trained"  # gradient-trained vectors (repedit.steering.train); or stylevector, caa, ... (KL-limited sweep)
    layers: tuple[int, ...] = (6, 9, 12)  # swept by the KL-limited selection of the fit methods
    train_layers: tuple[int, ...] = (12,)  # the trained edit's resid_post layers
    train_epochs: int = 8
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0)
    train_factors: tuple[float, ...] = (0.5, 1.0, 1.5)  # strength factors of the trained edit judged by the fluency rule
    max_kl: float = 0.05
    n_neutral: int = 6  # neutral answers the KL is measured on (each costs one forward per user and candidate)
    factors: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # effect-vs-strength multipliers of each selected edit
    eval_tokens: int = 48
    batch_size: int = 16


class _Stages:
    """Runs named stages, records their times, and skips those a previous run with the same settings finished."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.path = out_dir / "progress.json"
        self.key = sha256_of(config)
        previous = read_json(self.path) if self.path.exists() else {}
        self.done: dict[str, float] = previous.get("stages", {}) if previous.get("config") == self.key else {}
        self.times: dict[str, float] = {}

    def run(self, name: str, work: Callable[[], Any], load: Callable[[], Any] | None = None) -> Any:
        if name in self.done and load is not None:
            print(f"[{name}] done in an earlier run ({self.done[name]:.1f} s), reusing its output", flush=True)
            self.times[name] = 0.0
            return load()
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        result = work()
        self.times[name] = self.done[name] = time.perf_counter() - start
        print(f"[{name}] {self.times[name]:.1f} s", flush=True)
        write_json(self.path, {"config": self.key, "stages": self.done})
        return result


def run_demo(model_spec: str = DEFAULT_MODEL, out_dir: str | Path = "runs/demo", settings: DemoSettings = DemoSettings()) -> Path:
    """Run the whole pipeline (module docstring) and return the path of ``report.html``."""
    # The report stage (plotly) is imported here, not at module level, so that `repedit --help` stays light.
    from .report.demo_report import write_demo_report
    from .report.eval_report import write_eval_report
    from .report.probe_report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out_dir, {"model": model_spec, **asdict(settings)})
    total_start = time.perf_counter()
    model, tokenizer = stages.run("load model", lambda: load_model(model_spec))
    users = demo_users()[: settings.n_users]
    train_users, _ = split_history(users, settings.hold_out)

    pairs_file = out_dir / "pairs.jsonl"
    pairs = stages.run("pairs", lambda: generate(
        model, tokenizer, train_users, demo_prompts()[: settings.n_prompts], out=pairs_file, truncated="trim",
        settings=GenerationSettings(max_new_tokens=settings.pair_tokens, repetition_penalty=1.2, batch_size=settings.batch_size),
    ), lambda: read_pairs(pairs_file))

    n_layers = model.config.num_hidden_layers
    probe_sites_list = [f"resid_post.{layer}" for layer in range(0, n_layers, settings.probe_every)]

    def probes() -> tuple[ProbeReport, Activations]:
        acts = capture_pairs(model, tokenizer, pairs, probe_sites_list, batch_size=settings.batch_size, out_dir=out_dir / "activations")
        report = probe_sites(acts, methods=settings.probe_methods, min_user_pairs=8)
        write_report(report, acts, out_dir / "probes", model=model, tokenizer=tokenizer)
        return report, acts

    report, acts = stages.run("probes", probes, lambda: (ProbeReport.load(out_dir / "probes"), Activations.load(out_dir / "activations")))

    def select() -> Selection:
        if settings.method in ("trained", "trained_lowrank"):
            selection = _train_and_select(model, tokenizer, pairs, settings)
        else:
            train, validation, neutral = split_for_selection(pairs, max_neutral=settings.n_neutral)
            selection = select_layer_strength(
                model, tokenizer, train, validation, neutral, method=settings.method, layers=settings.layers,
                strengths=settings.strengths, max_kl=settings.max_kl, batch_size=settings.batch_size, progress=True,
            )
        # The edits are written once, to the per-user store that serving and the exports read.
        save_edits(selection.edits, out_dir / "store")
        selection.save(out_dir / "store" / "selection.json")  # beside the edits, where `repedit eval` looks
        return selection

    def load_selection() -> Selection:
        store = VectorStore(out_dir / "store")
        return Selection.load(out_dir / "store" / "selection.json", {u: store.get(u, model=model) for u in store.list_users()})

    selection = stages.run("select", select, load_selection)
    edits = selection.edits

    def evaluate() -> Evaluation:
        from .capture.embedding import default_embedder

        inputs = eval_inputs(users, pairs, settings.hold_out, max_neutral=settings.n_neutral)
        evaluation = evaluate_users(
            model, tokenizer, inputs.test_items, edits, insights=inputs.insights, history=inputs.history, neutral=inputs.neutral,
            examples=inputs.examples,
            embedder=default_embedder(model, tokenizer), max_kl=settings.max_kl, factors=settings.factors,
            settings=GenerationSettings(max_new_tokens=settings.eval_tokens, repetition_penalty=1.2, batch_size=settings.batch_size),
        )
        write_eval_report(evaluation, out_dir / "eval", grid=selection.grid)
        return evaluation

    evaluation = stages.run("evaluate", evaluate, lambda: Evaluation.load(out_dir / "eval" / "eval.json"))
    exports = stages.run("export", lambda: _export(model, edits, out_dir), lambda: read_json(out_dir / "exports.json"))
    path = stages.run("report", lambda: write_demo_report(out_dir, report, acts, evaluation, selection, exports, stages.done))

    print(f"{'stage':>12}  seconds (this run)")
    for stage, seconds in stages.times.items():
        print(f"{stage:>12}: {seconds:7.1f}")
    print(f"{'total':>12}: {time.perf_counter() - total_start:7.1f}")
    s = evaluation.summary
    print(f"held-out log-likelihood: steered beats unsteered for {s['steered']['users_loglik_better']}/{s['n_users']} users "
          f"(mean {s['steered']['loglik_gain']:+.3f} nats/token, KL {s['steered']['kl']:.3f}); prompt-only for "
          f"{s['prompt_only']['users_loglik_better']}/{s['n_users']} (mean {s['prompt_only']['loglik_gain']:+.3f})")
    from .report.eval_report import format_conditions_table

    print(format_conditions_table(evaluation))
    print(f"report: {path}")
    return path


def _train_and_select(model, tokenizer, pairs, settings: DemoSettings) -> Selection:
    """Train every user's edit jointly, then pick each user's strength by the fluency of generated answers."""
    from .evaluate.select import validation_items
    from .evaluate.strength import select_strength_by_generation
    from .pairs.synthesis import REAL_HISTORY
    from .steering.train import TrainSettings, train_user_edits

    train_settings = TrainSettings(kind="lowrank" if settings.method == "trained_lowrank" else "vector", layers=settings.train_layers,
                                   epochs=settings.train_epochs, n_neutral=settings.n_neutral, batch_size=settings.batch_size)
    result = train_user_edits(model, tokenizer, pairs, settings=train_settings)
    validation = validation_items(pairs, train_settings.val_items)
    neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in pairs if p.source != REAL_HISTORY))[: settings.n_neutral]
    selection = select_strength_by_generation(model, tokenizer, result.edits, validation, neutral=neutral, factors=settings.train_factors)
    selection.extra["training"] = result.record()
    return selection


def _export(model, edits: dict[str, UserEdit], out_dir: Path) -> dict[str, Any]:
    """Write one GGUF control vector per steered user (the store was written by the select stage);
    returns what was written."""
    from .store.gguf import export_gguf

    gguf = {}
    for user, edit in edits.items():
        written = export_gguf(edit, out_dir / "gguf" / f"{user}.gguf", model=model)
        gguf[user] = {"path": str(written.path.relative_to(out_dir)), "layers": written.layers, "llama_cpp": written.llama_cpp_flag()}
    record = {"store": "store", "store_users": sorted(edits), "gguf": gguf}
    write_json(out_dir / "exports.json", record)
    return record
