"""Data the project generates for its demo and tests: SYNTHETIC, documented as such.

- `write_text_corpus`: English prose for causal-LM pretraining, taken from CPython's own
  documentation (`pydoc_data.topics`, shipped with every Python), split into paragraphs.
- `write_topic_dataset`: a labelled text-classification set. Each sentence mixes words from
  its class's vocabulary with shared filler words, so a small model can learn it but must
  actually read the text. Seeded: the same arguments always write the same rows.
- `write_instruction_dataset`: prompt/response pairs for instruction fine-tuning, from the same
  topic sentences: the prompt asks what a sentence is about, the response names its topic and
  quotes one of its words.
- `write_stream`: the same kind of rows as a stream of windows with controllable drift, for
  continual learning: each window covers a subset of the classes (class-incremental drift:
  a model trained on the new window alone forgets the others) and replaces part of each
  class's vocabulary with words of its own (vocabulary drift). Files alternate JSONL, CSV and
  Parquet, as a landing zone would receive them.
- `write_doc_stream`: REAL text as a stream, for continual pretraining of a language model: the
  same CPython documentation, one part of it per window (statements, expressions, the data
  model, the built-in types), so a model trained on the newest part forgets the others.
- `write_digit_stream`: REAL images (scikit-learn's handwritten digits), upscaled to PNG files
  in class folders, as class-incremental windows of digits, for image classification.

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

    rows = doc_paragraphs(sorted(topics))
    rows = rows[:max_rows] if max_rows else rows
    _write_jsonl(path, [{"text": t} for t in rows])
    return len(rows)


# The parts of CPython's documentation (pydoc_data.topics keys) the doc stream's windows hold, in order.
DOC_PARTS = {
    "statements": "assert assignment async augassign await break class compound continue del for function global if import "
    "nonlocal pass raise return try while with yield lambda else".split(),
    "expressions": "atom-identifiers atom-literals attribute-references binary bitwise booleans calls comparisons conversions "
    "exprlists in operator-summary power shifting slicings subscriptions unary identifiers integers floating imaginary "
    "strings formatstrings lists dict numbers".split(),
    "data model": "attribute-access callable-types customization context-managers numeric-types sequence-types specialattrs "
    "specialnames types objects id-classes bltin-code-objects bltin-ellipsis-object bltin-null-object "
    "bltin-type-objects".split(),
    "built-in types": "string-methods typesfunctions typesmapping typesmethods typesmodules typesseq typesseq-mutable truth "
    "debugger exceptions execmodel naming dynamic-features".split(),
}


def doc_paragraphs(keys: list[str]) -> list[str]:
    """The paragraphs (40 characters or more, whitespace folded) of these documentation topics."""
    from pydoc_data.topics import topics

    rows = []
    for key in keys:
        if key not in topics:  # another Python's topics: a key it lacks is skipped
            continue
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            if len(text) >= 40:
                rows.append(text)
    return rows


def write_doc_stream(
    out: str | Path, windows: int = 4, files_per_window: int = 2, max_rows: int | None = None, seed: int = 0
) -> list[Path]:
    """Windows of REAL text under out/window-000/, …: window k holds the paragraphs of part k of
    the documentation (DOC_PARTS, in order; each paragraph once in the stream, in the first
    window whose part has it; at most `max_rows` of them, shuffled by `seed`), as
    `files_per_window` files (JSONL, CSV and Parquet in turn) of rows {"text": ...}. Returns the
    window dirs."""
    parts = list(DOC_PARTS)
    if not 1 <= windows <= len(parts):
        raise ValueError(f"the documentation stream has {len(parts)} parts: windows must be 1..{len(parts)} (got {windows})")
    out, dirs, seen = Path(out), [], set()
    for w, part in enumerate(parts[:windows]):
        texts = [t for t in dict.fromkeys(doc_paragraphs(DOC_PARTS[part])) if t not in seen]  # once in the stream
        seen.update(texts)
        rows = [{"text": t} for t in texts]
        random.Random(f"{seed}:docs:{w}").shuffle(rows)
        d = out / f"window-{w:03d}"
        _write_parts(d, rows[:max_rows] if max_rows else rows, files_per_window, w)
        dirs.append(d)
    return dirs


def _write_parts(d: Path, rows: list[dict], files: int, turn: int) -> None:
    """Rows as `files` files in `d`, JSONL, CSV and Parquet in turn (from `turn`), as a landing zone receives them."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        part = rows[f::files]
        kind = ("jsonl", "csv", "parquet")[(turn + f) % 3]
        path = d / f"part-{f}.{kind}"
        if kind == "jsonl":
            _write_jsonl(path, part)
        else:
            table = pa.Table.from_pylist(part)
            pq.write_table(table, path) if kind == "parquet" else pacsv.write_csv(table, path)


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


def write_instruction_dataset(path: str | Path, rows: int, seed: int = 0) -> int:
    """SYNTHETIC instruction data as JSONL rows {"prompt": ..., "response": ...}: a topic sentence
    to name the topic of, answered by a sentence that names it and quotes the first of its
    topic's words in the prompt (learnable by a small model: the answer follows from the prompt)."""
    data = instructions(rows, random.Random(seed), sorted(TOPIC_WORDS))
    _write_jsonl(path, data)
    return len(data)


