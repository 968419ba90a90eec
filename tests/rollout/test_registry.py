"""The `policy` mapping: switch, in-flight refcounts, retirement only when drained."""

from services.rollout.registry import AdapterRecord, AdapterRegistry


def _record(version):
    return AdapterRecord(version=version, model=f"policy-{version}", path=f"/a/{version}", checksum=version * 3)


def test_base_before_any_adapter():
    registry = AdapterRegistry("base")
    assert registry.current.version == "base" and registry.acquire().model == "base"
    assert registry.in_flight() == {"base": 1}


def test_old_version_is_unloadable_only_after_its_requests_finish():
    registry = AdapterRegistry("base")
    registry.switch(_record("v1"))
    running = [registry.acquire(), registry.acquire()]
    assert {r.model for r in running} == {"policy-v1"}
    previous = registry.switch(_record("v2"))
    assert previous.version == "v1" and previous.retired_at is not None
    assert registry.acquire().model == "policy-v2"  # new requests go to the new version at once
    assert registry.drainable() == []  # two v1 requests are still running
    registry.release("policy-v1")
    assert registry.drainable() == []
    registry.release("policy-v1")
    assert [r.version for r in registry.drainable()] == ["v1"]
    registry.forget("policy-v1")
    assert registry.drainable() == [] and registry.find("v1") is None
    assert registry.find("v2").model == "policy-v2"


def test_base_model_is_never_retired_and_history_is_newest_first():
    registry = AdapterRegistry("base", history_size=3)
    for v in ("v1", "v2", "v3", "v4"):
        registry.switch(_record(v))
    assert "base" not in {r.model for r in registry.drainable()}
    snapshot = registry.snapshot()
    assert snapshot["current"]["version"] == "v4"
    assert [h["version"] for h in snapshot["history"]] == ["v4", "v3", "v2"]
    assert sorted(r["version"] for r in snapshot["retiring"]) == ["v1", "v2", "v3"]


def test_release_never_goes_negative():
    registry = AdapterRegistry("base")
    registry.release("base")
    assert registry.in_flight() == {}
