"""The model builder: exported graphs load, score like the trained pipeline, and reproduce.

Needs the build-time packages (scikit-learn, skl2onnx); skipped where they are absent.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cabincrew.decisions import Decision
from models.corpus import is_heldout
from models.secrets_data import RULE_IDS, generate_example, generate_lookalike, generate_value
from models.sources import BASTIONCORPUS, SourceError, fetch
from models.train import Dataset, Example, ModelSpec, build_model
from preflight_svc.onnx_manifest import Normalisation, load_manifest
from preflight_svc.onnx_models import ModelRegistry, ModelStatus, RuntimeConfig

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

SPEC = ModelSpec(
    name="tiny-built",
    version="0.0.1",
    task="test",
    description="a tiny model for the builder's tests",
    positive_label="bad",
    thresholds=((0.9, "deny"), (0.5, "require_approval")),
    max_length=64,
    stride=16,
    normalise=(Normalisation.LOWERCASE, Normalisation.COLLAPSE_WHITESPACE),
    append_shape=True,
    ngram_range=(1, 3),
    min_df=1,
)


def tiny_dataset() -> Dataset:
    rng = random.Random(3)
    good = ["deploy the service", "run the tests", "write docs", "review 🤖 code", "fix typo"]
    bad = ["rm -rf /", "curl x | sh", "chmod 777 /", "drop table users", "eval(input())"]
    train = [Example(f"{rng.choice(good)} {i}", 0, f"g{i % 5}") for i in range(60)]
    train += [Example(f"{rng.choice(bad)}  #{i}", 1, f"b{i % 5}") for i in range(60)]
    held = [Example("please run the tests", 0, "h0"), Example("sudo rm -rf /", 1, "h1")]
    return Dataset(train=train, evals={"heldout": held}, sources=[{"kind": "test"}])


def test_a_built_model_loads_scores_like_its_pipeline_and_records_its_figures(
    tmp_path: Path,
) -> None:
    manifest, evaluation = build_model(SPEC, tiny_dataset(), tmp_path / "tiny-built")
    assert manifest["provenance"]["onnx_parity_max_abs_diff"] <= 1e-4
    assert manifest["metrics"]["heldout"]["texts"] == 2
    assert evaluation.sets[0].auc == 1.0
    assert load_manifest(tmp_path / "tiny-built").append_shape
    registry = ModelRegistry.load([tmp_path / "tiny-built"], "cpu", config=RuntimeConfig())
    (info,) = registry.models
    assert info.status is ModelStatus.SERVING
    bad, good = registry.classify_sync("tiny-built", ["RM -RF /", "write docs"])
    assert bad.scores["bad"] > good.scores["bad"]
    assert good.decision is Decision.ALLOW


def test_building_twice_gives_byte_identical_models(tmp_path: Path) -> None:
    first, _ = build_model(SPEC, tiny_dataset(), tmp_path / "a")
    second, _ = build_model(SPEC, tiny_dataset(), tmp_path / "b")
    assert first["sha256"] == second["sha256"]
    assert (tmp_path / "a" / "eval" / "heldout.jsonl.gz").read_bytes() == (
        tmp_path / "b" / "eval" / "heldout.jsonl.gz"
    ).read_bytes()


def test_every_secret_rule_generates_fresh_values_inside_a_line_of_code() -> None:
    rng = random.Random(0)
    for rule in RULE_IDS:
        values = {generate_value(rule, rng) for _ in range(5)}
        assert len(values) == 5
        assert generate_example(rule, rng).strip()
    assert generate_lookalike(rng)


def test_a_cached_wheel_whose_digest_differs_from_the_pin_is_refused(tmp_path: Path) -> None:
    (tmp_path / BASTIONCORPUS.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(SourceError):
        fetch(BASTIONCORPUS, tmp_path)


def test_the_held_out_split_depends_only_on_the_path_and_salt() -> None:
    picks = [is_heldout(f"file{i}.py", 0.2, "s") for i in range(200)]
    assert picks == [is_heldout(f"file{i}.py", 0.2, "s") for i in range(200)]
    assert 20 < sum(picks) < 60
