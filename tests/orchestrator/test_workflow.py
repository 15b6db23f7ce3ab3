"""Workflow definitions: parsing, validation with line numbers, and the domain objects."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from jsonschema import Draft7Validator

from orchestrator_svc.errors import (
    InputsError,
    Issue,
    UnsupportedStepError,
    WorkflowDefinitionError,
)
from orchestrator_svc.templating import Scope, StepValues
from orchestrator_svc.workflow import (
    RetryPolicy,
    StepKind,
    load_workflow,
    parse_workflow,
    workflow_from_document,
    workflow_schema,
)

GOOD = """\
id: deploy-docs
description: Patch the docs, then ship them
inputs:
  env: {default: dev}
  ticket: {required: true}
concurrency: 2
workspace:
  source: ./repo
governance:
  policy_bundle: default
  approval_role: release-manager
steps:
  - id: plan
    kind: engine
    engine:
      command: [python3, ./engines/file-patch.py]
      args: [--verbose]
      idempotent_takeoff: false
    config:
      ticket: "{{ inputs.ticket }}"
      edits: [{path: README.md, content: "env={{ inputs.env }}"}]
    secrets: [GITHUB_TOKEN]
    timeout_seconds: 30
    retries: {max_attempts: 3, backoff_seconds: 1, max_backoff_seconds: 3}
    outputs:
      changed: {description: whether anything changes}
  - id: review
    kind: approval
    depends_on: [plan]
    when: steps.plan.outputs.changed == "true" and inputs.env != "dev"
    governance: {approval_quorum: 2}
  - id: publish
    kind: engine
    depends_on: [review]
    engine: {command: /usr/bin/publish}
    config: {channel: "{{ steps.plan.outputs.changed }}"}
    governance: {aggregation: unanimous, allow_workspace_drift: true}
    post_checks: {preflight: false}
