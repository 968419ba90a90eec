"""Judge settings: the backend key (`backend_api_key`) vs the key that protects the judge's own API (`api_key`,
as on every service: `server_api_key`, else `common: api_key`), and the deprecated old name of the backend key
(GRACE_JUDGE_API_KEY, `judge: api_key`)."""

from __future__ import annotations

import logging
import warnings

import httpx
import pytest

from services.judge.app import create_app
from services.judge.config import JudgeSettings
from shared.settings import load_settings
from tests.fixtures.judge import serve_in_thread


@pytest.fixture
def no_deprecation():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def _yaml(tmp_path, text: str):
    config = tmp_path / "grace.yaml"
    config.write_text(text)
    return config


def test_env_names_the_backend(monkeypatch, no_deprecation):
    monkeypatch.setenv("GRACE_JUDGE_BASE_URL", "https://api.openai.com/v1")
    monkeypatch.setenv("GRACE_JUDGE_MODEL", "gpt-4o")
    monkeypatch.setenv("GRACE_JUDGE_BACKEND_API_KEY", "sk-test")
    settings = JudgeSettings()
    assert (settings.base_url, settings.model) == ("https://api.openai.com/v1", "gpt-4o")
    assert settings.backend_api_key_value() == "sk-test"
    assert settings.api_key_value() is None  # the judge's own API stays open unless a server key is set
    assert "sk-test" not in repr(settings)


def test_unset_backend_key_is_a_placeholder(no_deprecation):
    settings = JudgeSettings()
    assert (settings.backend_api_key_value(), settings.api_key_value()) == ("EMPTY", None)


def test_yaml_judge_section_names_the_backend_key(tmp_path, no_deprecation):
    config = _yaml(tmp_path, "common:\n  api_key: service-key\njudge:\n  backend_api_key: sk-judge\n")
    settings = load_settings(JudgeSettings, config)
    assert settings.backend_api_key_value() == "sk-judge"
    assert settings.api_key_value() == settings.server_api_key.get_secret_value() == "service-key"


def test_yaml_common_key_protects_the_judge_api_and_opens_the_rollout_backend(tmp_path, monkeypatch, no_deprecation):
    monkeypatch.setenv("GRACE_CONFIG", str(_yaml(tmp_path, "common:\n  api_key: service-key\njudge:\n  model: policy\n")))
    settings = JudgeSettings()
    assert settings.model == "policy"
    assert settings.api_key_value() == "service-key"
    assert settings.backend_api_key_value() == "service-key"  # the default backend is the rollout service


def test_server_api_key_wins_over_the_common_key(tmp_path, monkeypatch, no_deprecation):
    config = _yaml(tmp_path, "common:\n  api_key: service-key\njudge:\n  server_api_key: own\n")
    assert load_settings(JudgeSettings, config).api_key_value() == "own"
    monkeypatch.setenv("GRACE_JUDGE_SERVER_API_KEY", "from-env")
    settings = load_settings(JudgeSettings, config)
    assert (settings.api_key_value(), settings.backend_api_key_value()) == ("from-env", "service-key")


def test_old_env_name_still_names_the_backend_deprecated(monkeypatch, caplog):
    monkeypatch.setenv("GRACE_JUDGE_API_KEY", "sk-old")
    with caplog.at_level(logging.WARNING), pytest.warns(DeprecationWarning, match="GRACE_JUDGE_BACKEND_API_KEY"):
        settings = JudgeSettings()
    assert settings.backend_api_key_value() == "sk-old"
    assert settings.api_key_value() is None  # never the judge's own key
    assert "event=judge_deprecated_setting" in caplog.text and "sk-old" not in caplog.text


def test_old_yaml_key_still_names_the_backend_deprecated(tmp_path):
    config = _yaml(tmp_path, "common:\n  api_key: service-key\njudge:\n  api_key: sk-judge\n")
    with pytest.warns(DeprecationWarning, match="backend_api_key"):
        settings = load_settings(JudgeSettings, config)
    assert settings.backend_api_key_value() == "sk-judge"
    assert settings.api_key_value() == "service-key"  # the common key still protects the judge's API


def test_old_env_name_beats_the_common_key_for_the_backend_only(tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_JUDGE_API_KEY", "sk-env")
    with pytest.warns(DeprecationWarning):
        settings = load_settings(JudgeSettings, _yaml(tmp_path, "common:\n  api_key: service-key\n"))
    assert (settings.backend_api_key_value(), settings.api_key_value()) == ("sk-env", "service-key")


def test_old_argument_still_names_the_backend_deprecated():
    with pytest.warns(DeprecationWarning):
        settings = JudgeSettings(api_key="sk-arg", server_api_key="own")
    assert (settings.backend_api_key_value(), settings.api_key_value()) == ("sk-arg", "own")


def test_new_name_wins_over_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_JUDGE_API_KEY", "sk-old")
    monkeypatch.setenv("GRACE_JUDGE_BACKEND_API_KEY", "sk-new")
    with pytest.warns(DeprecationWarning, match="ignored"):
        assert JudgeSettings().backend_api_key_value() == "sk-new"
    monkeypatch.delenv("GRACE_JUDGE_API_KEY")
    monkeypatch.delenv("GRACE_JUDGE_BACKEND_API_KEY")
    config = _yaml(tmp_path, "judge:\n  api_key: sk-old\n  backend_api_key: sk-new\n")
    with pytest.warns(DeprecationWarning, match="ignored"):
        assert load_settings(JudgeSettings, config).backend_api_key_value() == "sk-new"


@pytest.mark.parametrize(
    ("env", "yaml", "key"),
    [
        ({"GRACE_JUDGE_SERVER_API_KEY": "s3cret", "GRACE_JUDGE_API_KEY": "backend-key"}, "", "s3cret"),
        ({"GRACE_JUDGE_BACKEND_API_KEY": "backend-key"}, "common:\n  api_key: s3cret\n", "s3cret"),
        ({"GRACE_JUDGE_BACKEND_API_KEY": "backend-key"}, "", None),
    ],
    ids=["server_api_key", "common-api_key", "open"],
)
def test_the_server_key_protects_the_api_never_the_backend_key(tmp_path, monkeypatch, env, yaml, key):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        settings = load_settings(JudgeSettings, _yaml(tmp_path, yaml))
    with serve_in_thread(create_app(settings)) as url:

        def status(bearer: str | None) -> int:
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            return httpx.post(f"{url}/v1/judge", json={}, headers=headers, timeout=30).status_code

        authorized = 422  # past the key: the empty body is rejected before any backend call
        assert status("backend-key") == (401 if key else authorized)
        assert status(None) == (401 if key else authorized)
        if key:
            assert status(key) == authorized
