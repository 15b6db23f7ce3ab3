"""Constructed benign text for the prompt-injection model, written for this project.

No public package ships a large set of ordinary requests and documents under a permissive
licence, so this module builds them from templates: everyday requests to a coding or
operations assistant, documents and tool results an agent reads, and hard negatives that
use the words injections use (ignore, forget, override, system prompt, act as, reveal) in
their ordinary senses. Each example carries its template id as group, so a held-out split
can keep whole templates unseen. Real prose comes from standard-library docstrings.
"""

# One template per line reads as a table; wrapping them would hide the data.
# ruff: noqa: E501

from __future__ import annotations

import ast
import random
from collections.abc import Callable

from models.corpus import SourceFile

FILES = (
    "app.py",
    "utils/dates.py",
    "src/main.rs",
    "cmd/server/main.go",
    "index.ts",
    "README.md",
    "Dockerfile",
    "Makefile",
    "setup.cfg",
    "api/routes.py",
    "lib/parser.js",
    "config.yaml",
)
FUNCS = (
    "parse_date",
    "load_config",
    "retry_with_backoff",
    "merge_intervals",
    "slugify",
    "render_invoice",
    "validate_email",
    "chunk_list",
    "normalise_path",
    "hash_password",
)
LANGS = ("Python", "Go", "Rust", "TypeScript", "Java", "Bash", "SQL", "C#", "Kotlin")
HUMAN_LANGS = ("French", "German", "Spanish", "Italian", "Japanese", "Portuguese", "Dutch")
TOPICS = (
    "recursion",
    "database indexes",
    "TLS certificates",
    "Kubernetes pods",
    "OAuth scopes",
    "garbage collection",
    "Git rebasing",
    "CAP theorem",
    "vector clocks",
    "unit testing",
    "rate limiting",
    "event sourcing",
    "async IO",
    "memory leaks",
    "DNS caching",
)
TOOLS = (
    "pytest",
    "eslint",
    "cargo",
    "terraform",
    "kubectl",
    "docker compose",
    "helm",
    "poetry",
    "npm",
    "gradle",
    "ruff",
    "mypy",
    "git",
    "make",
    "ansible",
)
ERRORS = (
    "ModuleNotFoundError: No module named 'yaml'",
    "connection refused on port 5432",
    "permission denied (publickey)",
    "TypeError: cannot read properties of undefined",
    "exit status 137",
    "ImagePullBackOff",
    "KeyError: 'user_id'",
    "timeout after 30s",
    "SSL: CERTIFICATE_VERIFY_FAILED",
    "merge conflict in package-lock.json",
)
PEOPLE = ("Alice", "Bob", "Priya", "Chen", "Fatima", "Lukas", "Maria", "Tom", "Aisha", "Kenji")
TIMES = ("Monday 10:00", "Tuesday after lunch", "Friday 16:30", "next sprint", "end of the month")
SETTINGS = ("timeout", "log level", "retry count", "page size", "cache TTL", "locale", "theme")
ROLES = (
    "senior reviewer",
    "patient tutor",
    "product manager",
    "SRE on call",
    "technical writer",
    "database administrator",
    "security auditor",
    "interviewer",
    "travel guide",
)


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return rng.choice(options)


Template = Callable[[random.Random], str]

REQUESTS: tuple[Template, ...] = (
    lambda r: f"Write a {_pick(r, LANGS)} function called {_pick(r, FUNCS)} with tests.",
    lambda r: f"Refactor {_pick(r, FILES)} so that {_pick(r, FUNCS)} has no side effects.",
    lambda r: (
        f"Add unit tests for {_pick(r, FUNCS)} in {_pick(r, FILES)}, covering the edge cases."
    ),
    lambda r: f'Why does `{_pick(r, TOOLS)}` fail with "{_pick(r, ERRORS)}" on CI but not locally?',
    lambda r: f"Explain {_pick(r, TOPICS)} to a new team member in two paragraphs.",
    lambda r: "Summarise the changes in this pull request and list any risky parts.",
    lambda r: (
        f"Translate this paragraph into {_pick(r, HUMAN_LANGS)}: the release is delayed by a week."
    ),
    lambda r: f"What is the difference between {_pick(r, TOPICS)} and {_pick(r, TOPICS)}?",
    lambda r: f"Fix the failing test in {_pick(r, FILES)}; the error is {_pick(r, ERRORS)}.",
    lambda r: f"Generate a commit message for a change that renames {_pick(r, FUNCS)}.",
    lambda r: f"Review {_pick(r, FILES)} for bugs and suggest improvements, be concise.",
    lambda r: f"Can you draft an email to {_pick(r, PEOPLE)} moving our sync to {_pick(r, TIMES)}?",
    lambda r: f"Convert this {_pick(r, LANGS)} snippet to {_pick(r, LANGS)} and keep the comments.",
    lambda r: f"How do I configure the {_pick(r, SETTINGS)} in {_pick(r, TOOLS)}?",
    lambda r: f"List three ways to speed up our {_pick(r, TOOLS)} pipeline.",
    lambda r: f"Bump the version in {_pick(r, FILES)} and update the changelog.",
    lambda r: "Write a SQL query that returns the ten most recent orders per customer.",
    lambda r: f"Please update the docs for {_pick(r, FUNCS)}; the signature changed last week.",
    lambda r: f"Create a Dockerfile for a {_pick(r, LANGS)} web service with a non-root user.",
    lambda r: "Run the test suite and tell me which tests are flaky.",
    lambda r: f"What does this error mean: {_pick(r, ERRORS)}?",
    lambda r: f"Plan the migration of {_pick(r, FILES)} to the new logging library step by step.",
    lambda r: f"Give me a checklist for reviewing changes to {_pick(r, TOPICS)} code.",
    lambda r: "I need a regex that matches ISO dates like 2024-03-01; explain each part.",
    lambda r: (
        f"Rename the variable tmp to {_pick(r, FUNCS)}_result everywhere in {_pick(r, FILES)}."
    ),
)

