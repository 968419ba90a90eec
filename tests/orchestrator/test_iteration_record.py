"""The samples file and the iteration record read from it (pure: no stack)."""

from __future__ import annotations

from services.orchestrator.loop import iteration_record, training_data_table
from shared.runs import read_samples_file, samples_file, write_samples_file
from shared.schemas import Metrics, WeightedSample

METRICS = Metrics(length=10, diversity=50, professionalism=1, general_perplexity=3, domain_perplexity=2,
                  relevance_summary=0.5, relevance_document=0.4)  # fmt: skip


def sample(group: int, index: int, *, z: float | None, weight: float, finish: str = "stop") -> WeightedSample:
    parsed = z is not None
    return WeightedSample(
        run_id="r", iteration=0, sample_id=f"r:0:{group}:{index}", group_id=f"r:0:{group}", response_index=index,
        query=f"query {group}", response="text", weight=weight, label="desirable" if parsed and z >= 0 else "undesirable",
        parsed=parsed, z=z, rank_sum=1.0 if parsed else None, metrics=METRICS if parsed else None, finish_reason=finish,
        adapter_version="base", query_source="seed_fallback" if group == 2 else "generated",
    )  # fmt: skip


def test_samples_file_round_trips_in_natural_order_and_the_record_counts_it(tmp_path):
    samples = [
        sample(10, 1, z=-1.0, weight=-1.0), sample(10, 0, z=1.0, weight=1.0),  # a normal group
        sample(2, 0, z=0.0, weight=0.0), sample(2, 1, z=None, weight=-1.0, finish="length"),  # one parsed: degenerate
        sample(3, 0, z=0.0, weight=0.0), sample(3, 1, z=0.0, weight=0.0),  # all tied: degenerate
    ]  # fmt: skip
    path = write_samples_file(samples_file(tmp_path, "r", 0), samples)
    assert path == tmp_path / "r" / "samples" / "iter-0000.jsonl"
    rows = read_samples_file(path)
    assert [r["sample_id"] for r in rows] == ["r:0:2:0", "r:0:2:1", "r:0:3:0", "r:0:3:1", "r:0:10:0", "r:0:10:1"]
    assert rows[1]["finish_reason"] == "length" and rows[1]["metrics"] is None and rows[0]["metrics"]["length"] == 10
    record = iteration_record(path)
    assert record["trained_samples"] == 6 and record["truncated"] == 1 and record["truncation_rate"] == 1 / 6
    assert record["groups"] == 3 and record["degenerate_groups"] == 2
    assert record["omega_plus"] == 4 and record["omega_minus"] == 2
    assert record["sources"] == {"generated": 2, "seed_fallback": 1}
    table = training_data_table({"0": record, "1": {}})
    assert "| 0 | 6 | 0.83 | 0.17 | 2/3 | 4 | 2 | 2 generated, 1 seed_fallback |" in table
    assert "| 1 | (no samples file here)" in table


def test_no_samples_file_gives_an_empty_record(tmp_path):
    assert iteration_record(tmp_path / "missing.jsonl") == {}
