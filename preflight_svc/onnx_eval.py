"""Reproduce a model card's figures from the evaluation sets stored with a built model.

A built model folder keeps its held-out data under ``eval/<set>.jsonl.gz`` (one
``{"text", "label"}`` object per line, label 1 = the model's positive label). Evaluation runs
the served model itself, through ``ModelRegistry.classify_sync``, so the figures describe
exactly what the service does: normalisation, windowing and the ONNX graph included.
Only runtime dependencies (numpy, onnxruntime, tokenizers) are needed.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cabincrew.decisions import Decision
from preflight_svc.onnx_errors import ModelUnavailable
from preflight_svc.onnx_manifest import load_manifest
from preflight_svc.onnx_models import ModelRegistry, ModelStatus, RuntimeConfig, discover_model_dirs

EVAL_DIR = "eval"


@dataclass(frozen=True)
class ThresholdFigures:
    """Precision, recall and false-positive rate when scores at or above ``min_score`` flag."""

    min_score: float
    decision: str
    precision: float | None
    recall: float | None
    false_positive_rate: float | None


@dataclass(frozen=True)
class SetFigures:
    """Figures for one evaluation set."""

    name: str
    texts: int
    positives: int
    auc: float | None
    at: tuple[ThresholdFigures, ...]


@dataclass(frozen=True)
class ModelEvaluation:
    """Figures for every evaluation set of one model."""

    model: str
    version: str
    label: str
    sets: tuple[SetFigures, ...]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form (the shape stored in the manifest's ``metrics``)."""
        return {
            s.name: {
                "texts": s.texts,
                "positives": s.positives,
                "auc": s.auc,
                "at": [f.__dict__ for f in s.at],
            }
            for s in self.sets
        }


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (ties count half); None when a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return None
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _average_ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def figures_at(
    scores: Sequence[float], labels: Sequence[int], min_score: float, decision: str
) -> ThresholdFigures:
    """Precision, recall and FPR of flagging scores at or above ``min_score``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    flagged = s >= min_score
    tp = int((flagged & (y == 1)).sum())
    fp = int((flagged & (y == 0)).sum())
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    return ThresholdFigures(
        min_score=min_score,
        decision=decision,
        # Precision means nothing on a set without positives (e.g. real source files).
        precision=tp / (tp + fp) if tp + fp and pos else None,
        recall=tp / pos if pos else None,
        false_positive_rate=fp / neg if neg else None,
    )


def read_eval_set(path: Path) -> tuple[list[str], list[int]]:
    """Texts and labels of one ``.jsonl.gz`` evaluation set."""
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, labels


def evaluate_model_dir(folder: str | Path, *, batch_size: int = 64) -> ModelEvaluation:
    """Run a built model over its stored evaluation sets and compute its figures.

    Raises ``ManifestError`` or ``ModelUnavailable`` when the folder does not load.
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    registry = ModelRegistry.load([folder], "cpu", config=RuntimeConfig(executor_workers=1))
    (info,) = registry.models
    if info.status is not ModelStatus.SERVING:
        raise ModelUnavailable(info.name, info.error or "does not load")
    (label, rules), *_ = manifest.thresholds.items()
    cuts = sorted({(r.min_score, r.decision.value) for r in rules if r.decision != Decision.ALLOW})
    sets = []
    for path in sorted((folder / EVAL_DIR).glob("*.jsonl.gz")):
        texts, labels = read_eval_set(path)
        results = registry.classify_sync(manifest.name, texts, batch_size=batch_size)
        scores = [r.scores[label] for r in results]
        sets.append(
            SetFigures(
                name=path.name.removesuffix(".jsonl.gz"),
                texts=len(texts),
                positives=sum(labels),
                auc=roc_auc(scores, labels),
                at=tuple(figures_at(scores, labels, t, d) for t, d in cuts),
            )
        )
    return ModelEvaluation(manifest.name, manifest.version, label, tuple(sets))


def list_model_dirs(root: str | Path) -> list[Path]:
    """Model folders under ``root`` (for ``cabincrew models list``)."""
    return discover_model_dirs(root)


def format_evaluation(evaluation: ModelEvaluation) -> str:
    """A plain-text table of an evaluation, as the CLI prints it."""
    lines = [f"{evaluation.model} {evaluation.version} (positive label: {evaluation.label})"]
    for s in evaluation.sets:
        auc = "n/a" if s.auc is None else f"{s.auc:.4f}"
        lines.append(f"  {s.name}: {s.texts} texts, {s.positives} positive, AUC {auc}")
        for f in s.at:
            lines.append(
                f"    score >= {f.min_score:.2f} ({f.decision}): "
                f"precision {_fmt(f.precision)}  recall {_fmt(f.recall)}  "
                f"FPR {_fmt(f.false_positive_rate)}"
            )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
