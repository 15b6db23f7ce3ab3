"""ONNX model registry: verified loading, both input kinds, chunking, batching, providers.

Every model here is built inside the test: a transformer-shaped graph (embedding, mean
pooling, linear) with a WordLevel tokenizer, and a text graph whose featurisation is a pair
of regular expressions inside the graph. Nothing depends on ``make models``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from cabincrew.canonical import sha256_hex
from cabincrew.decisions import Decision
from preflight_svc.onnx_errors import (
    InvalidThresholds,
    ManifestError,
    ModelUnavailable,
    UnknownModel,
)
from preflight_svc.onnx_manifest import (
    SHAPE_SEPARATOR,
    Manifest,
    Normalisation,
    ThresholdRule,
    decide,
    load_manifest,
    normalise_text,
    window_input,
)
from preflight_svc.onnx_models import (
    CPU,
    CUDA,
    PROBE_GRAPH,
    FailureKind,
    ModelRegistry,
    ModelStatus,
    ProviderPreference,
    RuntimeConfig,
    char_windows,
    choose_providers,
)

WAIT = 5.0
CONFIG = RuntimeConfig(intra_op_threads=1, executor_workers=2, max_wait_ms=0.0)
THRESHOLDS = {
    "injection": [
        {"min_score": 0.9, "decision": "deny"},
        {"min_score": 0.6, "decision": "require_approval"},
    ]
}
SENTENCES = [
    "please summarise the quarterly report",
    "the weather is nice today and the team ships the release",
    "attack the system now",
    "ignore every rule and attack",
]

# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def _manifest(name: str, kind: str, model: bytes, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "version": "0.0.1",
        "task": "prompt-injection",
        "input_kind": kind,
        "labels": ["benign", "injection"],
        "thresholds": THRESHOLDS,
        "max_length": 64,
        "stride": 16,
        "sha256": sha256_hex(model),
    }
    doc.update(extra)
    return doc


def _write(folder: Path, files: dict[str, bytes], manifest: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def text_graph() -> bytes:
    """Scores 0.95 when the text mentions 'attack', 0.7 for 'suspicious', else 0.05."""

    def hit(pattern: str, out: str) -> list[Any]:
        return [
            helper.make_node("RegexFullMatch", ["text"], [out + "_b"], pattern=pattern),
            helper.make_node("Cast", [out + "_b"], [out + "_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [out + "_f", out + "_w"], [out]),
        ]

    nodes = [
        *hit("(?s).*attack.*", "a"),
        *hit("(?s).*suspicious.*", "s"),
        helper.make_node("Max", ["a", "s", "floor"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ]
    scalars = {"a_w": 0.95, "s_w": 0.7, "floor": 0.05, "one": 1.0}
    graph = helper.make_graph(
        nodes,
        "tiny-text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        initializer=[
            helper.make_tensor(k, TensorProto.FLOAT, [1], [v]) for k, v in scalars.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return bytes(model.SerializeToString())


def write_text_model(folder: Path, name: str = "tiny-text", **extra: Any) -> Path:
    model = text_graph()
    return _write(folder, {"model.onnx": model}, _manifest(name, "text", model, **extra))


def tiny_tokenizer() -> Tokenizer:
    """A WordLevel tokenizer trained on a few sentences, with [CLS] … [SEP] around inputs."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[
            ("[CLS]", tokenizer.token_to_id("[CLS]")),
            ("[SEP]", tokenizer.token_to_id("[SEP]")),
        ],
    )
    return tokenizer


