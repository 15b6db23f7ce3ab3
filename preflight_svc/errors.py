"""Errors of the preflight service's domain code.

One base per package (``PreflightError``); each error can explain its remedy to a human, so
that the CLI and the service logs say what to fix, not only what went wrong. The gRPC layer
maps these to status codes in exactly one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PreflightError(Exception):
    """Base of every error raised by the preflight service's domain code."""

    def remedy(self) -> str:
        """Explain to a human how to fix the cause of this error."""
        return "See the preflight service logs for details and check its configuration."


class PolicyLoadError(PreflightError):
    """A policy bundle cannot be loaded, so no decision can be made with it."""

    def remedy(self) -> str:
        """Explain how to fix a bundle that does not load."""
        return (
            "Fix the policy bundle and reload it. Run `cabincrew policy test DIR` to see the "
            "problem and to check the bundle's own tests before deploying it."
        )


class PolicySyntaxError(PolicyLoadError):
    """A Rego file does not parse or compile."""

    def __init__(self, path: str, line: int, column: int, message: str) -> None:
        self.path = path
        self.line = line
        self.column = column
        self.message = message
        super().__init__(f"{path}:{line}:{column}: {message}")

    def remedy(self) -> str:
        """Explain how to fix a file that does not compile."""
        return (
            f"Correct the Rego in {self.path} near line {self.line}. Policies use Rego v1 "
            "syntax (`if` before rule bodies, `contains` for partial sets)."
        )


@dataclass(frozen=True)
class BuiltinViolation:
    """One use of a refused construct in a policy file."""

    path: str
    line: int
    column: int
    builtin: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.builtin}"


class ForbiddenBuiltinError(PolicyLoadError):
    """A policy calls a builtin that breaks determinism or reaches outside the process."""

    def __init__(self, violations: Sequence[BuiltinViolation]) -> None:
        self.violations = tuple(violations)
        listed = "; ".join(str(v) for v in self.violations)
        super().__init__(f"forbidden builtin(s) used: {listed}")

    def remedy(self) -> str:
        """Explain why these builtins are refused and what to do instead."""
        return (
            "Preflight decisions must be deterministic and side-effect free, so policies may "
            "not call http.send, net.*, time.now_ns, rand.*, uuid.rfc4122, opa.runtime or "
            "clock-dependent verification builtins. Pass what the policy needs through the "
            "input document or data.json instead, and remove the listed calls."
        )


class UnsupportedConstructError(PolicyLoadError):
    """A policy uses a construct that the embedded Rego engine cannot run safely."""

    def __init__(self, violations: Sequence[BuiltinViolation], why: str) -> None:
        self.violations = tuple(violations)
        self.why = why
        listed = "; ".join(str(v) for v in self.violations)
        super().__init__(f"unsupported construct(s): {listed} ({why})")

    def remedy(self) -> str:
        """Explain how to rewrite the refused construct."""
        return (
            "Replace `with input as {...}` by one `with input.<field> as <value>` per field "
            'the rule reads (for example `with input.context.environment as "production"`), '
            "and give functions that take different numbers of arguments different names: "
            "the embedded Rego engine (rego-cpp 1.5.2) crashes on both. docs/policy-input.md "
            "lists the engine's known defects."
        )


class EmptyPolicySetError(PolicyLoadError):
    """A bundle has no policy for a domain that must be governed; that is never allow."""

    def __init__(self, bundle: str, missing: Sequence[str]) -> None:
        self.bundle = bundle
        self.missing = tuple(missing)
        super().__init__(f"policy bundle {bundle} has no package for: {', '.join(self.missing)}")

    def remedy(self) -> str:
        """Explain how to give each governed domain at least one policy."""
        prefixes = ", ".join(f"cabincrew.{d}.*" for d in self.missing)
        return (
            f"Add at least one Rego package under {prefixes} that defines `decision` "
            "(an empty policy set would otherwise allow everything), or point the service "
            "at the default bundle in policies/."
        )


class PolicyDataError(PolicyLoadError):
    """A data.json file in a bundle is not valid or conflicts with another one."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")

    def remedy(self) -> str:
        """Explain how to fix a bad data.json."""
        return (
            f"Make {self.path} a JSON object; data.json files are merged at the path of their "
            "folder, so two of them must not set the same key."
        )


@dataclass(frozen=True)
class InputViolation:
    """One way in which a policy input document breaks its schema."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.message}"


class PolicyInputError(PreflightError):
    """A policy input document does not match policy_input.schema.json."""

    def __init__(self, violations: Sequence[InputViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("invalid policy input: " + "; ".join(str(v) for v in self.violations))

    def remedy(self) -> str:
        """Explain where the input document format is described."""
        return (
            "Build the input with preflight_svc.policy_input (build_preflight_input or "
            "build_content_input), or fix the listed fields; docs/policy-input.md describes "
            "every field."
        )
