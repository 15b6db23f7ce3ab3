from pathlib import Path

import pytest

from cabincrew.config import ConfigError, load_config


def test_defaults_describe_the_embedded_mode() -> None:
    config = load_config(None, environ={})
    assert config.server.addr == "127.0.0.1:7070"
    assert config.data_dir == ".cabincrew"
    assert len(config.services) == 6
    assert config.database_url("audit").startswith("sqlite:///")


def test_file_then_environment_then_flags_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server:\n  addr: 0.0.0.0:1\n  grace_seconds: 2\npreflight:\n  model_dirs: [a]\n"
    )
    config = load_config(
        str(path), environ={"CABINCREW__SERVER__GRACE_SECONDS": "3", "CABINCREW_ADDR": "1.2.3.4:5"}
    )
    assert config.server.addr == "1.2.3.4:5"
    assert config.server.grace_seconds == 3.0
    assert config.preflight.model_dirs == ("a",)
    config = load_config(
        str(path), environ={"CABINCREW_ADDR": "1.2.3.4:5"}, overrides={"server.addr": "h:6"}
    )
    assert config.server.addr == "h:6"


def test_unknown_keys_are_refused_with_their_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  adr: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert info.value.violations[0].field == "server.adr"


def test_wrong_types_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"CABINCREW__SERVER__GRACE_SECONDS": "soon"})
    assert info.value.violations[0].field == "server.grace_seconds"


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError):
        load_config(str(path), environ={})


def test_config_is_frozen() -> None:
    config = load_config(None, environ={})
    with pytest.raises(AttributeError):
        config.data_dir = "x"  # type: ignore[misc]


def test_an_invalid_config_file_is_named_without_quoting_its_content(tmp_path: Path) -> None:
    canary = "canary-db-password-7f3a9c"
    path = tmp_path / "config.yaml"
    path.write_text(f"database:\n  url: postgresql://app:{canary}@db/x\n  : [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})
    assert "line 3" in caught.value.message
    assert canary not in str(caught.value) and canary not in repr(caught.value.violations)
