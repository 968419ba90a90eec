"""`grace eval context` (Table 3) on the tiny policy, and the rope setups it compares."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from services.orchestrator.context import long_token_sequences, rope_setup
from shared.cli import app


def test_rope_setups():
    assert rope_setup("yarn", 1.0, 2048, 1e4) == ({"rope_type": "default", "rope_theta": 1e4}, 2048)
    assert rope_setup("extrapolation", 4.0, 2048, 1e4) == ({"rope_type": "default", "rope_theta": 1e4}, 8192)
    dynamic, positions = rope_setup("dynamic", 2.0, 2048, 1e4)
    assert dynamic == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4} and positions == 2048
    yarn, positions = rope_setup("yarn", 4.0, 8192, 1e6)
    assert yarn == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 1e6}
    assert positions == 32768  # the paper's 8k -> 32k
    with pytest.raises(ValueError):
        rope_setup("linear", 2.0, 2048, 1e4)


def test_long_sequences_have_the_exact_length_and_differ():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    sequences, repeated = long_token_sequences(docs, 6, 2)
    assert [len(s) for s in sequences] == [6, 6] and sequences[0] != sequences[1]
    assert not repeated
    assert long_token_sequences(docs, 20, 1)[1]  # corpus shorter than the window: cycled, and said so


def test_context_table_end_to_end(tiny_models, tmp_path):
    out = tmp_path / "context"
    result = CliRunner().invoke(
        app,
        ["eval", "context", "--model", str(tiny_models.policy), "--native-window", "64", "--out", str(out),
         "--texts", "1", "--prompts", "1", "--max-new-tokens", "24"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "context.json").read_text())["results"]
    cell = {(r["method"], r["factor"]): r for r in rows}
    assert len(rows) == 9 and all(r["ppl"] > 1 and 0 <= r["tokens"] <= 24 for r in rows)
    # 1x is the unscaled model for every method (as in the paper's first column)
    assert cell[("YaRN", 1.0)]["ppl"] == cell[("Extrapolation", 1.0)]["ppl"] == cell[("Dynamic NTK", 1.0)]["ppl"]
    # beyond the native window the scaling really changes the model
    for factor in (2.0, 4.0):
        plain = cell[("Extrapolation", factor)]["ppl"]
        assert cell[("YaRN", factor)]["ppl"] != pytest.approx(plain, rel=1e-6)
        assert cell[("Dynamic NTK", factor)]["ppl"] != pytest.approx(plain, rel=1e-6)
    table = (out / "context.md").read_text()
    assert "| Extension Method | PPL 64 (1x) | #Tokens 64 (1x) | PPL 128 (2x) |" in table
    assert table.count("\n| YaRN |") == 1