def instructions(rows: int, rng: random.Random, labels: list[str]) -> list[dict]:
    """`rows` SYNTHETIC prompt/response pairs about `labels` in turn, shuffled."""
    data = []
    for i in range(rows):
        label = labels[i % len(labels)]
        sentence = topic_sentence(rng, label)
        word = next(w for w in sentence.split() if w in TOPIC_WORDS[label])
        data.append({"prompt": f"What is this about? {sentence}", "response": f"It is about {label}: it says {word}."})
    rng.shuffle(data)
    return data


def write_instruction_stream(
    out: str | Path, windows: int = 2, rows_per_window: int = 400, files_per_window: int = 2, topics_per_window: int = 2, seed: int = 0
) -> list[Path]:
    """Windows of SYNTHETIC instructions under out/window-000/, …: window k asks about
    `topics_per_window` of the 4 topics (consecutive groups, as `write_stream`'s classes), so a
    model that learns a window's answers meets topics it has not answered before. Files as
    `_write_parts` writes them (rows {"prompt", "response"}). Returns the window dirs."""
    labels = sorted(TOPIC_WORDS)
    if not 1 <= topics_per_window <= len(labels):
        raise ValueError(f"topics_per_window must be 1..{len(labels)} (got {topics_per_window})")
    out, dirs = Path(out), []
    for w in range(windows):
        rows = instructions(rows_per_window, random.Random(f"{seed}:instructions:{w}"), window_classes(w, labels, topics_per_window))
        d = out / f"window-{w:03d}"
        _write_parts(d, rows, files_per_window, w)
        dirs.append(d)
    return dirs


def _write_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def window_vocabulary(label: str, window: int, new_fraction: float, seed: int) -> list[str]:
    """The class's words in `window`: its base words with `new_fraction` of them replaced by
    pseudo-words that first appear in this window (window 0 keeps the base words)."""
    base = TOPIC_WORDS[label]
    if window == 0 or new_fraction <= 0:
        return list(base)
    rng = random.Random(f"{seed}:{label}:{window}")
    replaced = max(1, round(len(base) * new_fraction))
    keep = rng.sample(base, len(base) - replaced)
    syllables = "ka lo mi ru ze tor vin pa sel dro nu fex".split()
    fresh = {"".join(rng.choice(syllables) for _ in range(3)) for _ in range(replaced * 3)}
    return keep + sorted(fresh)[:replaced]


def window_classes(window: int, labels: list[str], per_window: int) -> list[str]:
    """Class-incremental order: consecutive groups of `per_window` classes, wrapping around."""
    start = (window * per_window) % len(labels)
    return [labels[(start + k) % len(labels)] for k in range(per_window)]


def write_stream(
    out: str | Path,
    windows: int = 4,
    rows_per_window: int = 400,
    files_per_window: int = 2,
    seed: int = 0,
    classes_per_window: int = 2,
    new_vocab_fraction: float = 0.5,
) -> list[Path]:
    """Write windows of labelled files under out/window-000/, window-001/, …; returns the window dirs.

    Every window has rows of only `classes_per_window` of the 4 classes (all of them when it is
    4) and its own share of new vocabulary. Same arguments, same bytes.
    """
    labels = sorted(TOPIC_WORDS)
    if not 1 <= classes_per_window <= len(labels):
        raise ValueError(f"classes_per_window must be 1..{len(labels)} (got {classes_per_window})")
    if not 0 <= new_vocab_fraction <= 1:
        raise ValueError(f"new_vocab_fraction must be within 0..1 (got {new_vocab_fraction})")
    out, dirs = Path(out), []
    for w in range(windows):
        rng = random.Random(f"{seed}:window:{w}")
        classes = window_classes(w, labels, classes_per_window)
        vocab = {c: window_vocabulary(c, w, new_vocab_fraction, seed) for c in classes}
        rows = []
        for i in range(rows_per_window):
            label = classes[i % len(classes)]
            words = [rng.choice(FILLER) for _ in range(9)]
            for _ in range(3):
                words.insert(rng.randrange(len(words) + 1), rng.choice(vocab[label]))
            rows.append({"text": " ".join(words), "label": label})
        rng.shuffle(rows)
        d = out / f"window-{w:03d}"
        _write_parts(d, rows, files_per_window, w)
        dirs.append(d)
    return dirs


def write_digit_stream(
    out: str | Path, windows: int = 3, classes_per_window: int = 2, size: int = 32, per_class: int | None = None, seed: int = 0
) -> list[Path]:
    """REAL images, not synthetic: the 1,797 handwritten digits (8×8, 16 grey levels) that
    scikit-learn ships (UCI ML hand-written digits), upscaled to `size`×`size` greyscale PNGs
    in class folders, as class-incremental windows: out/window-000/0/…png, out/window-000/1/…,
    then digits 2 and 3 in window-001, and so on (the Split-MNIST protocol, on digits).

    Each window has every image of its classes (about 180 per digit), or `per_class` of them
    drawn with `seed`. Same arguments, same bytes. Returns the window dirs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if classes_per_window < 1 or windows < 1 or windows * classes_per_window > 10:
        raise ValueError(f"{windows} windows of {classes_per_window} digits need {windows * classes_per_window} of the 10 digits")
    if size < 8:
        raise ValueError(f"size must be at least the digits' own 8 pixels (got {size})")
    digits = load_digits()
    out, dirs = Path(out), []
    for w in range(windows):
        d = out / f"window-{w:03d}"
        for digit in range(w * classes_per_window, (w + 1) * classes_per_window):
            indices = np.flatnonzero(digits.target == digit)
            if per_class is not None:
                indices = np.sort(np.random.default_rng([seed, digit]).permutation(indices)[:per_class])
            folder = d / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
                Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.png")
        dirs.append(d)
    return dirs