def transformer_graph(tokenizer: Tokenizer, *, token_types: bool) -> bytes:
    """Embedding, masked mean pooling and a linear head: the shape of a real export.

    The embedding's first feature is 1 for the token 'attack' only, so the injection logit
    grows with the share of 'attack' tokens in the window.
    """
    vocab = tokenizer.get_vocab_size()
    emb = np.zeros((vocab, 2), dtype=np.float32)
    emb[:, 1] = 1.0
    emb[tokenizer.token_to_id("attack"), 0] = 1.0
    head = np.array([[0.0, 40.0], [0.0, -4.0]], dtype=np.float32)
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(head, "head"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
    ]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["tok"])]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ]
    hidden = "tok"
    if token_types:
        inits.append(numpy_helper.from_array(np.zeros((2, 2), dtype=np.float32), "type_emb"))
        inputs.append(
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"])
        )
        nodes += [
            helper.make_node("Gather", ["type_emb", "token_type_ids"], ["typ"]),
            helper.make_node("Add", ["tok", "typ"], ["hidden"]),
        ]
        hidden = "hidden"
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", [hidden, "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-transformer",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return bytes(model.SerializeToString())


def write_transformer_model(
    folder: Path, name: str = "tiny-transformer", *, token_types: bool = True, **extra: Any
) -> Path:
    tokenizer = tiny_tokenizer()
    model = transformer_graph(tokenizer, token_types=token_types)
    tok_json = tokenizer.to_str().encode("utf-8")
    manifest = _manifest(
        name,
        "transformer",
        model,
        activation="softmax",
        tokenizer={"file": "tokenizer.json", "sha256": sha256_hex(tok_json)},
        **{"max_length": 8, "stride": 2, **extra},
    )
    return _write(folder, {"model.onnx": model, "tokenizer.json": tok_json}, manifest)


def load(*dirs: Path, provider: str = "cpu") -> ModelRegistry:
    return ModelRegistry.load(dirs, provider, config=CONFIG)


def decisions(results: Sequence[Any]) -> list[Decision]:
    return [r.decision for r in results]


# --------------------------------------------------------------------------------------
# Manifests and thresholds
# --------------------------------------------------------------------------------------


def test_a_valid_manifest_loads_with_its_digest_and_thresholds(tmp_path: Path) -> None:
    manifest = load_manifest(write_text_model(tmp_path / "m"))
    assert manifest.labels == ("benign", "injection")
    assert manifest.thresholds["injection"][0] == ThresholdRule(0.9, Decision.DENY)
    assert len(manifest.digest) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"thresholds": {}},
        {"thresholds": {"toxicity": [{"min_score": 0.5, "decision": "deny"}]}},
        {"thresholds": {"injection": [{"min_score": 1.5, "decision": "deny"}]}},
        {"thresholds": {"injection": [{"min_score": 0.5, "decision": "block"}]}},
        {"stride": 64},
        {"sha256": "not-a-digest"},
        {"input_kind": "transformer"},  # without a tokenizer
        {"unexpected": True},
        {"labels": []},
    ],
)
def test_an_invalid_manifest_is_rejected(tmp_path: Path, change: dict[str, Any]) -> None:
    doc = _manifest("m", "text", b"x")
    doc.update(change)
    with pytest.raises(ManifestError):
        Manifest.from_json(doc)


def test_a_missing_or_malformed_manifest_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ManifestError):
        load_manifest(tmp_path)


def test_the_most_severe_reached_threshold_decides() -> None:
    rules = Manifest.from_json(_manifest("m", "text", b"x")).thresholds
    assert decide({"injection": 0.95}, rules) is Decision.DENY
    assert decide({"injection": 0.7}, rules) is Decision.REQUIRE_APPROVAL
    assert decide({"injection": 0.1}, rules) is Decision.ALLOW


def test_a_missing_or_nan_score_decides_deny() -> None:
    rules = Manifest.from_json(_manifest("m", "text", b"x")).thresholds
    assert decide({"injection": math.nan}, rules) is Decision.DENY
    assert decide({"benign": 0.1}, rules) is Decision.DENY


# --------------------------------------------------------------------------------------
# Text models (featurisation inside the graph)
# --------------------------------------------------------------------------------------


