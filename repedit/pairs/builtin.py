"""Built-in data shipped with the package (written by us; nothing is downloaded)."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any


def _read_jsonl(name: str) -> list[dict[str, Any]]:
    text = files("repedit").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def style_texts() -> list[dict[str, Any]]:
    """64 short texts in two clearly different registers, paired by topic.

    Returns one dict per text: ``{"text", "style": "formal" | "casual", "topic"}``; the two texts of
    a topic say the same thing, so ``topic`` is the natural group for group-aware splits.
    """
    rows = []
    for pair in _read_jsonl("styles.jsonl"):
        for style in ("formal", "casual"):
            rows.append({"text": pair[style], "style": style, "topic": pair["topic"]})
    return rows
