"""Model-card figures: AUC and threshold figures, computed from a model folder's eval sets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from preflight_svc.onnx_errors import ModelUnavailable
from preflight_svc.onnx_eval import (
    EVAL_DIR,
    evaluate_model_dir,
    figures_at,
    format_evaluation,
    list_model_dirs,
    roc_auc,
)
from tests.preflight.test_onnx_models import write_text_model


def test_auc_is_one_for_a_perfect_ranking_zero_for_an_inverted_one_and_half_for_ties() -> None:
    labels = [0, 0, 1, 1]
    assert roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    assert roc_auc([0.1, 0.4, 0.35, 0.8], labels) == 0.75


def test_auc_is_undefined_without_both_classes() -> None:
    assert roc_auc([0.1, 0.9], [1, 1]) is None


def test_threshold_figures_count_flags_at_or_above_the_score() -> None:
    f = figures_at([0.2, 0.6, 0.6, 0.9], [0, 0, 1, 1], 0.6, "deny")
    assert (f.precision, f.recall, f.false_positive_rate) == (2 / 3, 1.0, 0.5)


def _eval_set(folder: Path, name: str, rows: list[tuple[str, int]]) -> None:
    (folder / EVAL_DIR).mkdir(exist_ok=True)
    with gzip.open(folder / EVAL_DIR / f"{name}.jsonl.gz", "wt", encoding="utf-8") as handle:
        for text, label in rows:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")


def test_a_model_folder_is_evaluated_through_the_served_model(tmp_path: Path) -> None:
    folder = write_text_model(tmp_path / "models" / "m")
    _eval_set(folder, "heldout", [("attack now", 1), ("suspicious", 1), ("calm", 0), ("ok", 0)])
    evaluation = evaluate_model_dir(folder)
    (figures,) = evaluation.sets
    assert figures.name == "heldout" and figures.auc == 1.0
    by_decision = {f.decision: f for f in figures.at}
    assert by_decision["deny"].recall == 0.5
    assert by_decision["require_approval"].recall == 1.0
    assert "heldout" in format_evaluation(evaluation)
    assert evaluation.as_dict()["heldout"]["positives"] == 2  # type: ignore[index]
    assert list_model_dirs(tmp_path / "models") == [folder]


def test_evaluating_a_folder_that_does_not_load_is_an_error(tmp_path: Path) -> None:
    folder = write_text_model(tmp_path / "m")
    (folder / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelUnavailable):
        evaluate_model_dir(folder)
