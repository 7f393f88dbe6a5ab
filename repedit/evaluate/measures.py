"""Independent measures of "reads like the user": style attribution, lexical markers, degeneration.

None of these uses the steered model or its hidden states; they judge generated *text*.

**Style attribution** (:class:`StyleAttributor`): character 2–5-gram TF-IDF (``char_wb``, case kept,
since lowercase writing is a style) + multinomial logistic regression, trained on users' real texts.

**Lexical markers** (:func:`lexical_markers`, :data:`MARKERS`): rates defined for any text (0 when the
denominator is 0). Tokenisation: *words* are runs of letters/digits with internal apostrophes
(``don't``); emoji are not words; *sentences* end at ``.``, ``!``, ``?`` or ``…`` followed by
whitespace, or at a newline, and only sentences with a word count.

**Pre-registered marker rule** (:func:`choose_marker`), fixed before any steered output is seen.
For marker ``k`` let ``u`` = mean over the user's training texts, ``s`` = mean over the unsteered
answers, ``c`` = mean of the per-user means of all users, ``sd`` = std (ddof=0) of those per-user
means. Score = ``min(|u − s|, |u − c|) / (sd + 1e-9)``: the user must differ from the unsteered model
*and* from the crowd of users, in units of how much users differ on ``k``. (``|u − s|`` alone would
pick, for every user, a trait all humans share against the model, e.g. no bullet lists.) A marker is
eligible only if (a) ``u − s`` and ``u − c`` have the same sign (moving towards the user means moving
towards *this* user), and (b) ``|u − s| ≥ 2·SE`` with ``SE = sqrt(var_u/n_u + var_s/n_s)`` over
per-text values (the gap is not text-to-text noise). The eligible marker with the highest score wins.

**Degeneration** (:func:`repeated_ngram_rate`, :func:`distinct_n`, :func:`nonword_rate`) and the
set-level :class:`FluencyRule` that judges them together with perplexity (see its docstring).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..io import InputError

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")
_EMOJI_BASE = "\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u2300-\u23FF"
# One emoji = a flag pair, or a pictograph with its variation selector, skin tone and ZWJ continuations.
_EMOJI = re.compile(rf"[\U0001F1E6-\U0001F1FF]{{2}}|[{_EMOJI_BASE}][\uFE0F\U0001F3FB-\U0001F3FF]*(?:\u200D[{_EMOJI_BASE}]\uFE0F?)*")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_BACKTICK_SPAN = re.compile(r"`[^`\n]*`")

#: Register words of formal/academic prose (matched whole-word, lowercase).
FORMAL_WORDS = frozenset(
    "would shall kindly recommend therefore thus hence moreover furthermore however nevertheless consequently "
    "accordingly additionally regarding whereas appropriate considerable considerably substantial beneficial "
    "ensure advisable endeavour endeavor utilise utilize sufficient particularly respectively".split()
)
#: Chat slang and informal spellings (matched whole-word, lowercase; apostrophes kept, e.g. "y'all").
SLANG_WORDS = frozenset(
    "lol lmao lmk ngl tbh imo imho idk omg btw fr rn smh u ur ya y'all yall gonna wanna gotta kinda sorta dunno "
    "lemme gimme ppl pls plz thx nah yep yup lowkey highkey w smth sth bc cuz tho thru haha hehe ugh ain't".split()
)
_FIRST_PERSON = frozenset("i me my mine myself we us our ours ourselves".split())
_SECOND_PERSON = frozenset("you your yours yourself yourselves u ur ya".split())

#: The fixed marker set, in report order: name -> what it counts (its unit).
MARKERS: dict[str, str] = {
    "emoji_per_word": "emoji / words",
    "exclamations_per_sentence": "'!' characters / sentences",
    "question_rate": "share of sentences ending in '?'",
    "bullet_line_share": "share of non-empty lines starting with -, *, • or '1.'/'1)'",
    "mean_sentence_words": "words / sentences",
    "mean_word_chars": "mean characters per word",
    "formal_word_rate": "FORMAL_WORDS / words",
    "slang_rate": "SLANG_WORDS / words",
    "lowercase_sentence_start_share": "share of sentences whose first letter is lowercase",
    "allcaps_word_rate": "share of words with >= 2 letters, all uppercase (shouting, acronyms)",
    "code_rate": "share of words inside `backticks` or containing a digit",
    "first_person_rate": "I/me/my/we/us/our... / words",
    "second_person_rate": "you/your/u/ur... / words",
}


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _base(word: str) -> str:
    # Pronoun lists match the part before an apostrophe: "I'm" -> "i", "you're" -> "you".
    return word.replace("’", "'").split("'")[0]


def lexical_markers(text: str) -> dict[str, float]:
    """The :data:`MARKERS` of one text (rates; 0 when a denominator is 0, e.g. for an empty text)."""
    words = _WORD.findall(text)
    lower = [w.lower().replace("’", "'") for w in words]
    n = len(words)
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if _WORD.search(s)]
    starts = [m.group(0) for s in sentences if (m := re.search(r"[^\W\d_]", s))]
    lines = [line for line in text.splitlines() if line.strip()]
    code_words = sum(len(_WORD.findall(span)) for span in _BACKTICK_SPAN.findall(text))
    code_words += sum(any(c.isdigit() for c in w) for w in _WORD.findall(_BACKTICK_SPAN.sub(" ", text)))
    return {
        "emoji_per_word": _ratio(len(_EMOJI.findall(text)), n),
        "exclamations_per_sentence": _ratio(text.count("!"), len(sentences)),
        "question_rate": _ratio(sum(s.rstrip().endswith("?") for s in sentences), len(sentences)),
        "bullet_line_share": _ratio(sum(bool(_BULLET.match(line)) for line in lines), len(lines)),
        "mean_sentence_words": _ratio(n, len(sentences)),
        "mean_word_chars": _ratio(sum(len(w) for w in words), n),
        "formal_word_rate": _ratio(sum(w in FORMAL_WORDS for w in lower), n),
        "slang_rate": _ratio(sum(w in SLANG_WORDS for w in lower), n),
        "lowercase_sentence_start_share": _ratio(sum(c.islower() for c in starts), len(starts)),
        "allcaps_word_rate": _ratio(sum(sum(c.isalpha() for c in w) >= 2 and w.isupper() for w in words), n),
        "code_rate": _ratio(code_words, n),
        "first_person_rate": _ratio(sum(_base(w) in _FIRST_PERSON for w in lower), n),
        "second_person_rate": _ratio(sum(_base(w) in _SECOND_PERSON for w in lower), n),
    }


def marker_means(texts: Sequence[str]) -> dict[str, float]:
    """Mean of each marker over ``texts`` (each text weighs the same); all 0 for an empty list."""
    rows = [lexical_markers(t) for t in texts]
    return {k: float(np.mean([r[k] for r in rows])) if rows else 0.0 for k in MARKERS}


@dataclass(frozen=True)
class MarkerScore:
    """One marker's standing for a user under the rule of :func:`choose_marker` (units: that marker's)."""

    marker: str
    user_mean: float
    unsteered_mean: float
    users_mean: float
    users_sd: float
    score: float
    eligible: bool


def rank_markers(
    user_texts: Sequence[str], unsteered_answers: Sequence[str], all_users_texts: Mapping[str, Sequence[str]]
) -> list[MarkerScore]:
    """Every marker scored by the pre-registered rule (module docstring), eligible ones first, best first."""
    if not user_texts or not unsteered_answers or len(all_users_texts) < 2:
        raise InputError("choose_marker needs the user's texts, unsteered answers and at least 2 users' texts")
    if empty := sorted(u for u, texts in all_users_texts.items() if not texts):
        raise InputError(f"users without training texts: {empty}")
    per_text_u = [lexical_markers(t) for t in user_texts]
    per_text_s = [lexical_markers(t) for t in unsteered_answers]
    per_user = [marker_means(texts) for texts in all_users_texts.values()]
    out = []
    for k in MARKERS:
        xu, xs = np.array([r[k] for r in per_text_u]), np.array([r[k] for r in per_text_s])
        u, s = float(xu.mean()), float(xs.mean())
        means = np.array([m[k] for m in per_user])
        c, sd = float(means.mean()), float(means.std())
        se = math.sqrt(xu.var() / len(xu) + xs.var() / len(xs))
        eligible = (u - s) * (u - c) > 0 and abs(u - s) >= 2 * se
        out.append(MarkerScore(k, u, s, c, sd, min(abs(u - s), abs(u - c)) / (sd + 1e-9), bool(eligible)))
    return sorted(out, key=lambda m: (not m.eligible, -m.score))


def choose_marker(
    user_texts: Sequence[str], unsteered_answers: Sequence[str], all_users_texts: Mapping[str, Sequence[str]]
) -> str | None:
    """The marker that represents this user (pre-registered rule, module docstring), or ``None``
    when no marker is eligible (e.g. a style carried by vocabulary, like cooking metaphors: report
    style attribution only for that user).

    Args:
        user_texts: the user's real *training* texts.
        unsteered_answers: the unsteered model's answers (no steered output may be used here).
        all_users_texts: user id -> training texts, for every user (this one included).
    """
    best = rank_markers(user_texts, unsteered_answers, all_users_texts)[0]
    return best.marker if best.eligible else None


def marker_movement(unsteered: float, steered: float, real: float) -> float:
    """(steered − unsteered) / (real − unsteered): 1 = reaches the user's real texts, 0 = no move,
    < 0 = moved away, > 1 = overshoot; NaN when real == unsteered (nothing to move towards)."""
    return (steered - unsteered) / (real - unsteered) if real != unsteered else float("nan")


# --- degeneration -------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[^\w\s]")
_STRIP = ".,;:!?\"'()«»“”‘’…*_`"  # sentence punctuation and markdown emphasis
_LATIN_RUN = re.compile(r"[A-Za-zÀ-ÖØ-öø-ɏ]+")
_SOUP = set("{}[]<>|\\^~+=$:;\"#*")
_VOWELS = set("aeiouyàáâãäåæèéêëìíîïòóôõöøùúûüýÿœ")


def tokens(text: str) -> list[str]:
    """Word-level tokens for the degeneration measures: lowercase words, each punctuation mark or emoji
    character its own token (variation selectors and zero-width joiners dropped)."""
    return _TOKEN.findall(re.sub("[\uFE0F\u200D]", "", text.lower()))


def _ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """Share of the text's n-grams equal to an n-gram seen earlier in the same text (0 = no repeats,
    → 1 for a text looping one phrase; 0 for a text with fewer than ``n`` tokens)."""
    grams, seen, repeats = _ngrams(tokens(text), n), set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return _ratio(repeats, len(grams))


def distinct_n(text: str, n: int = 2) -> float:
    """Unique n-grams / all n-grams of the text (1 = none repeated; 1.0 for fewer than ``n`` tokens)."""
    grams = _ngrams(tokens(text), n)
    return len(set(grams)) / len(grams) if grams else 1.0


def _is_nonword(chunk: str) -> bool:
    core = chunk.strip(_STRIP)
    if not core or _EMOJI.search(core):
        return False  # pure punctuation and emoji are fine
    if sum(c in _SOUP for c in core) >= max(3, len(core) / 4):
        return True  # text buried in code/markup symbols ("+:#usel:+w-sell:", "{1_Woonen}}"): over-steering
    if any(c.isdigit() for c in core):
        return False  # numbers and units ("15–20%", "3x/week", "~2x")
    if not any(c.isalpha() for c in core):
        return len(core) >= 2  # a run of symbols ("#$%", "{{}}"); a lone dash, bullet or brace is fine
    for run in _LATIN_RUN.findall(core):
        if len(run) > 20:
            return True
        # No vowel in 4+ letters ("zzzz", "xkcdq"); all-caps runs are acronyms ("HTML", "SSD").
        if len(run) >= 4 and not run.isupper() and not (set(run.lower()) & _VOWELS):
            return True
    return False


def nonword_rate(text: str) -> float:
    """Share of whitespace-separated chunks that are not plausible words (0 for an empty text).

    A chunk, with surrounding sentence punctuation and markdown emphasis (``.,;:!?"'()«»“”‘’…*_```)
    stripped, is a nonword when (1) at least 3 and at least a quarter of its characters are code/markup
    symbols ``{}[]<>|\\^~+=$:;"#*`` (the brace-and-colon soup that over-steered SmolLM2 produces), or
    (2) it has no letter, digit or emoji and >= 2 characters (``#$%``), or (3) it has a Latin letter run
    longer than 20 letters, or one of >= 4 letters without a vowel (a e i o u y, accented too) that is
    not all-caps (``zzzz``, ``xkcdq``; acronyms such as ``HTML`` pass). Emoji, numbers with units and
    non-Latin scripts are never nonwords. A cheap backstop: token soup made of real subwords
    ("Hydriousimport TeenJesusCell") passes here and is left to the perplexity check of :class:`FluencyRule`.
    """
    chunks = text.split()
    return _ratio(sum(_is_nonword(c) for c in chunks), len(chunks))


def fluency_measures(text: str) -> dict[str, float]:
    """``repeated_3gram``, ``distinct_2`` and ``nonword_rate`` of one text (shares, 0–1)."""
    return {"repeated_3gram": repeated_ngram_rate(text, 3), "distinct_2": distinct_n(text, 2), "nonword_rate": nonword_rate(text)}


# --- style attribution --------------------------------------------------------------------------


class StyleAttributor:
    """Which user wrote this? Char 2–5-gram TF-IDF + logistic regression (deterministic).

    ``chance`` is the share of the most frequent user among the training labels (the accuracy of
    always guessing that user; equals 1/n_users when users have equally many texts). Empty or
    whitespace texts are never trained on and are predicted as ``None`` (no user: always wrong).
    """

    def __init__(self, C: float = 10.0) -> None:
        self.C = C
        self.pipeline = None
        self.users: list[str] = []
        self.chance = float("nan")

    def fit(self, texts: Sequence[str], users: Sequence[str]) -> StyleAttributor:
        """Train on real texts and their authors; returns ``self``."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        if len(texts) != len(users):
            raise InputError(f"{len(texts)} texts but {len(users)} user labels")
        kept = [(t, u) for t, u in zip(texts, users) if t.strip()]
        self.users = sorted(set(users))
        if len(self.users) < 2:
            raise InputError(f"style attribution needs texts of at least 2 users, got {self.users}")
        if missing := sorted(set(users) - {u for _, u in kept}):
            raise InputError(f"users with no (non-empty) texts: {missing}")
        labels = [u for _, u in kept]
        self.chance = max(labels.count(u) for u in self.users) / len(labels)
        # Case is kept (lowercase=False): all-lowercase writing is itself a style.
        self.pipeline = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=False),
            LogisticRegression(C=self.C, solver="lbfgs", max_iter=2000, random_state=0),
        ).fit([t for t, _ in kept], labels)
        return self

    def predict(self, texts: Sequence[str]) -> list[str | None]:
        """The most likely author of each text; ``None`` for an empty/whitespace text."""
        if self.pipeline is None:
            raise InputError("StyleAttributor.predict before fit")
        keep = [i for i, t in enumerate(texts) if t.strip()]
        out: list[str | None] = [None] * len(texts)
        for i, label in zip(keep, self.pipeline.predict([texts[i] for i in keep]) if keep else []):
            out[i] = str(label)
        return out

    def accuracy(self, texts: Sequence[str], true_users: Sequence[str]) -> float:
        """Share of ``texts`` attributed to their true user (0–1; empty texts count as wrong)."""
        if len(texts) != len(true_users) or not texts:
            raise InputError(f"accuracy needs as many labels as texts (>0), got {len(texts)} and {len(true_users)}")
        return float(np.mean([p == u for p, u in zip(self.predict(texts), true_users)]))


