"""ONNX classifiers for preflight: model folders, verified loading, chunking and micro-batching.

A model folder holds ``model.onnx`` and ``manifest.json`` (plus ``tokenizer.json`` for the
transformer kind). The manifest names the labels, how raw outputs become scores, and the
thresholds that turn scores into decisions. Every file is hashed before use and the bytes
that were hashed are the bytes that are loaded, so a file swapped after the check is never
run. A folder that fails any check stays in the registry as UNHEALTHY with its reason: the
service reports NOT_SERVING and every decision that needs the model is ``deny``.

Two input kinds:

- ``transformer``: a Hugging-Face-style export taking ``input_ids`` / ``attention_mask`` (and
  ``token_type_ids`` when the graph has it) and returning logits; the tokenizer is
  ``tokenizer.json`` read with the ``tokenizers`` package.
- ``text``: the featurisation is inside the ONNX graph, which takes a string tensor; the
  folder is self-contained (this is how the default models are built, see docs/models.md).

Long texts are cut into overlapping windows; the worst window decides for the text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from cabincrew.canonical import sha256_hex
from cabincrew.decisions import Decision
from preflight_svc.onnx_batching import BatcherStats, MicroBatcher
from preflight_svc.onnx_errors import (
    BatcherClosed,
    InvalidThresholds,
    ManifestError,
    ModelError,
    ModelInferenceError,
    ModelOverloaded,
    ModelUnavailable,
    UnknownModel,
)
from preflight_svc.onnx_manifest import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    Activation,
    InputKind,
    Manifest,
    ThresholdRule,
    Thresholds,
    decide,
    load_manifest,
    normalise_text,
    parse_thresholds,
    window_input,
)

__all__ = [
    "MANIFEST_SCHEMA",
    "BatcherClosed",
    "BatcherStats",
    "FailureKind",
    "InputKind",
    "InvalidThresholds",
    "Manifest",
    "ManifestError",
    "MicroBatcher",
    "ModelError",
    "ModelInferenceError",
    "ModelInfo",
    "ModelOverloaded",
    "ModelRegistry",
    "ModelStatus",
    "ModelUnavailable",
    "ProviderChoice",
    "ProviderPreference",
    "RegistryHealth",
    "RuntimeConfig",
    "TextScore",
    "ThresholdRule",
    "UnknownModel",
    "choose_providers",
    "decide",
    "discover_model_dirs",
    "load_manifest",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


class ProviderPreference(enum.Enum):
    """Which execution provider to use: CUDA when it really works (auto), or forced."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    @classmethod
    def parse(cls, value: str) -> ProviderPreference:
        """Parse a config string; unknown strings raise ``ValueError``."""
        try:
            return cls(value.lower())
        except ValueError:
            raise ValueError(f"unknown execution provider {value!r} (auto|cpu|cuda)") from None


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ProviderChoice:
    """The providers sessions are created with, and why."""

    providers: tuple[str, ...]
    reason: str

    @property
    def name(self) -> str:
        """The preferred provider of the choice."""
        return self.providers[0]


_probe_lock = threading.Lock()
_probed: ProviderChoice | None = None


def choose_providers(preference: ProviderPreference) -> ProviderChoice:
    """Decide the providers by creating a real session, once per process and preference.

    onnxruntime-gpu lists CUDA as available even where the CUDA libraries or the device are
    missing, so only a session that keeps CUDA after creation counts.
    """
    if preference is ProviderPreference.CPU:
        return ProviderChoice((CPU,), "forced by configuration")
    global _probed
    with _probe_lock:
        if _probed is None:
            _probed = _probe()
        return _probed


def _probe() -> ProviderChoice:
    if CUDA not in ort.get_available_providers():
        return ProviderChoice((CPU,), "CUDA provider not in this onnxruntime build")
    try:
        session = ort.InferenceSession(
            PROBE_GRAPH, sess_options=_session_options(1), providers=[CUDA, CPU]
        )
        kept = CUDA in session.get_providers()
    except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
        return ProviderChoice((CPU,), f"CUDA session failed: {exc}")
    if kept:
        return ProviderChoice((CUDA, CPU), "CUDA session created")
    return ProviderChoice((CPU,), "CUDA provider dropped at session creation (no device or libs)")


