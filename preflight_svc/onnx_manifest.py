"""Model manifests: the JSON Schema, the validated value, and thresholds to decisions.

``manifest.json`` sits next to ``model.onnx`` in a model folder. It names the labels (one per
output column), how raw outputs become scores (``activation``), the windows long texts are
cut into (``max_length``/``stride``, in tokens for transformers and characters for text
models), the SHA-256 of every file loaded, and per-label thresholds that map a score to a
decision. ``provenance`` and ``metrics`` are free-form records for the model card.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from cabincrew.canonical import canonical_hash
from cabincrew.decisions import Decision
from preflight_svc.onnx_errors import InvalidThresholds, ManifestError

MANIFEST_FILE = "manifest.json"

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_FILE_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}

MANIFEST_SCHEMA: Mapping[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "CabinCrew ONNX model manifest",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema_version",
        "name",
        "version",
        "task",
        "input_kind",
        "labels",
        "thresholds",
        "max_length",
        "stride",
        "sha256",
    ],
    "properties": {
        "schema_version": {"const": 1},
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
        "version": {"type": "string", "minLength": 1, "maxLength": 64},
        "task": {"type": "string", "minLength": 1, "maxLength": 128},
        "description": {"type": "string"},
        "input_kind": {"enum": ["transformer", "text"]},
        "model_file": _FILE_NAME,
        "sha256": _SHA256,
        "labels": {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": 64},
        },
        "activation": {"enum": ["softmax", "sigmoid", "none"]},
        "input_name": {"type": "string", "minLength": 1},
        "output_name": {"type": "string", "minLength": 1},
        # An empty threshold set would make the model unable to say anything but allow.
        "thresholds": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["min_score", "decision"],
                    "properties": {
                        "min_score": {"type": "number", "minimum": 0, "maximum": 1},
                        "decision": {"enum": ["allow", "warn", "require_approval", "deny"]},
                    },
                },
            },
        },
        "max_length": {"type": "integer", "minimum": 8, "maximum": 1_000_000},
        "stride": {"type": "integer", "minimum": 0},
        "tokenizer": {
            "type": "object",
            "additionalProperties": False,
            "required": ["file", "sha256"],
            "properties": {
                "file": _FILE_NAME,
                "sha256": _SHA256,
                "pad_token_id": {"type": "integer", "minimum": 0},
            },
        },
        # Free-form records for humans and the model card: data sources, licences, digests,
        # recipe, measured figures. They are hashed into the manifest digest like the rest.
        # Text normalisation applied before windowing, identically at training and serving
        # time (normalise_text); tokenizer.json carries its own for transformer models.
        "normalise": {
            "type": "array",
            "uniqueItems": True,
            "items": {"enum": ["strip_format_chars", "lowercase", "collapse_whitespace"]},
        },
        # Feed each window as "window + SHAPE_SEPARATOR + shape(window)" (see window_input).
        "append_shape": {"type": "boolean"},
        "provenance": {"type": "object"},
        "metrics": {"type": "object"},
    },
    "allOf": [
        {
            "if": {"properties": {"input_kind": {"const": "transformer"}}},
            "then": {
                "required": ["tokenizer"],
                "not": {"anyOf": [{"required": ["normalise"]}, {"required": ["append_shape"]}]},
            },
        }
    ],
}

_VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)


class InputKind(enum.Enum):
    """How a model takes its input."""

    TRANSFORMER = "transformer"
    TEXT = "text"


class Normalisation(enum.Enum):
    """A text normalisation step of text-kind models, applied in this order."""

    STRIP_FORMAT_CHARS = "strip_format_chars"
    LOWERCASE = "lowercase"
    COLLAPSE_WHITESPACE = "collapse_whitespace"


_WHITESPACE = re.compile(r"\s+")


@functools.cache
def _format_chars() -> re.Pattern[str]:
    # Zero-width joiners, bidi controls, tag characters…: invisible, and a common way to
    # split trigger words. Built once, on first use, from the interpreter's Unicode tables.
    chars = "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf")
    return re.compile("[" + re.escape(chars) + "]")


def normalise_text(text: str, steps: Iterable[Normalisation]) -> str:
    """Apply normalisation steps; shared by the model builder and the runtime for parity.

    The steps live outside the graph on purpose: onnxruntime's StringNormalizer needs an
    installed locale to lowercase, and its character tokenizer drops newlines, so doing
    both here keeps training features and served features identical on every machine.
    """
    chosen = set(steps)
    if Normalisation.STRIP_FORMAT_CHARS in chosen:
        text = _format_chars().sub("", text)
    if Normalisation.LOWERCASE in chosen:
        text = text.lower()
    if Normalisation.COLLAPSE_WHITESPACE in chosen:
        text = _WHITESPACE.sub(" ", text)
    return text


# Private-use code points: they never occur in ordinary text, so n-grams over the shape
# never collide with n-grams over the text itself.
SHAPE_SEPARATOR = "\ue003"
_SHAPE = str.maketrans(
    {
        **{c: "\ue000" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
        **{c: "\ue001" for c in "abcdefghijklmnopqrstuvwxyz"},
        **{c: "\ue002" for c in "0123456789"},
    }
)


def window_input(window: str, append_shape: bool) -> str:
    """The string a text-kind graph receives for one window.

    With ``append_shape`` the window is followed by its character shape (ASCII upper, lower
    and digits mapped to three private-use symbols, everything else kept). Character n-grams
    over the shape see what n-grams over the text cannot: long runs of mixed case and digits,
    the mark of random keys and tokens. A graph cannot compute this mapping with standard
    ONNX string ops, so it is declared in the manifest and shared with the builder.
    """
    if not append_shape:
        return window
    return window + SHAPE_SEPARATOR + window.translate(_SHAPE)


class Activation(enum.Enum):
    """What turns the raw model output into scores in [0, 1]."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    NONE = "none"