def shuffled_label_accuracy(
    texts: Sequence[str], users: Sequence[str], test_texts: Sequence[str], test_users: Sequence[str],
    seed: int = 0, repeats: int = 5,
) -> float:
    """Control: the same classifier trained on randomly permuted author labels, mean test accuracy
    over ``repeats`` permutations (0–1). A real attribution accuracy must clearly beat this."""
    rng = np.random.default_rng(seed)
    shuffled = (list(rng.permutation(np.array(users, dtype=object))) for _ in range(repeats))
    return float(np.mean([StyleAttributor().fit(texts, labels).accuracy(test_texts, test_users) for labels in shuffled]))


# --- the fluency rule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FluencyVerdict:
    """Outcome of :meth:`FluencyRule.check`: ``flags[i]`` names the measures answer ``i`` failed,
    ``reasons`` say why the set is inadmissible (empty when admissible), ``summary`` holds the set's
    numbers and ``per_answer`` each answer's measures (and ``log_ppl_ratio``, for the figures)."""

    admissible: bool
    flags: list[tuple[str, ...]]
    reasons: list[str]
    summary: dict[str, float]
    per_answer: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class FluencyRule:
    """Is a set of generated answers fluent text, however unusual its style?

    Per answer, an answer is *flagged* when it is empty, or ``repeated_3gram > max_repeated_3gram``
    (0.2, fixed by issue 12: a fifth of the trigrams repeating is a loop), or ``distinct_2 <
    min_distinct_2`` (a loose backstop for short-period repetition), or ``nonword_rate >
    max_nonword_rate`` (gibberish). Style does not trip these: on the 96 demo texts repeated_3gram
    <= 0.016, distinct_2 >= 0.93, nonword_rate <= 0.067 (one "smth").

    Per set, perplexity: the median perplexity of the answers (under the *unsteered* model, given the
    prompts) must be <= ``max_perplexity_ratio × base``, ``base = max(reference, unsteered)``.
    ``reference`` = the median perplexity of the user's own real texts (same model, given their
    prompts), so a user who writes surprisingly (pirate talk, emoji) may be answered as surprisingly;
    ``unsteered`` (the unsteered answers' median, optional) keeps the base from falling below what the
    model itself writes. The median because one odd answer (very short, a rare name) can have a huge
    perplexity without the set being broken. Loops have *low* perplexity, hence the text measures.

    The set is admissible when at most ``max_flagged_share`` of its answers are flagged (one unlucky
    sample in ten happens unsteered too) and the perplexity condition holds.

    Calibration (SmolLM2-135M, demo users, 64-token answers): users' real texts have median
    perplexity 28–145, unsteered answers 4.4. Medians of 3 random real texts of a user, over the
    median of the other 9: 95th percentile <= 2.4 for every user (max 3.3, terse_tom) — hence 3.
    Degenerate sets are rejected for every user's base: sampling at T=1.5 / 2.5 (token soup) by
    perplexity (>= 21× the highest base), a random direction added at layer 15 (x0.5, 1, 2 of the
    hidden norm; brace/colon soup and "el-el-el") by flags (19–100% of answers), which are needed:
    its x0.5 set sits at only 2.3× the highest base.
    """

    max_repeated_3gram: float = 0.2
    min_distinct_2: float = 0.5
    max_nonword_rate: float = 0.15
    max_perplexity_ratio: float = 3.0
    max_flagged_share: float = 0.1

    def flag(self, text: str) -> tuple[tuple[str, ...], dict[str, float]]:
        """The measures ``text`` fails (by name, e.g. ``("repeated_3gram",)``) and its :func:`fluency_measures`."""
        m = fluency_measures(text)
        failed = ("empty",) if not text.strip() else ()
        failed += ("repeated_3gram",) * (m["repeated_3gram"] > self.max_repeated_3gram)
        failed += ("distinct_2",) * (m["distinct_2"] < self.min_distinct_2)
        failed += ("nonword_rate",) * (m["nonword_rate"] > self.max_nonword_rate)
        return failed, m

    def check(
        self, answers: Sequence[str], perplexities: Sequence[float], reference_perplexity: float,
        unsteered_perplexity: float | None = None,
    ) -> FluencyVerdict:
        """Judge ``answers`` (class docstring); ``perplexities[i]`` of answer ``i`` (NaN = not scored)."""
        if not answers or len(answers) != len(perplexities):
            raise InputError(f"FluencyRule.check needs >= 1 answer and one perplexity each, got {len(answers)} and {len(perplexities)}")
        if not reference_perplexity > 0:
            raise InputError(f"reference_perplexity must be > 0, got {reference_perplexity}")
        base = max(reference_perplexity, unsteered_perplexity or 0.0)
        flags, per_answer = [], []
        for text, ppl in zip(answers, perplexities):
            failed, m = self.flag(text)
            flags.append(failed)
            per_answer.append({**m, "perplexity": ppl, "log_ppl_ratio": math.log(ppl / base) if ppl > 0 else float("nan")})
        finite = [p for p in perplexities if p > 0 and math.isfinite(p)]
        median_ppl = float(np.median(finite)) if finite else float("nan")
        flagged = float(np.mean([bool(f) for f in flags]))
        reasons = []
        if flagged > self.max_flagged_share:
            limits = {"empty": ("", None), "repeated_3gram": (f"> {self.max_repeated_3gram}", max),
                      "distinct_2": (f"< {self.min_distinct_2}", min), "nonword_rate": (f"> {self.max_nonword_rate}", max)}
            for name, (limit, worst) in limits.items():
                bad = [m[name] for f, m in zip(flags, per_answer) if name in f and name in m]
                count = sum(name in f for f in flags)
                if count:
                    reasons.append(f"{name} {limit}".strip() + f": {count}/{len(answers)} answers" + (f" (worst {worst(bad):.2f})" if worst else ""))
            reasons.append(f"flagged share {flagged:.2f} > {self.max_flagged_share}")
        if not median_ppl <= self.max_perplexity_ratio * base:
            reasons.append(f"perplexity: median {median_ppl:.1f} > {self.max_perplexity_ratio} × {base:.1f}")
        summary = {
            "flagged_share": flagged, "median_perplexity": median_ppl, "perplexity_base": base,
            "perplexity_ratio": median_ppl / base, "perplexity_limit": self.max_perplexity_ratio * base,
            **{f"mean_{k}": float(np.mean([m[k] for m in per_answer])) for k in ("repeated_3gram", "distinct_2", "nonword_rate")},
        }
        return FluencyVerdict(not reasons, flags, reasons, summary, per_answer)
