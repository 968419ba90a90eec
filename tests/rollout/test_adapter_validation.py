"""Adapter checks done before vLLM is called: files, rank, path inside the root, checksum."""

import json
import shutil

import pytest

from services.rollout.bench import RandomLora
from services.rollout.hot_swap import served_name, validate_adapter
from shared.adapters import AdapterStore
from shared.schemas import AdapterEvent


@pytest.fixture(scope="module")
def factory(tiny_models, tmp_path_factory):
    return RandomLora(tiny_models.policy, tmp_path_factory.mktemp("adapters"))


def _event(path, checksum, rank=8, version="v1"):
    return AdapterEvent(run_id="r", iteration=0, version=version, path=str(path), checksum=checksum, rank=rank)


def test_good_adapter_passes(factory):
    path, checksum, rank = factory.make("good", rank=8)
    assert validate_adapter(_event(path, checksum, rank), AdapterStore(factory.store_root), max_rank=16) is None


def test_each_defect_is_named(factory, tmp_path):
    store = AdapterStore(factory.store_root)
    path, checksum, _ = factory.make("base-for-defects", rank=8)

    assert "checksum mismatch" in validate_adapter(_event(path, "0" * 64), store, 16)
    assert "rank 8 is above the maximum 4" in validate_adapter(_event(path, checksum), store, 4)

    outside = tmp_path / "outside"
    shutil.copytree(path, outside)
    assert "outside the adapter root" in validate_adapter(_event(outside, checksum), store, 16)
    escape = factory.store_root / "r" / ".." / ".." / outside.name
    assert "outside the adapter root" in validate_adapter(_event(escape, checksum), store, 16)

    broken = factory.store_root / "r" / "broken"
    shutil.copytree(path, broken)
    (broken / "adapter_model.safetensors").unlink()
    assert "missing PEFT file(s): adapter_model.safetensors" in validate_adapter(_event(broken, checksum), store, 16)

    bad_config = factory.store_root / "r" / "bad-config"
    shutil.copytree(path, bad_config)
    (bad_config / "adapter_config.json").write_text(json.dumps({"r": "many"}))
    assert "unreadable adapter_config.json" in validate_adapter(_event(bad_config, checksum), store, 16)


def test_served_names_are_versioned_and_safe():
    a = served_name(_event("/x", "c", version="it-1"))
    b = served_name(_event("/x", "c", version="it-2"))
    assert a != b and a.startswith("policy-") and "/" not in a