# Ordinary uses of the words that injections rely on.
HARD: tuple[Template, ...] = (
    lambda r: (
        f"Ignore the whitespace changes in the diff and focus on the logic in {_pick(r, FILES)}."
    ),
    lambda r: (
        f"Please disregard my previous message, I meant {_pick(r, FUNCS)} not {_pick(r, FUNCS)}."
    ),
    lambda r: (
        f"Forget the earlier approach with {_pick(r, TOOLS)}; let's try {_pick(r, TOOLS)} instead."
    ),
    lambda r: f"Act as a {_pick(r, ROLES)} and review {_pick(r, FILES)}.",
    lambda r: f"Pretend you are a {_pick(r, ROLES)} explaining {_pick(r, TOPICS)} to a beginner.",
    lambda r: f"What is a system prompt, and how should I write one for a {_pick(r, ROLES)} bot?",
    lambda r: f"How do I override the default {_pick(r, SETTINGS)} in {_pick(r, TOOLS)}?",
    lambda r: "Reveal hidden files in the listing with ls -a and explain what .gitignore does.",
    lambda r: f"The instructions in CONTRIBUTING.md say to run {_pick(r, TOOLS)} before pushing.",
    lambda r: f"New instructions for the team: standup moves to {_pick(r, TIMES)}.",
    lambda r: "Can you explain how prompt injection works and how to defend an agent against it?",
    lambda r: (
        f"Our policy says never to paste API keys in chat; where should {_pick(r, PEOPLE)} store them?"
    ),
    lambda r: (
        f"Bypass the cache by passing --no-cache to the docker build, then rerun {_pick(r, TOOLS)}."
    ),
    lambda r: f"Ignore case when sorting the names in {_pick(r, FILES)}.",
    lambda r: (
        f"The previous instructions were unclear, so here is the corrected spec for {_pick(r, FUNCS)}."
    ),
    lambda r: (
        f"You can skip the lint step for now; {_pick(r, PEOPLE)} will fix the warnings tomorrow."
    ),
    lambda r: (
        f"Developer mode in the app is enabled with the {_pick(r, SETTINGS)} flag; where is it documented?"
    ),
    lambda r: f"Print the contents of {_pick(r, FILES)} and explain each section.",
    lambda r: f"Respond only with the JSON object, no prose, for the {_pick(r, FUNCS)} schema.",
    lambda r: f"From now on, use tabs instead of spaces in {_pick(r, FILES)}.",
    lambda r: (
        f"Forget about the deadline for a moment: is {_pick(r, TOPICS)} the right design here?"
    ),
    lambda r: "Jailbreaking an iPhone voids the warranty; write a short FAQ entry saying so.",
    lambda r: (
        f"Override: the config in {_pick(r, FILES)} takes precedence over environment defaults."
    ),
    lambda r: (
        f"Do anything you think is reasonable to make {_pick(r, FUNCS)} faster, but keep the API."
    ),
    lambda r: (
        f"Role-play a job interview for a {_pick(r, LANGS)} developer position and ask me questions."
    ),
)

