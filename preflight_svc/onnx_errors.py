"""Errors of the ONNX model layer, under the package's one base ``PreflightError``.

Suggested gRPC mapping for service.py (the one place that maps): ManifestError →
FAILED_PRECONDITION, UnknownModel → NOT_FOUND, ModelUnavailable → a ``deny`` result (not a
status), ModelOverloaded → RESOURCE_EXHAUSTED, InvalidThresholds → INVALID_ARGUMENT,
BatcherClosed → UNAVAILABLE, ModelInferenceError → a ``deny`` result with the error as reason.
"""

from __future__ import annotations

from preflight_svc.errors import PreflightError


class ModelError(PreflightError):
    """Base of every error raised by the ONNX model layer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ManifestError(ModelError):
    """A manifest that is missing, not JSON, or does not validate."""

    def remedy(self) -> str:
        """Explain how to fix a manifest."""
        return (
            "Fix manifest.json against MANIFEST_SCHEMA in preflight_svc/onnx_manifest.py, or "
            "rebuild the default models with `make models`."
        )


class UnknownModel(ModelError):
    """No model of that name is configured."""

    def remedy(self) -> str:
        """Explain how to name a model that exists."""
        return "Name a model listed by GetGovernance, or add its folder to preflight.model_dirs."


class ModelUnavailable(ModelError):
    """The model is configured but did not load; decisions that need it are deny."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason

    def remedy(self) -> str:
        """Explain how to bring a model back."""
        return "Rebuild the model folder (`make models`) or fix the reason given, then Reload."


class ModelOverloaded(ModelError):
    """The batch queue is full; the caller should back off and retry."""

    def remedy(self) -> str:
        """Explain what to do under back-pressure."""
        return "Retry later, or raise max_queue, or add preflight replicas."


class ModelInferenceError(ModelError):
    """onnxruntime failed while running a batch, or returned an unexpected shape."""


class InvalidThresholds(ModelError):
    """Threshold overrides name labels the model does not have, or hold bad values."""

    def remedy(self) -> str:
        """Explain the thresholds format."""
        return (
            'Give thresholds as {"label": [{"min_score": 0..1, "decision": '
            '"allow|warn|require_approval|deny"}]} for labels the model has.'
        )


class BatcherClosed(ModelError):
    """Work was submitted after shutdown began."""
