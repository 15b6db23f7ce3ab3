"""Train a character n-gram TF-IDF + logistic regression and export it as a model folder.

The exported graph takes a string tensor and holds the whole featurisation (character
tokenizer, TF-IDF vocabulary and weights, linear model), so the folder is self-contained.
Text is normalised by ``preflight_svc.onnx_manifest.normalise_text`` both here and at serving
time. Build-time only: needs scikit-learn and skl2onnx, which the service does not.
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cabincrew.canonical import canonical_hash, sha256_hex
from preflight_svc.onnx_eval import EVAL_DIR, ModelEvaluation, evaluate_model_dir
from preflight_svc.onnx_manifest import (
    MANIFEST_FILE,
    Manifest,
    Normalisation,
    normalise_text,
    window_input,
)


@dataclass(frozen=True)
class Example:
    """One labelled text; ``group`` keeps generated variants of one template together."""

    text: str
    label: int
    group: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a default model besides its data."""

    name: str
    version: str
    task: str
    description: str
    positive_label: str
    thresholds: Sequence[tuple[float, str]]
    max_length: int
    stride: int
    normalise: tuple[Normalisation, ...]
    append_shape: bool = False
    ngram_range: tuple[int, int] = (1, 4)
    # Vocabulary size is bounded by min_df alone: a max_features cut could keep an n-gram
    # while dropping one of its characters, which the ONNX graph cannot count.
    max_features: int | None = None
    min_df: int = 3
    binary: bool = True
    c: float = 4.0
    group_cv_folds: int = 0


@dataclass
class Dataset:
    """Training data, evaluation sets (name → examples), and where they came from."""

    train: list[Example]
    evals: dict[str, list[Example]]
    sources: list[Mapping[str, Any]]
    recipe: list[str] = field(default_factory=list)


def digest_examples(examples: Sequence[Example]) -> str:
    """SHA-256 over the canonical JSON of the examples, for the manifest."""
    return canonical_hash([[e.text, e.label, e.group] for e in examples])


def model_input(spec: ModelSpec, text: str) -> str:
    """What the served graph would receive for the first window of ``text``."""
    window = normalise_text(text, spec.normalise)[: spec.max_length]
    return window_input(window, spec.append_shape)


def build_model(
    spec: ModelSpec, data: Dataset, out: Path
) -> tuple[dict[str, Any], ModelEvaluation]:
    """Train, export, write the folder, evaluate the served model; return manifest and figures."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    # scikit-learn's char analyzer collapses runs of whitespace and the ONNX tokenizer does
    # not, so only collapsed text gives the same features on both sides.
    if Normalisation.COLLAPSE_WHITESPACE not in spec.normalise:
        raise ValueError("text models need the collapse_whitespace normalisation")
    texts = [model_input(spec, e.text) for e in data.train]
    labels = np.array([e.label for e in data.train])
    pipeline = _fit(spec, texts, labels)
    classifier = pipeline.named_steps["lr"]

    with warnings.catch_warnings():
        # skl2onnx warns that non-word analyzers "may not work"; parity is checked below
        # on every build instead.
        warnings.simplefilter("ignore", UserWarning)
        onnx_model = convert_sklearn(
            pipeline,
            name=spec.name,
            initial_types=[("text", StringTensorType([None, 1]))],
            options={id(classifier): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    onnx_model.producer_name = "cabincrew-models"
    onnx_model.producer_version = spec.version
    model_bytes = onnx_model.SerializeToString()
    parity = _parity(spec, pipeline, model_bytes, data)

    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model_bytes)
    eval_digests = _write_eval_sets(out / EVAL_DIR, data.evals)
    manifest = _manifest(spec, data, model_bytes, eval_digests)
    manifest["provenance"]["onnx_parity_max_abs_diff"] = parity
    Manifest.from_json(manifest)  # the builder must never write what the loader refuses
    _write_manifest(out, manifest)

    evaluation = evaluate_model_dir(out)
    manifest["metrics"] = evaluation.as_dict()
    if spec.group_cv_folds:
        manifest["metrics"]["group_cv"] = group_cv(spec, data, spec.group_cv_folds)
    _write_manifest(out, manifest)
    return manifest, evaluation


class ParityError(Exception):
    """The exported graph does not score like the trained pipeline."""


def _parity(
    spec: ModelSpec, pipeline: Any, model_bytes: bytes, data: Dataset, limit: int = 400
) -> float:
    """Max |sklearn - onnxruntime| probability over evaluation windows; fails above 1e-4."""
    import onnxruntime as ort

    examples = [e for group in data.evals.values() for e in group][:limit]
    texts = [model_input(spec, e.text) for e in examples]
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    batch = np.array(texts, dtype=object).reshape(-1, 1)
    served = session.run(["probabilities"], {"text": batch})[0][:, 1]
    trained = pipeline.predict_proba(texts)[:, 1]
    diff = float(np.abs(served - trained).max())
    if diff > 1e-4:
        raise ParityError(f"ONNX and scikit-learn disagree by {diff:.2e}")
    return round(diff, 8)


def _fit(spec: ModelSpec, texts: Sequence[str], labels: npt.NDArray[np.int64]) -> Any:
    """Fit TF-IDF + logistic regression; the vocabulary is made convertible first."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    def pipeline(vocabulary: list[str] | None) -> Any:
        # sublinear_tf stays off: skl2onnx converts it differently from scikit-learn;
        # binary term frequencies convert exactly.
        vectorizer = TfidfVectorizer(
            analyzer="char",
            ngram_range=spec.ngram_range,
            lowercase=False,
            binary=spec.binary,
            min_df=spec.min_df,
            max_features=None if vocabulary else spec.max_features,
            vocabulary=vocabulary,
            dtype=np.float32,
        )
        classifier = LogisticRegression(
            C=spec.c, solver="liblinear", class_weight="balanced", max_iter=1000, random_state=0
        )
        return Pipeline([("tfidf", vectorizer), ("lr", classifier)])

    fitted = pipeline(None).fit(texts, labels)
    vocab = fitted.named_steps["tfidf"].vocabulary_
    # The ONNX graph counts an n-gram from its characters, so each character of a kept
    # n-gram must itself be in the vocabulary; max_features can cut a rare character while
    # keeping an n-gram that contains it (ties in frequency). Drop such n-grams and refit.
    convertible = sorted(g for g in vocab if all(c in vocab for c in g))
    if len(convertible) == len(vocab):
        return fitted
    return pipeline(convertible).fit(texts, labels)


