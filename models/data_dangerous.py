"""The ``dangerous-code`` model: destructive or insecure shell and code versus benign code.

No public, permissively licensed labelled set of dangerous commands was found on PyPI, so
the labelled set is constructed (``models/dangerous_text.py``): dangerous templates and
safe counterparts doing a similar job, each drawn in several contexts (shell script,
Dockerfile, CI step, Makefile, Markdown, Python handler) and sometimes inserted among real
lines of standard-library code. Real standard-library code windows are the bulk of the
negatives. The held-out set uses fresh draws (another seed) and unseen library files; a
template-grouped cross-validation, recorded at build time, measures the harder question of
patterns never seen in training.
"""

from __future__ import annotations

import random

from models import dangerous_text
from models.corpus import SourceFile, corpus_record, random_lines, random_windows, split_files
from models.train import Dataset, Example, ModelSpec
from preflight_svc.onnx_manifest import Normalisation

SPEC = ModelSpec(
    name="dangerous-code",
    version="1.0.0",
    task="dangerous-code",
    description="Destructive or insecure shell commands and code: recursive deletes of system "
    "paths, disk wipes, pipe-to-shell installs, world-writable permissions, disabled TLS "
    "verification, SQL built from input, eval/exec/shell of input, reverse shells, disabled "
    "security controls, destructive infrastructure commands, secret exfiltration.",
    positive_label="dangerous",
    thresholds=((0.9, "deny"), (0.6, "require_approval"), (0.4, "warn")),
    max_length=200,
    stride=60,
    normalise=(
        Normalisation.STRIP_FORMAT_CHARS,
        Normalisation.LOWERCASE,
        Normalisation.COLLAPSE_WHITESPACE,
    ),
    ngram_range=(1, 5),
    min_df=3,
    c=8.0,
    group_cv_folds=4,
)

TRAIN_PER_TEMPLATE = 60
HELDOUT_PER_TEMPLATE = 15
EMBED_SHARE = 0.4


def _draw(text: str, files: list[SourceFile], rng: random.Random) -> str:
    """Sometimes put a snippet among real code lines; keep it within one window."""
    if rng.random() >= EMBED_SHARE:
        return text[: SPEC.max_length]
    lines = random_lines(rng.choice(files).text, rng, 6)
    lines.insert(rng.randint(0, len(lines)), text)
    joined = "\n".join(lines)
    if len(joined) <= SPEC.max_length:
        return joined
    at = joined.find(text)
    start = max(0, min(at, len(joined) - SPEC.max_length))
    return joined[start : start + SPEC.max_length]


def _examples(files: list[SourceFile], per_template: int, rng: random.Random) -> list[Example]:
    out = []
    for i in range(len(dangerous_text.DANGEROUS)):
        out += [
            Example(_draw(dangerous_text.dangerous(i, rng), files, rng), 1, f"dangerous:{i}")
            for _ in range(per_template)
        ]
    for i in range(len(dangerous_text.SAFE)):
        out += [
            Example(_draw(dangerous_text.safe(i, rng), files, rng), 0, f"safe:{i}")
            for _ in range(per_template)
        ]
    return out


def build_dataset(files: list[SourceFile]) -> Dataset:
    """Train and evaluation sets for the dangerous-code model."""
    train_files, held_files = split_files(files, 0.1, salt="dangerous-code")
    rng, held_rng = random.Random(11), random.Random(12)
    train = _examples(train_files, TRAIN_PER_TEMPLATE, rng)
    for f in train_files:
        count = max(1, min(12, len(f.text) // 4_000))
        windows = random_windows(f.text, SPEC.max_length, count, rng)
        train += [Example(w, 0, f"stdlib:{f.rel}") for w in windows]
    heldout = _examples(held_files, HELDOUT_PER_TEMPLATE, held_rng)
    source_files = [Example(f.text, 0, f.rel) for f in held_files]
    heldout += [
        Example(w, 0, f"stdlib:{f.rel}")
        for f in held_files
        for w in random_windows(f.text, SPEC.max_length, max(1, len(f.text) // 4_000), held_rng)
    ]
    return Dataset(
        train=train,
        evals={"heldout": heldout, "source_files": source_files},
        sources=[
            corpus_record(files),
            {
                "kind": "constructed",
                "name": "models/dangerous_text.py",
                "dangerous_templates": len(dangerous_text.DANGEROUS),
                "safe_templates": len(dangerous_text.SAFE),
                "seeds": {"train": 11, "heldout": 12},
                "licence": "Apache-2.0",
                "note": "templates written for this project; no public labelled set was found",
            },
        ],
        recipe=[
            f"{TRAIN_PER_TEMPLATE} draws per dangerous and per safe template in random "
            f"contexts, {EMBED_SHARE:.0%} inserted among real stdlib lines",
            "negatives also: up to 12 random windows per train stdlib file",
            "held-out: fresh draws (seed 12) with held-out stdlib files (10% by path hash)",
        ],
    )
