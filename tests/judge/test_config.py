"""Judge settings: the backend key vs the key that protects the judge's own API."""

from __future__ import annotations

from services.judge.config import JudgeSettings


def test_env_names_the_backend(monkeypatch):
    monkeypatch.setenv("GRACE_JUDGE_BASE_URL", "https://api.openai.com/v1")
    monkeypatch.setenv("GRACE_JUDGE_MODEL", "gpt-4o")
    monkeypatch.setenv("GRACE_JUDGE_API_KEY", "sk-test")
    settings = JudgeSettings()
    assert (settings.base_url, settings.model, settings.backend_api_key()) == ("https://api.openai.com/v1", "gpt-4o", "sk-test")
    assert settings.api_key_value() is None  # the judge's own API stays open unless server_api_key is set
    assert "sk-test" not in repr(settings)


def test_unset_backend_key_is_a_placeholder():
    assert JudgeSettings().backend_api_key() == "EMPTY"


def test_yaml_common_key_protects_the_judge_api_and_opens_the_rollout_backend(tmp_path, monkeypatch):
    config = tmp_path / "grace.yaml"
    config.write_text("common:\n  api_key: service-key\njudge:\n  model: policy\n")
    monkeypatch.setenv("GRACE_CONFIG", str(config))
    settings = JudgeSettings()
    assert settings.model == "policy"
    assert settings.server_api_key_value() == settings.api_key_value() == "service-key"
    assert settings.backend_api_key() == "service-key"  # the default backend is the rollout service


def test_yaml_judge_section_names_another_backend_key(tmp_path, monkeypatch):
    config = tmp_path / "grace.yaml"
    config.write_text("common:\n  api_key: service-key\njudge:\n  api_key: sk-judge\n  server_api_key: own\n")
    monkeypatch.setenv("GRACE_CONFIG", str(config))
    settings = JudgeSettings()
    assert settings.backend_api_key() == "sk-judge"
    assert settings.server_api_key_value() == "own"