def group_cv(spec: ModelSpec, data: Dataset, folds: int = 5) -> dict[str, Any]:
    """Grouped cross-validation on the training set: whole templates/files held out per fold.

    Measures how the recipe does on patterns it never saw, which fresh draws of known
    templates cannot show. Recorded in the manifest; not reproducible from the folder alone.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    texts = np.array([model_input(spec, e.text) for e in data.train], dtype=object)
    labels = np.array([e.label for e in data.train])
    groups = np.array([e.group for e in data.train])
    cut = min(s for s, d in spec.thresholds if d != "allow")
    aucs, recalls, fprs = [], [], []
    for train_idx, test_idx in GroupKFold(n_splits=folds).split(texts, labels, groups):
        model = _fit(spec, list(texts[train_idx]), labels[train_idx])
        scores = model.predict_proba(list(texts[test_idx]))[:, 1]
        y = labels[test_idx]
        aucs.append(float(roc_auc_score(y, scores)))
        recalls.append(float((scores[y == 1] >= cut).mean()))
        fprs.append(float((scores[y == 0] >= cut).mean()))
    return {
        "folds": folds,
        "grouped_by": "template or source file",
        "auc_mean": round(float(np.mean(aucs)), 4),
        "auc_min": round(float(np.min(aucs)), 4),
        f"recall_at_{cut}_mean": round(float(np.mean(recalls)), 4),
        f"fpr_at_{cut}_mean": round(float(np.mean(fprs)), 4),
    }


def _manifest(
    spec: ModelSpec, data: Dataset, model_bytes: bytes, eval_digests: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": spec.name,
        "version": spec.version,
        "task": spec.task,
        "description": spec.description,
        "input_kind": "text",
        "model_file": "model.onnx",
        "sha256": sha256_hex(model_bytes),
        "labels": ["benign", spec.positive_label],
        "activation": "none",
        "input_name": "text",
        "output_name": "probabilities",
        "normalise": [n.value for n in spec.normalise],
        "append_shape": spec.append_shape,
        "thresholds": {
            spec.positive_label: [{"min_score": s, "decision": d} for s, d in spec.thresholds]
        },
        "max_length": spec.max_length,
        "stride": spec.stride,
        "provenance": {
            "sources": list(data.sources),
            "train": {
                "examples": len(data.train),
                "positives": sum(e.label for e in data.train),
                "sha256": digest_examples(data.train),
            },
            "eval_sets": dict(eval_digests),
            "recipe": [
                f"normalise {[n.value for n in spec.normalise]}, append_shape "
                f"{spec.append_shape}; training texts cut to one {spec.max_length}-character "
                "window",
                f"TfidfVectorizer(analyzer='char', ngram_range={spec.ngram_range}, "
                f"binary={spec.binary}, min_df={spec.min_df}, max_features={spec.max_features})",
                f"LogisticRegression(C={spec.c}, solver='liblinear', class_weight='balanced')",
                "skl2onnx convert_sklearn, opsets {'': 17, 'ai.onnx.ml': 3}, zipmap off",
                *data.recipe,
            ],
            "licence": "Apache-2.0 (model); see sources for data licences",
        },
    }


def _write_eval_sets(folder: Path, evals: Mapping[str, Sequence[Example]]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, examples in sorted(evals.items()):
        lines = "".join(
            json.dumps({"text": e.text, "label": e.label, "group": e.group}, sort_keys=True) + "\n"
            for e in examples
        )
        # mtime=0 keeps the gzip bytes identical from build to build.
        with open(folder / f"{name}.jsonl.gz", "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
                handle.write(lines.encode("utf-8"))
        digests[name] = digest_examples(examples)
    return digests


def _write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / MANIFEST_FILE).write_text(text, encoding="utf-8")
