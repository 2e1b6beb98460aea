"""Configuration: file, environment overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_server.config import ConfigError, load_settings


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "taskwarden.toml"
    config.write_text('default_worker = "shell"\nmax_result_bytes = 4096\n')
    monkeypatch.setenv("TASKWARDEN_DB", str(tmp_path / "from-env.db"))
    monkeypatch.setenv("TASKWARDEN_MAX_RESULT_BYTES", "2048")
    settings = load_settings(config)
    assert settings.default_worker == "shell"
    assert settings.db_path == tmp_path / "from-env.db"
    assert settings.max_result_bytes == 2048
    # Flags win over both.
    assert load_settings(config, db=str(tmp_path / "flag.db")).db_path == tmp_path / "flag.db"


def test_found_through_TASKWARDEN_CONFIG(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text('identity = "ci-bot"\n')
    monkeypatch.setenv("TASKWARDEN_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)
    assert load_settings().identity == "ci-bot"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_result_bytes = 10\n", "max_result_bytes: Input should be greater than or equal to 256"),
        ('default_worker = "robot"\n', "default_worker: unknown worker 'robot'"),
        ("allowed_roots = []\n", "allowed_roots"),
        ('[workers.codex]\nmax_concurrent = "many"\n', "workers.codex.max_concurrent"),
        ('[workers.human]\ncommand = ["x"]\n', "workers.human: 'human' is reserved"),
        ('[identities.ci]\ntoken_sha256 = "abc"\n', "identities.ci.token_sha256"),
        ("polciy = 'x'\n", "polciy: Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "taskwarden.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert message in str(error.value)
    assert str(error.value).startswith(f"{config}: ")


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")