# The smallest useful probe: a Relu over a float vector, enough for CUDA to allocate and
# register kernels. Serialised once with onnx.helper (ir_version 8, opset 13) and kept as
# bytes because onnx is not a runtime dependency; a test rebuilds it and compares.
PROBE_GRAPH = (
    b'\x08\x08\x12\tcabincrew:3\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\r\n\x01x'
    b"\x12\x08\n\x06\x08\x01\x12\x02\n\x00b\r\n\x01y\x12\x08\n\x06\x08\x01\x12\x02\n\x00B\x04\n\x00\x10\r"
)


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return options


class _Runner(Protocol):
    def chunk(self, texts: Sequence[str]) -> list[list[Any]]: ...

    def infer(self, chunks: list[Any]) -> list[FloatArray]: ...


def char_windows(text: str, max_length: int, stride: int) -> list[str]:
    """Cut text into windows of ``max_length`` characters overlapping by ``stride``."""
    if len(text) <= max_length:
        return [text]
    step = max_length - stride
    windows = []
    start = 0
    while True:
        windows.append(text[start : start + max_length])
        if start + max_length >= len(text):
            return windows
        start += step


def _valid_utf8(text: str) -> str:
    # Lone surrogates cannot cross into onnxruntime (it takes UTF-8); replace, don't fail.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _activate(raw: npt.NDArray[Any], activation: Activation) -> FloatArray:
    values = raw.astype(np.float64)
    if activation is Activation.SOFTMAX:
        shifted = values - values.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)
    if activation is Activation.SIGMOID:
        return np.asarray(1.0 / (1.0 + np.exp(-values)), dtype=np.float64)
    return values