"""


def issues(text: str) -> tuple[Issue, ...]:
    with pytest.raises(WorkflowDefinitionError) as caught:
        parse_workflow(textwrap.dedent(text), source="workflow.yaml")
    return caught.value.issues


def located(text: str) -> set[tuple[int | None, str]]:
    return {(issue.line, issue.path) for issue in issues(text)}


def test_a_good_workflow_builds_frozen_domain_objects(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(GOOD)
    workflow = load_workflow(path)
    assert workflow.id == "deploy-docs"
    assert workflow.concurrency == 2
    assert (
        workflow.workspace is not None
        and workflow.workspace.source == (tmp_path / "repo").resolve()
    )
    assert workflow.dag.topological_order() == ("plan", "review", "publish")
    plan = workflow.step("plan")
    assert plan.kind is StepKind.ENGINE
    assert plan.engine is not None
    assert plan.engine.argv == (
        "python3",
        str((tmp_path / "engines/file-patch.py").resolve()),
        "--verbose",
    )
    assert plan.secrets == ("GITHUB_TOKEN",)
    assert plan.retries == RetryPolicy(3, 1.0, 3.0)
    assert plan.outputs is not None and set(plan.outputs) == {"changed"}
    assert plan.line == 13
    review = workflow.step("review")
    assert review.kind is StepKind.APPROVAL and review.engine is None
    assert review.governance.approval_role == "release-manager"  # inherited
    assert review.governance.effective_quorum == 2
    publish = workflow.step("publish")
    assert publish.governance.effective_aggregation == "unanimous"
    assert publish.governance.policy_bundle == "default"
    assert publish.allow_workspace_drift and not publish.post_checks.preflight
    assert publish.engine is not None and publish.engine.argv == ("/usr/bin/publish",)
    with pytest.raises(AttributeError):
        plan.id = "other"  # type: ignore[misc]


def test_steps_render_templates_and_evaluate_conditions() -> None:
    workflow = parse_workflow(GOOD)
    inputs = workflow.resolve_inputs({"ticket": "T-1"})
    assert inputs == {"env": "dev", "ticket": "T-1"}
    scope = Scope(inputs, {"plan": StepValues({"changed": "true"})})
    assert workflow.step("plan").render_config(scope) == {
        "ticket": "T-1",
        "edits": [{"path": "README.md", "content": "env=dev"}],
    }
    assert workflow.step("review").should_run(scope) is False
    prod = Scope({**inputs, "env": "prod"}, scope.steps)
    assert workflow.step("review").should_run(prod) is True


def test_the_same_definition_as_json_gives_the_same_workflow_and_digest() -> None:
    import yaml

    document = yaml.safe_load(GOOD)
    from_json = parse_workflow(json.dumps(document, indent=2), source="wf.json")
    from_yaml = parse_workflow(GOOD)
    assert from_json.digest == from_yaml.digest
    assert from_json.steps == from_yaml.steps


def test_a_protobuf_struct_style_document_with_float_numbers_is_accepted() -> None:
    import yaml

    document = yaml.safe_load(GOOD)
    document["concurrency"] = 2.0
    document["steps"][0]["retries"]["max_attempts"] = 3.0
    workflow = workflow_from_document(document)
    assert workflow.concurrency == 2
    assert workflow.step("plan").retries.max_attempts == 3


def test_a_missing_required_field_points_at_its_line_and_path() -> None:
    text = """\
    id: wf
    steps:
      - id: a
        kind: engine
        engine:
          command: [x]
      - id: b
        kind: engine
        engine:
          args: [y]
    """
    assert located(text) == {(9, "steps[1].engine.command")}
    (issue,) = issues(text)
    assert str(issue) == "workflow.yaml:9: steps[1].engine.command: required"


def test_unknown_fields_and_wrong_types_point_at_their_lines() -> None:
    text = """\
    id: wf
    concurrency: many
    steps:
      - id: a
        kind: engine
        engine: {command: [x]}
        timeout_seconds: -1
        colour: blue
    """
    assert located(text) == {
        (2, "concurrency"),
        (7, "steps[0].timeout_seconds"),
        (8, "steps[0].colour"),
    }


def test_a_bad_kind_and_a_bad_step_id_are_reported() -> None:
    text = """\
    id: wf
    steps:
      - id: "has space"
        kind: shell
    """
    assert located(text) == {(3, "steps[0].id"), (4, "steps[0].kind")}


def test_duplicate_step_ids_point_at_the_repeat() -> None:
    text = """\
    id: wf
    steps:
      - {id: a, kind: engine, engine: {command: [x]}}
      - {id: a, kind: engine, engine: {command: [x]}}
    """
    assert located(text) == {(4, "steps[1].id")}


def test_unknown_dependencies_and_self_dependencies_name_the_step() -> None:
    text = """\
    id: wf
    steps:
      - id: a
        kind: engine
        engine: {command: [x]}
        depends_on: [a]
      - id: b
        kind: engine
        engine: {command: [x]}
        depends_on:
          - a
          - ghost
    """
    assert located(text) == {(6, "steps[0].depends_on[0]"), (12, "steps[1].depends_on[1]")}


def test_a_cycle_is_reported_with_the_steps_in_it() -> None:
    text = """\
    id: wf
    steps:
      - {id: a, kind: engine, engine: {command: [x]}, depends_on: [c]}
      - {id: b, kind: engine, engine: {command: [x]}, depends_on: [a]}
      - {id: c, kind: engine, engine: {command: [x]}, depends_on: [b]}
      - {id: d, kind: engine, engine: {command: [x]}}
    """
    (issue,) = issues(text)
    assert issue.path == "steps[0].depends_on[0]" and issue.line == 3
    assert all(step in issue.message for step in ("a", "b", "c"))


def test_duplicate_yaml_keys_are_refused() -> None:
    text = """\
    id: wf
    steps:
      - id: a
        kind: engine
        engine: {command: [x]}
        engine: {command: [y]}
    """
    assert located(text) == {(6, "steps[0].engine")}


def test_yaml_1_1_surprises_stay_strings() -> None:
    workflow = parse_workflow(
        """\
        id: wf
        inputs:
          country: {default: no}
          date: {default: 2024-01-01}
        steps: [{id: a, kind: engine, engine: {command: [x]}}]
        """.replace("        ", "")
    )
    assert workflow.resolve_inputs({}) == {"country": "no", "date": "2024-01-01"}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "id: [unclosed\n",
        "id: a\n---\nid: b\n",
        "- just\n- a list\n",
        "id: wf\nsteps: [{id: a, kind: engine, engine: {command: [x]}, config: {1: one}}]\n",
        "id: wf\nsteps: [{id: a, kind: engine, engine: {command: [x]}, config: {v: .nan}}]\n",
        "a: &a [*a]\n",
    ],
)
def test_malformed_files_are_definition_errors(text: str) -> None:
    with pytest.raises(WorkflowDefinitionError):
        parse_workflow(text)


def test_an_alias_bomb_is_refused_before_it_is_expanded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(WorkflowDefinitionError):
        parse_workflow("\n".join(lines) + "\n")


def test_yaml_anchors_may_share_config_between_steps() -> None:
    workflow = parse_workflow(
        "id: wf\nsteps:\n"
        "  - {id: a, kind: engine, engine: &e {command: [x]}, config: &c {k: v}}\n"
        "  - {id: b, kind: engine, engine: *e, config: *c}\n"
    )
    assert workflow.step("b").config == {"k": "v"}


def test_approval_steps_need_a_role_and_no_engine() -> None:
    text = """\
    id: wf
    steps:
      - id: gate
        kind: approval
        engine: {command: [x]}
    """
    assert located(text) == {(5, "steps[0].engine"), (3, "steps[0]")}


def test_an_engine_step_needs_an_engine() -> None:
    assert located("id: wf\nsteps:\n  - {id: a, kind: engine}\n") == {(3, "steps[0].engine")}


def test_reserved_kinds_parse_but_cannot_run() -> None:
    workflow = parse_workflow(
        "id: wf\nsteps:\n  - {id: t, kind: tool}\n  - {id: l, kind: llm, depends_on: [t]}\n"
    )
    assert [step.kind.supported for step in workflow.steps] == [False, False]
    with pytest.raises(UnsupportedStepError) as caught:
        workflow.ensure_runnable()
    assert [issue.path for issue in caught.value.issues] == ["steps[0].kind", "steps[1].kind"]
    parse_workflow(GOOD).ensure_runnable()


@pytest.mark.parametrize(
    "when",
    [
        "__import__('os').system('id')",
        "inputs.env.__class__",
        "open('/etc/passwd')",
        "lambda: 1",
        "inputs.count + 1 == 2",
        "inputs.count < 3",
        "[x for x in inputs.env]",
        "inputs.env if true else false",
        "os.system",
        "inputs.env == 'a' == 'a'",
        "steps.plan.secrets",
        "inputs.env; true",
        "{{ inputs.env }}",
    ],
)
def test_unsafe_or_unknown_when_expressions_are_refused_at_load(when: str) -> None:
    text = f"""\
    id: wf
    inputs: {{env: {{default: a}}, count: {{default: 1}}}}
    steps:
      - id: plan
        kind: engine
        engine: {{command: [x]}}
      - id: b
        kind: engine
        engine: {{command: [x]}}
        depends_on: [plan]
        when: {json.dumps(when)}
    """
    assert {issue.path for issue in issues(text)} == {"steps[1].when"}


def test_references_must_name_declared_inputs_dependencies_and_outputs() -> None:
    text = """\
    id: wf
    inputs: {env: {default: a}}
    steps:
      - id: plan
        kind: engine
        engine: {command: [x]}
        outputs: {changed: {}}
      - id: other
        kind: engine
        engine: {command: [x]}
      - id: b
        kind: engine
        engine: {command: [x]}
        depends_on: [plan]
        config:
          a: "{{ inputs.missing }}"
          b: "{{ steps.other.outputs.x }}"
          c: "{{ steps.plan.outputs.undeclared }}"
          d: "{{ steps.plan.outputs.changed }}"
          e: "{{ unclosed"
    """
    assert located(text) == {
        (16, "steps[2].config.a"),
        (17, "steps[2].config.b"),
        (18, "steps[2].config.c"),
        (20, "steps[2].config.e"),
    }


def test_secret_names_may_not_shadow_runner_variables() -> None:
    text = """\
    id: wf
    steps:
      - id: a
        kind: engine
        engine: {command: [x]}
        secrets: [PATH, CABINCREW_MODE, OK_NAME, OK_NAME]
    """
    assert {issue.path for issue in issues(text)} == {
        "steps[0].secrets[0]",
        "steps[0].secrets[1]",
        "steps[0].secrets[3]",
    }
    lower = "id: wf\nsteps: [{id: a, kind: engine, engine: {command: [x]}, secrets: [lower]}]\n"
    assert {issue.path for issue in issues(lower)} == {"steps[0].secrets[0]"}


def test_workspace_needs_exactly_one_source() -> None:
    text = """\
    id: wf
    workspace: {source: ./a, git: {repo: ./r, ref: main}}
    steps: [{id: a, kind: engine, engine: {command: [x]}}]
    """
    assert {issue.path for issue in issues(text)} == {"workspace"}
    assert issues(
        "id: wf\nworkspace: {git: {repo: r, ref: --upload-pack=x}}\n"
        "steps: [{id: a, kind: engine, engine: {command: [x]}}]\n"
    )


def test_inputs_are_checked_when_a_run_is_submitted() -> None:
    workflow = parse_workflow(GOOD)
    with pytest.raises(InputsError) as caught:
        workflow.resolve_inputs({"unknown": 1})
    assert len(caught.value.problems) == 2  # unknown, and the required ticket missing
    assert workflow.resolve_inputs({"ticket": "t", "env": "prod"})["env"] == "prod"


def test_an_input_cannot_be_required_and_defaulted() -> None:
    assert located(
        "id: wf\ninputs:\n  a: {default: 1, required: true}\n"
        "steps: [{id: s, kind: engine, engine: {command: [x]}}]\n"
    ) == {(3, "inputs.a.required")}


def test_retry_delays_back_off_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_seconds=1, max_backoff_seconds=5)
    assert [policy.delay(n) for n in range(0, 6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_definition_errors_carry_field_violations_for_the_wire() -> None:
    with pytest.raises(WorkflowDefinitionError) as caught:
        parse_workflow("id: wf\nsteps: []\n")
    assert [violation.field for violation in caught.value.violations] == ["steps"]
    assert caught.value.remedy()


def test_the_workflow_schema_is_valid_draft_07() -> None:
    Draft7Validator.check_schema(workflow_schema())
