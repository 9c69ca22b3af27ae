"""Data the project generates for its demo and tests: SYNTHETIC, documented as such.

- `write_text_corpus`: English prose for causal-LM pretraining, taken from CPython's own
  documentation (`pydoc_data.topics`, shipped with every Python), split into paragraphs.
- `write_topic_dataset`: a labelled text-classification set. Each sentence mixes words from
  its class's vocabulary with shared filler words, so a small model can learn it but must
  actually read the text. Seeded: the same arguments always write the same rows.

The platform itself reads any user data in the supported formats (Parquet, JSONL, CSV).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

TOPIC_WORDS = {
    "sports": "match goal team coach league score player season stadium referee tournament striker".split(),
    "weather": "rain storm cloud forecast wind sunny thunder humid frost breeze temperature drizzle".split(),
    "finance": "market stock bank profit loan invest budget credit dividend shares inflation bond".split(),
    "science": "atom cell experiment theory molecule energy physics biology research quantum lab gene".split(),
}
FILLER = "the a of and to in is was for on with that this it from by at as an be".split()


def write_text_corpus(path: str | Path, max_rows: int | None = None) -> int:
    """Paragraphs of CPython's documentation as JSONL rows {"text": ...}; returns the row count."""
    from pydoc_data.topics import topics

    rows = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            if len(text) >= 40:
                rows.append(text)
    rows = rows[:max_rows] if max_rows else rows
    _write_jsonl(path, [{"text": t} for t in rows])
    return len(rows)


def topic_sentence(rng: random.Random, label: str, words_per_row: int = 12, topic_words: int = 3) -> str:
    words = [rng.choice(FILLER) for _ in range(words_per_row - topic_words)]
    for _ in range(topic_words):
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPIC_WORDS[label]))
    return " ".join(words)


def write_topic_dataset(path: str | Path, rows: int, seed: int = 0, labels: list[str] | None = None) -> int:
    """A balanced labelled set as JSONL rows {"text": ..., "label": ...}."""
    labels = labels or sorted(TOPIC_WORDS)
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        label = labels[i % len(labels)]
        data.append({"text": topic_sentence(rng, label), "label": label})
    rng.shuffle(data)
    _write_jsonl(path, data)
    return len(data)


def _write_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
