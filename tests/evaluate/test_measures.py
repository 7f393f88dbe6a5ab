"""Style and fluency measures (repedit.evaluate.measures / fluency_plots): fast, no model."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest

from repedit.evaluate.measures import (
    MARKERS,
    FluencyRule,
    StyleAttributor,
    choose_marker,
    distinct_n,
    lexical_markers,
    marker_means,
    marker_movement,
    nonword_rate,
    rank_markers,
    repeated_ngram_rate,
    shuffled_label_accuracy,
    tokens,
)
from repedit.io import InputError
from repedit.pairs.users import demo_users
from repedit.report.fluency_plots import fluency_figure, marker_figure

USERS = demo_users()
TEXTS = {u.user_id: [h.text for h in u.history] for u in USERS}
TRAIN = {u: t[:9] for u, t in TEXTS.items()}
ALL_REAL = [t for texts in TEXTS.values() for t in texts]

# Plain, neutral assistant prose standing in for the unsteered model's answers (written by hand).
PLAIN = [
    "Basil grows best in a bright spot with at least six hours of light each day. Water it when the top of the soil feels dry, and pinch off the flower buds so the plant keeps producing leaves.",
    "Start by writing down what you spend for a few weeks. Then sort the costs into groups such as rent, food and transport, and decide on a limit for each group that fits your income.",
    "Try to keep a regular schedule and a separate place for work. Short breaks every hour help you stay focused, and turning off notifications removes many small distractions.",
    "A good first step is to walk and jog in short intervals. Increase the running time slowly over a few weeks and take a rest day between sessions so your body can recover.",
    "Here are a few ideas to save money on groceries:\n1. Plan your meals for the week.\n2. Make a shopping list.\n3. Compare prices between brands.",
    "Keep a bottle of water on your desk and drink a glass with each meal. Adding a slice of lemon can make it more pleasant, and some apps can remind you during the day.",
    "Talking to your neighbor calmly is usually the best place to start. Explain how the noise affects you and suggest a simple solution that could work for both of you.",
    "Look at reviews and lists from sources you trust, and read the first chapter before you decide. Your library can also suggest books that are similar to ones you enjoyed.",
]

LOOP = "I love it. " * 25
SINGLE = "the " * 60
GIBBERISH = "asdkj qwe zzzz xkcdq #$%& bvnm ;;;; lkjh ==>> qwrtp fgh zxcvb hjkl @@@@ vbnmm"
SOUP = "%%% ^^^ ||| ~~~ $$$ ### <<< >>> /// +++ === &&& {{}} ]]["


# --- attribution ---------------------------------------------------------------------------------

def _split():
    train = [(t, u) for u, texts in TEXTS.items() for t in texts[:9]]
    test = [(t, u) for u, texts in TEXTS.items() for t in texts[9:]]
    return [t for t, _ in train], [u for _, u in train], [t for t, _ in test], [u for _, u in test]


def test_attribution_beats_chance_and_shuffled_control():
    texts, users, test_texts, test_users = _split()
    attributor = StyleAttributor().fit(texts, users)
    accuracy = attributor.accuracy(test_texts, test_users)
    control = shuffled_label_accuracy(texts, users, test_texts, test_users, seed=0)
    assert attributor.chance == pytest.approx(1 / 8)
    assert accuracy >= 2 * attributor.chance and accuracy >= 0.6
    assert accuracy > control + 0.3
    assert StyleAttributor().fit(texts, users).predict(test_texts) == attributor.predict(test_texts)


def test_attribution_empty_answers_and_errors():
    texts, users, _, _ = _split()
    attributor = StyleAttributor().fit(texts, users)
    assert attributor.predict(["", "  ", "ngl it's kinda fun lol tbh"]) == [None, None, "casual_cass"]
    assert attributor.accuracy(["", "ngl it's kinda fun lol tbh"], ["casual_cass", "casual_cass"]) == 0.5
    with pytest.raises(InputError, match="at least 2 users"):
        StyleAttributor().fit(["a text", "another"], ["tom", "tom"])
    with pytest.raises(InputError, match=r"no \(non-empty\) texts: \['ann'\]"):
        StyleAttributor().fit(["a text", "  "], ["tom", "ann"])
    with pytest.raises(InputError, match="3 texts but 2"):
        StyleAttributor().fit(["a", "b", "c"], ["tom", "ann"])


# --- lexical markers -----------------------------------------------------------------------------

def test_markers_hand_computed():
    m = lexical_markers("Hi! 🎉 ok.")  # words: Hi, ok; sentences: "Hi!", "🎉 ok."
    assert set(m) == set(MARKERS)
    assert m["emoji_per_word"] == 0.5 and m["exclamations_per_sentence"] == 0.5
    assert m["mean_sentence_words"] == 1.0 and m["mean_word_chars"] == 2.0
    assert m["lowercase_sentence_start_share"] == 0.5
    assert lexical_markers("- eggs\n* milk\nThen cook.")["bullet_line_share"] == pytest.approx(2 / 3)
    assert lexical_markers("1. Mix.\n2) Bake.")["bullet_line_share"] == 1.0
    m = lexical_markers("I would recommend it. Moreover, u should go lol? Use `git log` 3 times.")
    words = ["I", "would", "recommend", "it", "Moreover", "u", "should", "go", "lol", "Use", "git", "log", "3", "times"]
    n = len(words)
    assert m["mean_sentence_words"] == pytest.approx(n / 3)
    assert m["formal_word_rate"] == pytest.approx(3 / n)  # would, recommend, moreover
    assert m["slang_rate"] == pytest.approx(2 / n)  # u, lol
    assert m["code_rate"] == pytest.approx(3 / n)  # git, log (backticks), 3 (digit)
    assert m["question_rate"] == pytest.approx(1 / 3)
    assert m["first_person_rate"] == pytest.approx(1 / n) and m["second_person_rate"] == pytest.approx(1 / n)
    assert lexical_markers("So GOOD!! I LOVE it")["allcaps_word_rate"] == pytest.approx(2 / 5)  # "I" has one letter
    assert lexical_markers("Flags 🇫🇷, ❤️ and 👍🏽 count once each.")["emoji_per_word"] == pytest.approx(3 / 5)
    assert all(v == 0.0 for v in lexical_markers("").values())
    assert marker_means([]) == {k: 0.0 for k in MARKERS}
    assert marker_means(["Hi!", "Ok."])["exclamations_per_sentence"] == 0.5


def test_marker_movement():
    assert marker_movement(0.0, 0.5, 1.0) == 0.5
    assert marker_movement(10.0, 4.0, 4.0) == 1.0
    assert marker_movement(10.0, 12.0, 4.0) == pytest.approx(-1 / 3)
    assert math.isnan(marker_movement(2.0, 3.0, 2.0))


def test_choose_marker_pre_registered_rule():
    assert choose_marker(TRAIN["emoji_emma"], PLAIN, TRAIN) in ("emoji_per_word", "exclamations_per_sentence")
    assert choose_marker(TRAIN["terse_tom"], PLAIN, TRAIN) == "mean_sentence_words"
    assert choose_marker(TRAIN["formal_frank"], PLAIN, TRAIN) in ("formal_word_rate", "mean_word_chars")
    assert choose_marker(TRAIN["elaborate_elena"], PLAIN, TRAIN) in ("mean_sentence_words", "mean_word_chars", "formal_word_rate")
    assert choose_marker(TRAIN["casual_cass"], PLAIN, TRAIN) in ("slang_rate", "lowercase_sentence_start_share")
    assert choose_marker(TRAIN["techie_theo"], PLAIN, TRAIN) == "code_rate"
    # Bullets: no user writes lists but PLAIN has one -> a human-vs-model trait, never chosen.
    ranked = {m.marker: m for m in rank_markers(TRAIN["terse_tom"], PLAIN, TRAIN)}
    assert ranked["bullet_line_share"].unsteered_mean > 0 and not ranked["bullet_line_share"].eligible
    # chef_chloe's style is vocabulary (cooking metaphors): no lexical marker qualifies.
    assert choose_marker(TRAIN["chef_chloe"], PLAIN, TRAIN) is None
    assert choose_marker(PLAIN, PLAIN, {"a": PLAIN, "b": TRAIN["terse_tom"]}) is None
    with pytest.raises(InputError, match="without training texts"):
        choose_marker(PLAIN, PLAIN, {"a": PLAIN, "b": []})


# --- degeneration --------------------------------------------------------------------------------

def test_degeneration_hand_computed():
    assert tokens("I love it. Don't!") == ["i", "love", "it", ".", "don't", "!"]
    # tokens: i love it . i love it . -> 6 trigrams, the last two repeat earlier ones
    assert repeated_ngram_rate("I love it. I love it.") == pytest.approx(2 / 6)
    assert repeated_ngram_rate("the cat sat on the mat") == 0.0
    assert repeated_ngram_rate("a b") == 0.0 and repeated_ngram_rate("") == 0.0
    assert distinct_n("a b a b") == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert distinct_n("a") == 1.0
    assert repeated_ngram_rate(LOOP) > 0.9 and repeated_ngram_rate(SINGLE) > 0.95
    assert distinct_n(LOOP) < 0.1 and distinct_n(SINGLE) < 0.05
    assert nonword_rate("asdkj qwe zzzz") == pytest.approx(1 / 3)  # only "zzzz": no vowel
    assert nonword_rate("Hydration!! 💧💧 15–20% of 3x/week, HTML & SQL — ok") == 0.0
    assert nonword_rate(GIBBERISH) > 0.5 and nonword_rate(SOUP) == 1.0
    assert nonword_rate("supercalifragilisticexpialidocious") == 1.0  # > 20 letters
    # Over-steered SmolLM2 output (calibration run): letters buried in braces, colons and plus signs.
    assert nonword_rate('+:#usel:+w-sell:+self-on:+"d.weels: {1_Woonen}} ok') == pytest.approx(2 / 3)
    assert nonword_rate("**Set Clear Goals**: use `git log` or dict[str, int], x=y+z") == 0.0


def test_real_texts_pass_per_answer_flags():
    rule = FluencyRule()
    assert len(ALL_REAL) == 96
    assert [t for t in ALL_REAL if rule.flag(t)[0]] == []
    assert all(rule.flag(t)[0] for t in (LOOP, SINGLE, GIBBERISH, SOUP, "  "))


# --- the fluency rule ----------------------------------------------------------------------------

def test_fluency_rule_admits_real_texts_and_plain_answers():
    rule = FluencyRule()
    assert rule.max_repeated_3gram == 0.2
    for user, texts in TEXTS.items():
        verdict = rule.check(texts, [20.0] * len(texts), reference_perplexity=20.0)
        assert verdict.admissible, (user, verdict.reasons)
        assert verdict.summary["perplexity_ratio"] == 1.0 and verdict.reasons == []
    verdict = rule.check(PLAIN, [4.0] * 8, reference_perplexity=25.0, unsteered_perplexity=4.0)
    assert verdict.admissible and verdict.flags == [()] * 8
    assert len(verdict.per_answer) == 8 and verdict.per_answer[0]["log_ppl_ratio"] == pytest.approx(math.log(4 / 25))


def test_fluency_rule_rejects_degenerate_sets():
    rule = FluencyRule()
    loops = rule.check([LOOP, SINGLE] + PLAIN[:3], [1.5] * 5, reference_perplexity=20.0)
    assert not loops.admissible
    assert any(r.startswith("repeated_3gram") for r in loops.reasons) and loops.flags[0] == ("repeated_3gram", "distinct_2")
    gib = rule.check([GIBBERISH, SOUP] * 3, [20.0] * 6, reference_perplexity=20.0)
    assert not gib.admissible and any(r.startswith("nonword_rate") for r in gib.reasons)
    # Fluent-looking token soup is left to perplexity: median 900 > 3 x max(20, 5).
    soup = rule.check(PLAIN, [900.0] * 8, reference_perplexity=20.0, unsteered_perplexity=5.0)
    assert not soup.admissible and soup.reasons == [f"perplexity: median 900.0 > {rule.max_perplexity_ratio} × 20.0"]
    # One bad answer in ten is tolerated (max_flagged_share 0.1), two are not.
    ten = PLAIN + PLAIN[:2]
    assert rule.check(ten[:9] + [LOOP], [5.0] * 10, reference_perplexity=20.0).admissible
    assert not rule.check(ten[:8] + [LOOP, LOOP], [5.0] * 10, reference_perplexity=20.0).admissible
    assert rule.check(["", *PLAIN[:1]], [float("nan"), 5.0], 20.0).flags[0] == ("empty",)
    with pytest.raises(InputError, match="one perplexity each"):
        rule.check(PLAIN, [5.0], 20.0)


# --- figures -------------------------------------------------------------------------------------

def test_figures_build():
    rule = FluencyRule()
    groups = {
        "users' real texts": rule.check(ALL_REAL, [20.0] * 96, 20.0).per_answer,
        "unsteered": rule.check(PLAIN, [5.0] * 8, 20.0, 5.0).per_answer,
        "loop": rule.check([LOOP, SINGLE], [1.5, 1.2], 20.0).per_answer,
        "gibberish": rule.check([GIBBERISH, SOUP], [800.0, 2000.0], 20.0).per_answer,
    }
    figure = fluency_figure(groups, rule)
    assert isinstance(figure, go.Figure) and len(figure.data) == 2 * len(groups)
    assert [t.name for t in figure.data if t.showlegend is not False] == list(groups)
    values = {
        "emoji_emma": {"unsteered": 0.0, "steered ×1": 0.1, "real texts": 0.18},
        "terse_tom": {"unsteered": 15.0, "steered ×1": 9.0, "real texts": 3.5},
    }
    markers = {"emoji_emma": "emoji_per_word", "terse_tom": "mean_sentence_words"}
    raw = marker_figure(values, markers)
    assert len(raw.data) == 6 and {t.name for t in raw.data} == {"unsteered", "steered ×1", "real texts"}
    moved = marker_figure(values, markers, normalised=True)
    assert [t.name for t in moved.data] == ["unsteered", "steered ×1", "real texts"]
    assert list(moved.data[1].y) == pytest.approx([0.1 / 0.18, 6 / 11.5])