class _TextRunner:
    """A graph with the featurisation inside: one string tensor in, scores out."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest) -> None:
        inputs = session.get_inputs()
        name = manifest.input_name or (inputs[0].name if len(inputs) == 1 else None)
        chosen = [i for i in inputs if i.name == name]
        if len(inputs) != 1 or not chosen or chosen[0].type != "tensor(string)":
            raise ModelError(
                "a text model needs exactly one string tensor input, graph has "
                + ", ".join(f"{i.name}:{i.type}" for i in inputs)
            )
        self._input = chosen[0].name
        self._rank = len(chosen[0].shape)
        self._output = _output_name(session, manifest)
        self._session = session
        self._manifest = manifest

    def chunk(self, texts: Sequence[str]) -> list[list[Any]]:
        m = self._manifest
        return [
            [
                window_input(w, m.append_shape)
                for w in char_windows(
                    normalise_text(_valid_utf8(t), m.normalise), m.max_length, m.stride
                )
            ]
            for t in texts
        ]

    def infer(self, chunks: list[Any]) -> list[FloatArray]:
        batch = np.array(chunks, dtype=object)
        if self._rank == 2:
            batch = batch.reshape(-1, 1)
        (raw,) = self._session.run([self._output], {self._input: batch})
        return list(
            _check_shape(
                _activate(np.asarray(raw), self._manifest.activation), self._manifest, len(chunks)
            )
        )


@dataclass(frozen=True)
class _TokenChunk:
    ids: list[int]
    type_ids: list[int]


class _TransformerRunner:
    """A Hugging-Face-style export: token ids and attention mask in, logits out."""

    _INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}

    def __init__(
        self, session: ort.InferenceSession, manifest: Manifest, tokenizer: Tokenizer
    ) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(inputs)
        extra = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
        if missing or extra:
            raise ModelError(
                f"a transformer model takes input_ids, attention_mask[, token_type_ids]; "
                f"graph has {sorted(inputs)}"
            )
        bad = [n for n, i in inputs.items() if i.type not in self._INT_TYPES]
        if bad:
            raise ModelError(f"integer tensors expected for inputs {sorted(bad)}")
        self._dtypes = {n: self._INT_TYPES[i.type] for n, i in inputs.items()}
        self._output = _output_name(session, manifest)
        self._session = session
        self._manifest = manifest
        assert manifest.tokenizer is not None
        self._pad = manifest.tokenizer.pad_token_id
        # Truncation with a stride makes the tokenizer return the overlapping windows as
        # "overflowing" encodings, each with the special tokens added by its post-processor.
        tokenizer.no_padding()
        try:
            tokenizer.enable_truncation(manifest.max_length, stride=manifest.stride)
        except Exception as exc:  # tokenizers raises a bare Exception for bad settings
            raise ModelError(f"tokenizer rejects max_length/stride: {exc}") from None
        self._tokenizer = tokenizer

    def chunk(self, texts: Sequence[str]) -> list[list[Any]]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return [
            [_TokenChunk(list(e.ids), list(e.type_ids)) for e in _windows(enc)] for enc in encodings
        ]

    def infer(self, chunks: list[Any]) -> list[FloatArray]:
        width = max(len(c.ids) for c in chunks)
        n = len(chunks)
        ids = np.full((n, width), self._pad, dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for row, c in enumerate(chunks):
            ids[row, : len(c.ids)] = c.ids
            types[row, : len(c.type_ids)] = c.type_ids
            mask[row, : len(c.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {k: v.astype(self._dtypes[k]) for k, v in feed.items() if k in self._dtypes}
        (raw,) = self._session.run([self._output], feeds)
        return list(
            _check_shape(_activate(np.asarray(raw), self._manifest.activation), self._manifest, n)
        )


def _windows(encoding: Encoding) -> list[Encoding]:
    return [encoding, *encoding.overflowing]


def _output_name(session: ort.InferenceSession, manifest: Manifest) -> str:
    names = [o.name for o in session.get_outputs()]
    if manifest.output_name is not None:
        if manifest.output_name not in names:
            raise ModelError(f"output {manifest.output_name!r} not in graph outputs {names}")
        return manifest.output_name
    return str(names[0])


def _check_shape(scores: FloatArray, manifest: Manifest, rows: int) -> FloatArray:
    if scores.ndim != 2 or scores.shape != (rows, len(manifest.labels)):
        raise ModelInferenceError(
            f"model output shape {scores.shape} does not match "
            f"({rows}, {len(manifest.labels)} labels)"
        )
    return scores


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


class ModelStatus(enum.Enum):
    """Whether a configured model can serve."""

    SERVING = "serving"
    UNHEALTHY = "unhealthy"


class FailureKind(enum.Enum):
    """Why a configured model is unhealthy, for audit events and tests."""

    NOT_FOUND = "not_found"
    MANIFEST_INVALID = "manifest_invalid"
    INTEGRITY = "integrity"
    LOAD_FAILED = "load_failed"
    INCOMPATIBLE = "incompatible"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one configured model."""

    name: str
    path: str
    status: ModelStatus
    version: str = ""
    task: str = ""
    input_kind: str = ""
    sha256: str = ""
    manifest_digest: str = ""
    provider: str = ""
    labels: tuple[str, ...] = ()
    error: str | None = None
    failure: FailureKind | None = None


@dataclass(frozen=True)
class RegistryHealth:
    """SERVING only when every configured model loaded."""

    serving: bool
    provider: ProviderChoice
    unhealthy: Mapping[str, str]


@dataclass(frozen=True)
class TextScore:
    """Scores and decision for one input text; the worst window decides."""

    index: int
    scores: Mapping[str, float]
    decision: Decision
    chunks: int = 1
    worst_chunk: int = 0


@dataclass(frozen=True)
class RuntimeConfig:
    """How sessions and batching run (the provider is chosen by ``ModelRegistry.load``)."""

    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 65_536
    intra_op_threads: int = 0
    executor_workers: int = 4


class _LoadedModel:
    def __init__(self, manifest: Manifest, runner: _Runner, info: ModelInfo) -> None:
        self.manifest = manifest
        self.runner = runner
        self.info = info
        self.batcher: MicroBatcher[Any, FloatArray] | None = None