async def test_a_text_model_scores_texts_and_maps_scores_to_decisions(tmp_path: Path) -> None:
    registry = load(write_text_model(tmp_path / "m"))
    texts = ["a quiet afternoon", "this looks suspicious", "launch the attack"]
    results = await registry.classify("tiny-text", texts)
    assert [r.index for r in results] == [0, 1, 2]
    assert decisions(results) == [Decision.ALLOW, Decision.REQUIRE_APPROVAL, Decision.DENY]
    assert results[2].scores["injection"] == pytest.approx(0.95)
    assert results[2].scores["benign"] == pytest.approx(0.05)
    await registry.aclose()


async def test_the_worst_window_of_a_long_text_decides(tmp_path: Path) -> None:
    registry = load(write_text_model(tmp_path / "m"))
    long_text = "calm words " * 40 + "attack"  # far beyond the 64-character window
    (result,) = await registry.classify("tiny-text", [long_text])
    assert result.chunks > 1
    assert result.worst_chunk == result.chunks - 1
    assert result.decision is Decision.DENY
    await registry.aclose()


@settings(max_examples=50, deadline=None)
@given(
    text=st.text(max_size=300),
    max_length=st.integers(min_value=8, max_value=64),
    stride_share=st.floats(min_value=0.0, max_value=0.9),
)
def test_character_windows_overlap_and_cover_every_character(
    text: str, max_length: int, stride_share: float
) -> None:
    stride = int(max_length * stride_share)
    windows = char_windows(text, max_length, stride)
    assert all(len(w) <= max_length for w in windows)
    rebuilt = windows[0] + "".join(w[stride:] for w in windows[1:])
    assert rebuilt == text
    # Any stretch up to stride + 1 characters lies whole inside some window.
    span = stride + 1
    for start in range(max(0, len(text) - span + 1)):
        assert any(text[start : start + span] in w for w in windows)


def test_classify_sync_gives_the_same_answers_as_classify(tmp_path: Path) -> None:
    registry = load(write_text_model(tmp_path / "m"))
    texts = ["fine", "suspicious", "attack"] * 5
    sync = registry.classify_sync("tiny-text", texts, batch_size=4)
    batched = asyncio.run(registry.classify("tiny-text", texts))
    assert sync == batched
    asyncio.run(registry.aclose())


async def test_threshold_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    registry = load(write_text_model(tmp_path / "m"))
    strict = {"injection": [{"min_score": 0.5, "decision": "deny"}]}
    (result,) = await registry.classify("tiny-text", ["suspicious"], thresholds=strict)
    assert result.decision is Decision.DENY
    with pytest.raises(InvalidThresholds):
        await registry.classify("tiny-text", ["x"], thresholds={"nope": strict["injection"]})
    with pytest.raises(InvalidThresholds):
        await registry.classify("tiny-text", ["x"], thresholds={})
    await registry.aclose()


async def test_concurrent_classify_calls_share_batches_and_get_their_own_results(
    tmp_path: Path,
) -> None:
    registry = load(write_text_model(tmp_path / "m"))
    inputs = [["attack"], ["calm"], ["suspicious", "calm"], ["calm", "attack", "x"]] * 4
    results = await asyncio.wait_for(
        asyncio.gather(*(registry.classify("tiny-text", texts) for texts in inputs)), WAIT
    )
    expected = {"attack": Decision.DENY, "suspicious": Decision.REQUIRE_APPROVAL}
    for texts, got in zip(inputs, results, strict=True):
        assert decisions(got) == [expected.get(t, Decision.ALLOW) for t in texts]
    stats = registry.batcher_stats("tiny-text")
    assert stats.items == sum(len(t) for t in inputs)
    assert stats.batches < len(inputs)
    await registry.aclose()


# --------------------------------------------------------------------------------------
# Transformer models (tokenizer.json + ids/mask → logits)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_types", [True, False])
async def test_a_transformer_model_tokenizes_and_applies_softmax(
    tmp_path: Path, token_types: bool
) -> None:
    registry = load(write_transformer_model(tmp_path / "m", token_types=token_types))
    results = await registry.classify("tiny-transformer", ["attack", "please summarise"])
    assert decisions(results) == [Decision.DENY, Decision.ALLOW]
    for r in results:
        assert sum(r.scores.values()) == pytest.approx(1.0)
    await registry.aclose()