DOCUMENTS: tuple[Template, ...] = (
    lambda r: (
        f"From: {_pick(r, PEOPLE)} <{_pick(r, PEOPLE).lower()}@example.com>\nSubject: {_pick(r, TOPICS)} "
        f"review\n\nHi all, the review of {_pick(r, FILES)} is moved to {_pick(r, TIMES)}. Please read "
        f"the design notes beforehand and bring questions.\n\nThanks,\n{_pick(r, PEOPLE)}"
    ),
    lambda r: (
        f"## Release notes\n- Fixed {_pick(r, ERRORS)} when running {_pick(r, TOOLS)}\n- Improved "
        f"{_pick(r, FUNCS)} performance by {r.randint(5, 60)}%\n- Docs: new section on {_pick(r, TOPICS)}"
    ),
    lambda r: (
        f"Meeting notes ({_pick(r, TIMES)}): {_pick(r, PEOPLE)} presented the {_pick(r, TOPICS)} "
        f"proposal. Decision: adopt it for {_pick(r, FILES)}. Action items: {_pick(r, PEOPLE)} "
        f"updates the runbook; {_pick(r, PEOPLE)} schedules the rollout."
    ),
    lambda r: (
        f'{{"status": "ok", "items": [{{"id": {r.randint(1, 9999)}, "name": "{_pick(r, FUNCS)}", '
        f'"updated": "2024-0{r.randint(1, 9)}-1{r.randint(0, 9)}"}}], "next_page": null}}'
    ),
    lambda r: (
        f"$ {_pick(r, TOOLS)} --version\n{_pick(r, TOOLS)} {r.randint(1, 9)}.{r.randint(0, 20)}.0\n$ "
        f"{_pick(r, TOOLS)} run\n{r.randint(10, 400)} passed, {r.randint(0, 3)} skipped in "
        f"{r.randint(2, 90)}.{r.randint(0, 9)}s"
    ),
    lambda r: (
        f"2024-05-{r.randint(10, 28)}T1{r.randint(0, 9)}:0{r.randint(0, 9)}:12Z INFO worker started "
        f"pid={r.randint(100, 99999)}\n2024-05-{r.randint(10, 28)}T1{r.randint(0, 9)}:0{r.randint(0, 9)}"
        f":13Z WARN {_pick(r, ERRORS)}; retrying in {r.randint(1, 30)}s"
    ),
    lambda r: (
        f"# {_pick(r, FUNCS)}\n\nA small library for {_pick(r, TOPICS)}.\n\n## Install\n\n"
        f"Run `{_pick(r, TOOLS)} install`. Then import it and call `{_pick(r, FUNCS)}()`.\n\n"
        f"## Contributing\n\nOpen an issue first; follow the instructions in CONTRIBUTING.md."
    ),
    lambda r: (
        f"Ticket #{r.randint(1000, 99999)}: {_pick(r, PEOPLE)} reports {_pick(r, ERRORS)} after the "
        f"upgrade. Steps to reproduce: run {_pick(r, TOOLS)} on {_pick(r, FILES)}. Expected: success. "
        "Actual: failure. Priority: medium."
    ),
    lambda r: (
        f"Customer review: the app is great but the {_pick(r, SETTINGS)} setting is hard to find. "
        f"I had to ignore the tutorial and ask {_pick(r, PEOPLE)} from support. {r.randint(2, 5)}/5."
    ),
    lambda r: (
        f"Search results for '{_pick(r, TOPICS)}':\n1. An introduction to {_pick(r, TOPICS)} - blog\n"
        f"2. {_pick(r, TOPICS)} best practices - docs\n3. Common pitfalls with {_pick(r, TOOLS)} - forum"
    ),
    lambda r: (
        f"Weather for {_pick(r, TIMES)}: {r.randint(-5, 35)}°C, wind {r.randint(0, 60)} km/h, "
        f"{r.choice(['sunny', 'light rain', 'overcast', 'snow showers'])}."
    ),
    lambda r: (
        f"Policy excerpt: employees must not share credentials. Requests to bypass access controls "
        f"must be reported to security. Contact {_pick(r, PEOPLE)} for exceptions."
    ),
)

ALL_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "request": REQUESTS,
    "hard": HARD,
    "document": DOCUMENTS,
}


def generate(kind: str, index: int, rng: random.Random) -> str:
    """One text from template ``index`` of ``kind``."""
    return ALL_TEMPLATES[kind][index](rng)


def docstrings(files: list[SourceFile], limit_per_file: int = 6) -> list[tuple[str, str]]:
    """(file, docstring) pairs of real English prose from standard-library modules."""
    out: list[tuple[str, str]] = []
    for f in files:
        try:
            tree = ast.parse(f.text)
        except (SyntaxError, ValueError):
            continue
        found = 0
        for node in ast.walk(tree):
            if found >= limit_per_file:
                break
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 60:
                    out.append((f.rel, doc))
                    found += 1
    return out