class ModelRegistry:
    """The configured models: loaded, verified, and ready to classify texts."""

    def __init__(
        self,
        loaded: Mapping[str, _LoadedModel],
        failed: Sequence[ModelInfo],
        config: RuntimeConfig,
        choice: ProviderChoice,
    ) -> None:
        self._loaded = dict(loaded)
        self._failed = {info.name: info for info in failed}
        self._config = config
        self._choice = choice
        self._executor = ThreadPoolExecutor(
            max_workers=config.executor_workers, thread_name_prefix="onnx"
        )
        self._closed = False

    @classmethod
    def load(
        cls,
        dirs: Iterable[str | Path],
        provider_pref: str | ProviderPreference = ProviderPreference.AUTO,
        *,
        config: RuntimeConfig | None = None,
    ) -> ModelRegistry:
        """Load every model folder under ``dirs``; failures are recorded, never raised.

        Each entry of ``dirs`` is a model folder (it has ``manifest.json``) or a folder of
        model folders.
        """
        config = config or RuntimeConfig()
        pref = (
            provider_pref
            if isinstance(provider_pref, ProviderPreference)
            else ProviderPreference.parse(provider_pref)
        )
        choice = choose_providers(pref)
        loaded: dict[str, _LoadedModel] = {}
        failed: list[ModelInfo] = []
        for folder in _expand(dirs, failed):
            result = _load_one(folder, pref, choice, config)
            if result.info.name in loaded or any(f.name == result.info.name for f in failed):
                failed.append(
                    ModelInfo(
                        name=f"{result.info.name}@{folder}",
                        path=str(folder),
                        status=ModelStatus.UNHEALTHY,
                        error=f"duplicate model name {result.info.name!r}",
                        failure=FailureKind.DUPLICATE,
                    )
                )
            elif isinstance(result, _LoadedModel):
                loaded[result.info.name] = result
            else:
                failed.append(result.info)
        for info in failed:
            log.error("model %s unhealthy: %s", info.name, info.error)
        return cls(loaded, failed, config, choice)

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        """Every configured model, healthy or not, sorted by name."""
        infos = [m.info for m in self._loaded.values()] + list(self._failed.values())
        return tuple(sorted(infos, key=lambda i: i.name))

    @property
    def provider(self) -> ProviderChoice:
        """The execution providers chosen at load."""
        return self._choice

    def health(self) -> RegistryHealth:
        """SERVING when every configured model loaded; otherwise the reasons."""
        unhealthy = {name: info.error or "unhealthy" for name, info in self._failed.items()}
        return RegistryHealth(serving=not unhealthy, provider=self._choice, unhealthy=unhealthy)

    def manifest(self, model_name: str) -> Manifest:
        """The manifest of a loaded model."""
        return self._get(model_name).manifest

    async def classify(
        self,
        model_name: str,
        texts: Sequence[str],
        *,
        thresholds: Mapping[str, Any] | None = None,
    ) -> list[TextScore]:
        """Score texts with a model through the micro-batcher; the worst window decides.

        Raises ``UnknownModel``, ``ModelUnavailable`` (decide deny), ``ModelOverloaded`` or
        ``ModelInferenceError``.
        """
        model = self._get(model_name)
        rules = self._rules(model, thresholds)
        if not texts:
            return []
        if model.manifest.input_kind is InputKind.TEXT:
            chunked = model.runner.chunk(texts)  # slicing strings: cheaper than a thread hop
        else:
            loop = asyncio.get_running_loop()
            chunked = await loop.run_in_executor(self._executor, model.runner.chunk, texts)
        flat = [c for chunks in chunked for c in chunks]
        scores = await self._batcher(model).submit(flat)
        return _score_texts(model.manifest, chunked, scores, rules)

    def classify_sync(
        self,
        model_name: str,
        texts: Sequence[str],
        *,
        thresholds: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> list[TextScore]:
        """Score texts in the calling thread, in batches of ``batch_size`` (benches, CLI)."""
        model = self._get(model_name)
        rules = self._rules(model, thresholds)
        size = batch_size or self._config.max_batch
        chunked = model.runner.chunk(texts)
        flat = [c for chunks in chunked for c in chunks]
        scores: list[FloatArray] = []
        for start in range(0, len(flat), size):
            try:
                scores.extend(model.runner.infer(flat[start : start + size]))
            except ModelError:
                raise
            except Exception as exc:
                raise ModelInferenceError(str(exc)) from None
        return _score_texts(model.manifest, chunked, scores, rules)

    def batcher_stats(self, model_name: str) -> BatcherStats:
        """Batching counters of a loaded model."""
        batcher = self._get(model_name).batcher
        return batcher.stats if batcher is not None else BatcherStats(0, 0, 0)

    async def aclose(self) -> None:
        """Drain the batchers and stop the worker threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for model in self._loaded.values():
            if model.batcher is not None:
                await model.batcher.aclose()
        self._executor.shutdown(wait=True)

    def _get(self, name: str) -> _LoadedModel:
        if self._closed:
            raise BatcherClosed("the model registry is closed")
        model = self._loaded.get(name)
        if model is not None:
            return model
        failed = self._failed.get(name)
        if failed is not None:
            raise ModelUnavailable(name, failed.error or "unhealthy")
        raise UnknownModel(f"no model named {name!r}")

    def _rules(self, model: _LoadedModel, overrides: Mapping[str, Any] | None) -> Thresholds:
        if overrides is None:
            return model.manifest.thresholds
        return parse_thresholds(overrides, model.manifest.labels)

    def _batcher(self, model: _LoadedModel) -> MicroBatcher[Any, FloatArray]:
        if model.batcher is None:
            model.batcher = MicroBatcher(
                model.runner.infer,
                max_batch_size=self._config.max_batch,
                max_wait_s=self._config.max_wait_ms / 1000.0,
                max_queue=self._config.max_queue,
                executor=self._executor,
            )
        return model.batcher


def _score_texts(
    manifest: Manifest,
    chunked: Sequence[Sequence[Any]],
    scores: Sequence[FloatArray],
    rules: Thresholds,
) -> list[TextScore]:
    results: list[TextScore] = []
    offset = 0
    for index, chunks in enumerate(chunked):
        best: tuple[int, float] | None = None
        best_at = 0
        best_scores: dict[str, float] = {}
        for k in range(len(chunks)):
            row = {
                label: float(v)
                for label, v in zip(manifest.labels, scores[offset + k], strict=True)
            }
            decision = decide(row, rules)
            # Worst window: most severe decision, then highest score on a thresholded label.
            key = (decision.severity, max(_finite(row.get(label)) for label in rules))
            if best is None or key > best:
                best, best_at, best_scores = key, k, row
        offset += len(chunks)
        results.append(
            TextScore(
                index=index,
                scores=best_scores,
                decision=decide(best_scores, rules),
                chunks=len(chunks),
                worst_chunk=best_at,
            )
        )
    return results


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def discover_model_dirs(root: str | Path) -> list[Path]:
    """Model folders directly under ``root`` (those holding ``manifest.json``), sorted."""
    base = Path(root)
    return sorted(p for p in base.iterdir() if (p / MANIFEST_FILE).is_file())


def _expand(dirs: Iterable[str | Path], failed: list[ModelInfo]) -> list[Path]:
    folders: list[Path] = []
    for entry in dirs:
        path = Path(entry)
        if (path / MANIFEST_FILE).is_file():
            folders.append(path)
        elif path.is_dir() and (found := discover_model_dirs(path)):
            folders.extend(found)
        else:
            # A configured location without models fails closed rather than vanishing.
            failed.append(
                ModelInfo(
                    name=str(path),
                    path=str(path),
                    status=ModelStatus.UNHEALTHY,
                    error="no model folder (manifest.json) at this path",
                    failure=FailureKind.NOT_FOUND,
                )
            )
    return folders


@dataclass(frozen=True)
class _Failed:
    info: ModelInfo


class _LoadFailure(Exception):
    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _load_one(
    folder: Path, pref: ProviderPreference, choice: ProviderChoice, config: RuntimeConfig
) -> _LoadedModel | _Failed:
    try:
        manifest = load_manifest(folder)
    except ManifestError as exc:
        return _Failed(
            ModelInfo(
                name=folder.name,
                path=str(folder),
                status=ModelStatus.UNHEALTHY,
                error=exc.message,
                failure=FailureKind.MANIFEST_INVALID,
            )
        )
    base = ModelInfo(
        name=manifest.name,
        path=str(folder),
        status=ModelStatus.UNHEALTHY,
        version=manifest.version,
        task=manifest.task,
        input_kind=manifest.input_kind.value,
        sha256=manifest.sha256,
        manifest_digest=manifest.digest,
        labels=manifest.labels,
    )
    try:
        loaded = _open(folder, manifest, pref, choice, config)
    except _LoadFailure as exc:
        return _Failed(dataclasses.replace(base, error=exc.message, failure=exc.kind))
    session, runner = loaded
    provider = session.get_providers()[0]
    info = dataclasses.replace(base, status=ModelStatus.SERVING, provider=provider)
    log.info("model %s %s loaded on %s", manifest.name, manifest.version, provider)
    return _LoadedModel(manifest, runner, info)


def _open(
    folder: Path,
    manifest: Manifest,
    pref: ProviderPreference,
    choice: ProviderChoice,
    config: RuntimeConfig,
) -> tuple[ort.InferenceSession, _Runner]:
    if pref is ProviderPreference.CUDA and CUDA not in choice.providers:
        raise _LoadFailure(
            FailureKind.PROVIDER_UNAVAILABLE,
            f"CUDA was required but is not usable: {choice.reason}",
        )
    model_bytes = _read_verified(folder / manifest.model_file, manifest.sha256)
    tokenizer = None
    if manifest.input_kind is InputKind.TRANSFORMER:
        assert manifest.tokenizer is not None  # the schema requires it for this kind
        raw = _read_verified(folder / manifest.tokenizer.file, manifest.tokenizer.sha256)
        try:
            tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises bare Exception
            raise _LoadFailure(FailureKind.LOAD_FAILED, f"tokenizer does not load: {exc}") from None
    try:
        session = ort.InferenceSession(
            model_bytes,
            sess_options=_session_options(config.intra_op_threads),
            providers=list(choice.providers),
        )
    except Exception as exc:  # onnxruntime's errors share no useful base
        raise _LoadFailure(
            FailureKind.LOAD_FAILED, f"onnxruntime cannot load {manifest.model_file}: {exc}"
        ) from None
    runner: _Runner
    try:
        if tokenizer is not None:
            runner = _TransformerRunner(session, manifest, tokenizer)
        else:
            runner = _TextRunner(session, manifest)
    except ModelError as exc:
        raise _LoadFailure(FailureKind.INCOMPATIBLE, exc.message) from None
    # A warm-up run finds graphs that load but cannot execute, before traffic does.
    try:
        runner.infer([c for chunks in runner.chunk(["warm-up"]) for c in chunks])
    except ModelError as exc:
        raise _LoadFailure(FailureKind.INCOMPATIBLE, exc.message) from None
    except Exception as exc:
        raise _LoadFailure(FailureKind.LOAD_FAILED, f"warm-up inference failed: {exc}") from None
    return session, runner


def _read_verified(path: Path, expected: str) -> bytes:
    # Hash the bytes that will be loaded, not the file: a swap after the check cannot run.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _LoadFailure(
            FailureKind.NOT_FOUND, f"cannot read {path.name}: {exc.strerror or exc}"
        ) from None
    actual = sha256_hex(data)
    if actual != expected:
        raise _LoadFailure(
            FailureKind.INTEGRITY,
            f"sha256 mismatch for {path.name}: manifest says {expected}, file is {actual}",
        )
    return data