@dataclass(frozen=True)
class ThresholdRule:
    """A score at or above ``min_score`` yields ``decision``."""

    min_score: float
    decision: Decision


Thresholds = Mapping[str, Sequence[ThresholdRule]]


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer file of a transformer model."""

    file: str
    sha256: str
    pad_token_id: int = 0


@dataclass(frozen=True)
class Manifest:
    """A validated model manifest."""

    name: str
    version: str
    task: str
    input_kind: InputKind
    labels: tuple[str, ...]
    activation: Activation
    thresholds: Mapping[str, tuple[ThresholdRule, ...]]
    max_length: int
    stride: int
    sha256: str
    model_file: str = "model.onnx"
    input_name: str | None = None
    output_name: str | None = None
    tokenizer: TokenizerSpec | None = None
    digest: str = ""
    normalise: tuple[Normalisation, ...] = ()
    append_shape: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, doc: Any, *, where: str = MANIFEST_FILE) -> Manifest:
        """Validate a parsed manifest document and build the value."""
        error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(doc))
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise ManifestError(f"{where}: {path}: {error.message}")
        labels = tuple(doc["labels"])
        unknown = sorted(set(doc["thresholds"]) - set(labels))
        if unknown:
            raise ManifestError(f"{where}: thresholds name unknown labels {unknown}")
        if doc["stride"] >= doc["max_length"]:
            raise ManifestError(f"{where}: stride must be smaller than max_length")
        tok = doc.get("tokenizer")
        default_activation = "softmax" if doc["input_kind"] == "transformer" else "none"
        return cls(
            name=doc["name"],
            version=doc["version"],
            task=doc["task"],
            input_kind=InputKind(doc["input_kind"]),
            labels=labels,
            activation=Activation(doc.get("activation", default_activation)),
            thresholds=_parse_thresholds(doc["thresholds"]),
            max_length=doc["max_length"],
            stride=doc["stride"],
            sha256=doc["sha256"],
            model_file=doc.get("model_file", "model.onnx"),
            input_name=doc.get("input_name"),
            output_name=doc.get("output_name"),
            tokenizer=None
            if tok is None
            else TokenizerSpec(tok["file"], tok["sha256"], tok.get("pad_token_id", 0)),
            normalise=tuple(Normalisation(n) for n in doc.get("normalise", ())),
            append_shape=bool(doc.get("append_shape", False)),
            digest=canonical_hash(doc),
            raw=doc,
        )


def _parse_thresholds(doc: Mapping[str, Any]) -> dict[str, tuple[ThresholdRule, ...]]:
    return {
        label: tuple(
            ThresholdRule(float(r["min_score"]), Decision.parse(r["decision"])) for r in rules
        )
        for label, rules in doc.items()
    }


def load_manifest(folder: str | Path) -> Manifest:
    """Read and validate ``manifest.json`` of a model folder."""
    path = Path(folder) / MANIFEST_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.json in the model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable: {exc}") from None
    return Manifest.from_json(doc, where=str(path))


def parse_thresholds(doc: Mapping[str, Any], labels: Sequence[str]) -> Thresholds:
    """Validate threshold overrides (the manifest's JSON shape) against a model's labels."""
    errors = [
        e.message
        for e in jsonschema.Draft202012Validator(
            MANIFEST_SCHEMA["properties"]["thresholds"]
        ).iter_errors(doc)
    ]
    if errors:
        raise InvalidThresholds(f"invalid thresholds: {errors[0]}")
    unknown = sorted(set(doc) - set(labels))
    if unknown:
        raise InvalidThresholds(f"thresholds name unknown labels {unknown}")
    return _parse_thresholds(doc)


def decide(scores: Mapping[str, float], thresholds: Thresholds) -> Decision:
    """The most severe decision whose threshold a score reaches; allow when none does.

    A score that is missing or not finite is deny: fail closed, since NaN compares false
    against every threshold and would otherwise read as allow.
    """
    decision = Decision.ALLOW
    for label, rules in thresholds.items():
        score = scores.get(label)
        if score is None or not math.isfinite(score):
            return Decision.DENY
        for rule in rules:
            if score >= rule.min_score and rule.decision.severity > decision.severity:
                decision = rule.decision
    return decision
