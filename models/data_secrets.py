"""The ``secrets`` model: credentials and keys in code, config and logs.

Positives are synthetic credentials of each rule's format (``models/secrets_data.py``),
written as a line of code or config and inserted among real lines of standard-library
code. Negatives are windows of real standard-library code, plus look-alike lines (hashes,
UUIDs, placeholders, environment look-ups, public keys) inserted the same way. Held-out
files are disjoint from training files, and held-out credentials come from another seed.
"""

from __future__ import annotations

import random

from models.corpus import (
    SourceFile,
    corpus_record,
    random_lines,
    random_windows,
    split_files,
)
from models.secrets_data import RULE_IDS, generate_example, generate_lookalike
from models.train import Dataset, Example, ModelSpec
from preflight_svc.onnx_manifest import Normalisation, normalise_text
from preflight_svc.onnx_models import char_windows

SPEC = ModelSpec(
    name="secrets",
    version="1.0.0",
    task="secret-detection",
    description="Credentials and private keys in text and code (provider tokens, cloud keys, "
    "private keys, passwords in assignments and connection strings).",
    positive_label="secret",
    thresholds=((0.9, "deny"), (0.5, "require_approval")),
    max_length=256,
    stride=64,
    normalise=(Normalisation.COLLAPSE_WHITESPACE,),  # case carries signal in key formats
    append_shape=True,
    ngram_range=(1, 4),
    min_df=10,
    c=8.0,
)

TRAIN_PER_RULE = 220
HELDOUT_PER_RULE = 60
LOOKALIKES_TRAIN = 3_000
LOOKALIKES_HELDOUT = 600


def _embed(line: str, files: list[SourceFile], rng: random.Random) -> str:
    """Insert a line among real code and cut a served-size window that contains it."""
    context = random_lines(rng.choice(files).text, rng, 8)
    context.insert(rng.randint(0, len(context)), line)
    text = normalise_text("\n".join(context), SPEC.normalise)
    target = normalise_text(line, SPEC.normalise)[: SPEC.max_length]
    at = text.find(target)
    size = SPEC.max_length
    if len(text) <= size or at < 0:
        return text[:size]
    lo = max(0, at + len(target) - size)
    hi = min(at, len(text) - size)
    start = rng.randint(lo, hi) if lo <= hi else at
    return text[start : start + size]


def _windows(files: list[SourceFile], rng: random.Random, per_chars: int) -> list[str]:
    out = []
    for f in files:
        text = normalise_text(f.text, SPEC.normalise)
        count = max(1, min(40, len(text) // per_chars))
        out.extend(random_windows(text, SPEC.max_length, count, rng))
    return out


def build_dataset(files: list[SourceFile]) -> Dataset:
    """Train and evaluation sets for the secrets model."""
    train_files, held_files = split_files(files, 0.1, salt="secrets")
    rng = random.Random(1)
    held_rng = random.Random(2)

    train = [
        Example(_embed(generate_example(rule, rng), train_files, rng), 1, f"rule:{rule}")
        for rule in RULE_IDS
        for _ in range(TRAIN_PER_RULE)
    ]
    train += [
        Example(_embed(generate_lookalike(rng), train_files, rng), 0, "lookalike")
        for _ in range(LOOKALIKES_TRAIN)
    ]
    train += [Example(w, 0, "stdlib") for w in _windows(train_files, rng, 1_000)]

    heldout = [
        Example(_embed(generate_example(rule, held_rng), held_files, held_rng), 1, f"rule:{rule}")
        for rule in RULE_IDS
        for _ in range(HELDOUT_PER_RULE)
    ]
    heldout += [
        Example(_embed(generate_lookalike(held_rng), held_files, held_rng), 0, "lookalike")
        for _ in range(LOOKALIKES_HELDOUT)
    ]
    source_windows = [
        Example(w, 0, f.rel)
        for f in held_files
        for w in char_windows(normalise_text(f.text, SPEC.normalise), SPEC.max_length, SPEC.stride)
    ]
    heldout += source_windows
    return Dataset(
        train=train,
        evals={
            "heldout": heldout,
            "source_windows": source_windows,
            "source_files": [Example(f.text, 0, f.rel) for f in held_files],
        },
        sources=[
            corpus_record(files),
            {
                "kind": "generated",
                "name": "models/secrets_data.py",
                "rules": list(RULE_IDS),
                "seeds": {"train": 1, "heldout": 2},
                "licence": "Apache-2.0",
                "note": "synthetic random credentials in each rule's format; none is real",
            },
        ],
        recipe=[
            f"positives: {TRAIN_PER_RULE} per rule, one generated line inserted among 1-8 real "
            "stdlib lines, cut to a served-size window containing it",
            f"negatives: up to 40 random windows per train stdlib file, plus "
            f"{LOOKALIKES_TRAIN} look-alike lines inserted the same way",
            "split: stdlib files by sha256(path) (10% held out); held-out credentials from seed 2",
        ],
    )
