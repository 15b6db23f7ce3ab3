"""The vendored protocol schema helper."""

from __future__ import annotations

import pytest

from cabincrew import protocol_schema


def test_every_definition_compiles_to_a_draft_07_validator() -> None:
    for name in protocol_schema.definition_names():
        validator = protocol_schema.validator(name)
        validator.check_schema(validator.schema)


def test_validators_are_cached() -> None:
    assert protocol_schema.validator("EngineOutput") is protocol_schema.validator("EngineOutput")


def test_an_unknown_definition_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        protocol_schema.validator("NoSuchThing")


def test_references_between_definitions_resolve() -> None:
    receipt = {
        "protocol_version": "1",
        "engine_id": "e",
        "mode": "flight-plan",
        "receipt_id": "r",
        "status": "success",
    }
    assert protocol_schema.errors("EngineOutput", receipt) == []
    assert protocol_schema.is_valid("EngineOutput", receipt)
    bad_mode = {**receipt, "mode": "landing"}  # Mode is a $ref
    bad_artifact = {**receipt, "artifacts": [{"name": "a"}]}  # EngineArtifact is a $ref
    (problem,) = protocol_schema.errors("EngineOutput", bad_mode)
    assert problem.startswith("/mode: ")
    assert len(protocol_schema.errors("EngineOutput", bad_artifact)) == 3


def test_additional_properties_are_refused_where_the_schema_says_so() -> None:
    artifact = {"artifact_type": "t", "action": "a", "mime": "m", "role": "state"}
    assert not protocol_schema.is_valid("Artifact", artifact)
