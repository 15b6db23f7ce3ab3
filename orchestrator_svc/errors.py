"""The orchestrator's one exception base and its subclasses.

``OrchestratorError`` derives from the kernel's ``CabinCrewError`` so that the service layer
maps every orchestrator failure to a gRPC status in the kernel's one mapping; the classes here
only choose the status code and say how a human fixes the cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from cabincrew.errors import CabinCrewError, InvalidArgument, Violation


class OrchestratorError(CabinCrewError):
    """Base of every error the orchestrator raises on purpose."""

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return "See the orchestrator logs and the workflow timeline for details."


@dataclass(frozen=True)
class Issue:
    """One problem in a workflow definition, located by file, line and field path."""

    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class WorkflowDefinitionError(OrchestratorError, InvalidArgument):
    """A workflow definition does not parse, validate or form a DAG; lists every issue."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = tuple(issues)
        text = "; ".join(str(issue) for issue in self.issues) or "invalid workflow"
        InvalidArgument.__init__(
            self,
            f"invalid workflow definition: {text}",
            [Violation(issue.path or "$", issue.message) for issue in self.issues],
        )

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return "Fix each listed line and field of the workflow file, then submit it again."


class UnsupportedStepError(WorkflowDefinitionError):
    """The workflow uses a reserved step kind (tool, llm) that cannot run yet."""

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return "Replace the reserved step kinds with engine or approval steps."


class InputsError(OrchestratorError, InvalidArgument):
    """Workflow inputs given at submission are missing, unknown or of the wrong shape."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        InvalidArgument.__init__(
            self,
            "invalid workflow inputs: " + "; ".join(self.problems),
            [Violation("inputs", problem) for problem in self.problems],
        )

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return "Pass every required input, and only inputs that the workflow declares."


class ExpressionError(OrchestratorError):
    """A template or ``when`` expression could not be evaluated against the run's values."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "Make sure the referenced input or step output exists (a step's outputs come from "
            "its receipt metrics and its 'outputs' evidence artifact) and has the expected type."
        )


@dataclass(frozen=True)
class DagProblem:
    """One problem in a step graph: the step, what is wrong, and the dependency involved."""

    step: str
    message: str
    dependency: str | None = None

    def __str__(self) -> str:
        return f"step {self.step!r}: {self.message}"


class DagError(OrchestratorError):
    """Step dependencies are unknown, duplicated or cyclic."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, problems: Sequence[DagProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(problem) for problem in self.problems))

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return "Give every step a unique id and make depends_on name existing steps, with no cycle."


class EngineLaunchError(OrchestratorError):
    """The runner was asked to launch an engine with settings it refuses (a caller bug)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "Check the engine command, the directories given to the runner and the secret "
            "names; secrets may not override PATH, HOME, LANG or CABINCREW_* variables."
        )


class ArtifactValidationError(OrchestratorError):
    """Artifacts written by an engine break the artifact contract; lists every problem."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid artifacts: " + "; ".join(self.problems))

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "Fix the engine so that it writes only <name>/artifact.json (and body.data) with "
            "safe names, no links, within the size limits, and declares each one exactly in "
            "its receipt."
        )


class ArtifactIntegrityError(OrchestratorError):
    """A stored or materialised artifact no longer has the hash that was recorded."""

    code = grpc.StatusCode.DATA_LOSS

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "The artifact store was modified or corrupted; the workflow must not take off. "
            "Investigate the store, then void the workflow and plan it again."
        )


class WorkspaceError(OrchestratorError):
    """A workspace could not be created, copied, hashed or removed."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "Check that the workspace source exists, holds no special files or links that "
            "leave it, and (for git) that the repository and ref exist."
        )


class ExpressionSyntaxError(ExpressionError):
    """A template or ``when`` expression is malformed or uses something the language forbids."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "Use only inputs.<name>, steps.<id>.outputs.<key>, steps.<id>.decision, string, "
            "number, true/false/null and list literals, ==, !=, in, not in, and, or, not and "
            "parentheses; templates hold one reference or one string literal between {{ }}."
        )