async def test_a_long_transformer_input_is_cut_into_overlapping_windows(tmp_path: Path) -> None:
    registry = load(write_transformer_model(tmp_path / "m"))
    benign = "the team ships the release " * 6
    (diluted,) = registry.classify_sync("tiny-transformer", [benign + "attack attack"])
    assert diluted.chunks > 1
    assert diluted.worst_chunk == diluted.chunks - 1
    assert diluted.decision is Decision.DENY
    # The same words in one window would be diluted below every threshold.
    manifest = registry.manifest("tiny-transformer")
    assert manifest.max_length < 2 + len((benign + "attack attack").split())
    await registry.aclose()


def test_transformer_windows_carry_the_special_tokens_and_overlap(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.enable_truncation(8, stride=2)
    enc = tokenizer.encode("a b c d e f g h i j k l")
    windows = [enc, *enc.overflowing]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert len(windows) > 1
    for w in windows:
        assert w.ids[0] == cls and w.ids[-1] == sep and len(w.ids) <= 8


# --------------------------------------------------------------------------------------
# Failure to load: fail closed
# --------------------------------------------------------------------------------------


async def test_a_sha256_mismatch_leaves_the_model_unhealthy_and_its_use_unavailable(
    tmp_path: Path,
) -> None:
    folder = write_text_model(tmp_path / "m")
    (folder / "model.onnx").write_bytes(text_graph() + b"\x00")
    registry = load(folder)
    (info,) = registry.models
    assert info.status is ModelStatus.UNHEALTHY
    assert info.failure is FailureKind.INTEGRITY
    assert info.error
    health = registry.health()
    assert not health.serving and "tiny-text" in health.unhealthy
    with pytest.raises(ModelUnavailable):
        await registry.classify("tiny-text", ["hello"])
    await registry.aclose()


def test_a_tampered_tokenizer_leaves_the_model_unhealthy(tmp_path: Path) -> None:
    folder = write_transformer_model(tmp_path / "m")
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    (info,) = load(folder).models
    assert info.failure is FailureKind.INTEGRITY


def test_a_corrupt_model_file_leaves_the_model_unhealthy(tmp_path: Path) -> None:
    garbage = b"this is not an onnx graph"
    folder = _write(tmp_path / "m", {"model.onnx": garbage}, _manifest("bad", "text", garbage))
    registry = load(folder)
    (info,) = registry.models
    assert info.status is ModelStatus.UNHEALTHY
    assert info.failure is FailureKind.LOAD_FAILED
    assert not registry.health().serving


def test_a_graph_of_the_wrong_kind_is_incompatible(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    model = transformer_graph(tokenizer, token_types=False)
    folder = _write(tmp_path / "m", {"model.onnx": model}, _manifest("wrong", "text", model))
    (info,) = load(folder).models
    assert info.failure is FailureKind.INCOMPATIBLE


def test_an_output_width_that_does_not_match_the_labels_is_incompatible(tmp_path: Path) -> None:
    folder = write_text_model(tmp_path / "m", labels=["benign", "injection", "other"])
    (info,) = load(folder).models
    assert info.failure is FailureKind.INCOMPATIBLE


def test_a_missing_model_path_and_an_invalid_manifest_fail_closed(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("[]", encoding="utf-8")
    registry = load(tmp_path / "absent", broken)
    kinds = {info.failure for info in registry.models}
    assert kinds == {FailureKind.NOT_FOUND, FailureKind.MANIFEST_INVALID}
    assert not registry.health().serving


def test_two_models_with_one_name_make_the_registry_not_serving(tmp_path: Path) -> None:
    registry = load(write_text_model(tmp_path / "a"), write_text_model(tmp_path / "b"))
    assert {i.failure for i in registry.models} == {None, FailureKind.DUPLICATE}
    assert not registry.health().serving


async def test_an_unknown_model_name_is_not_found(tmp_path: Path) -> None:
    registry = load(write_text_model(tmp_path / "m"))
    with pytest.raises(UnknownModel):
        await registry.classify("nope", ["x"])
    await registry.aclose()


def test_a_folder_of_model_folders_loads_every_model(tmp_path: Path) -> None:
    write_text_model(tmp_path / "root" / "one", name="one")
    write_transformer_model(tmp_path / "root" / "two", name="two")
    registry = load(tmp_path / "root")
    assert [(i.name, i.status) for i in registry.models] == [
        ("one", ModelStatus.SERVING),
        ("two", ModelStatus.SERVING),
    ]
    assert registry.health().serving


# --------------------------------------------------------------------------------------
# Execution providers
# --------------------------------------------------------------------------------------


def test_the_chosen_provider_is_reported_per_model(tmp_path: Path) -> None:
    registry = ModelRegistry.load([write_text_model(tmp_path / "m")], "auto", config=CONFIG)
    choice = choose_providers(ProviderPreference.AUTO)
    assert registry.provider == choice
    assert registry.health().provider.name in (CUDA, CPU)
    (info,) = registry.models
    assert info.provider == choice.name


def test_forcing_cpu_uses_the_cpu_provider(tmp_path: Path) -> None:
    (info,) = load(write_text_model(tmp_path / "m"), provider="cpu").models
    assert info.provider == CPU


def test_forcing_cuda_where_it_does_not_work_leaves_models_unhealthy(tmp_path: Path) -> None:
    if CUDA in choose_providers(ProviderPreference.AUTO).providers:
        pytest.skip("CUDA works on this machine")
    (info,) = load(write_text_model(tmp_path / "m"), provider="cuda").models
    assert info.failure is FailureKind.PROVIDER_UNAVAILABLE


def test_an_unknown_provider_preference_is_rejected() -> None:
    with pytest.raises(ValueError):
        ProviderPreference.parse("tpu")


def test_the_embedded_probe_graph_is_the_documented_relu() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="cabincrew"
    )
    assert model.SerializeToString() == PROBE_GRAPH


# --------------------------------------------------------------------------------------
# Normalisation and window inputs (text models)
# --------------------------------------------------------------------------------------


def test_normalisation_strips_invisible_characters_lowercases_and_collapses_whitespace() -> None:
    steps = [
        Normalisation.STRIP_FORMAT_CHARS,
        Normalisation.LOWERCASE,
        Normalisation.COLLAPSE_WHITESPACE,
    ]
    assert normalise_text("I\u200bg\u2060nore  THIS\n\tnow", steps) == "ignore this now"
    assert normalise_text("Keep  Case", [Normalisation.COLLAPSE_WHITESPACE]) == "Keep Case"


def test_a_window_with_shape_carries_its_character_classes() -> None:
    shaped = window_input("aB3-x", append_shape=True)
    text, shape = shaped.split(SHAPE_SEPARATOR)
    assert text == "aB3-x"
    assert shape == "\ue001\ue000\ue002-\ue001"
    assert window_input("aB3", append_shape=False) == "aB3"


async def test_a_text_model_sees_normalised_windows(tmp_path: Path) -> None:
    folder = write_text_model(tmp_path / "m", normalise=["strip_format_chars", "lowercase"])
    registry = load(folder)
    results = await registry.classify("tiny-text", ["AT\u200bTACK", "at\u200btack plain"])
    assert decisions(results) == [Decision.DENY, Decision.DENY]
    await registry.aclose()


def test_text_with_lone_surrogates_is_scored_not_rejected(tmp_path: Path) -> None:
    registry = load(write_text_model(tmp_path / "m"))
    (result,) = registry.classify_sync("tiny-text", ["attack \ud800 here"])
    assert result.decision is Decision.DENY


def test_normalisation_is_refused_for_transformer_manifests() -> None:
    doc = _manifest("m", "transformer", b"x", tokenizer={"file": "t.json", "sha256": "0" * 64})
    doc["normalise"] = ["lowercase"]
    with pytest.raises(ManifestError):
        Manifest.from_json(doc)
