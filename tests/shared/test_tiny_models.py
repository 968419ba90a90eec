"""The local model set: CLI build, tokenizer, YaRN, M_D vs M_G, BGE-M3 format, determinism."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.tiny_models import (
    DATA_DIR,
    MARKER,
    STRUCTURE_TAGS,
    ModelSet,
    _render_chat,
    build_model_set,
    ensure_model_set,
    fingerprint,
    native_window,
    resolve_models,
    weights_checksum,
    yarn_rope_parameters,
)

GRACE = Path(sys.executable).parent / "grace"


@pytest.fixture(scope="session")
def cli_set(tmp_path_factory) -> ModelSet:
    """The tiny set built by the ``grace models tiny DIR`` command, as a user would."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    run = subprocess.run([str(GRACE), "models", "tiny", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    printed = dict(line.split(None, 1) for line in run.stdout.splitlines() if line.strip())
    expected = ModelSet.at(out.resolve())
    assert printed == expected.as_dict()
    return expected


@pytest.fixture(scope="session")
def policy_tokenizer(cli_set):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cli_set.policy)


def test_cli_builds_every_model(cli_set):
    for name in ("general", "domain", "embedding"):
        folder = getattr(cli_set, name)
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists(), name
        assert (folder / "tokenizer.json").exists(), f"{name} must carry its tokenizer (vLLM loads it from there)"
    assert cli_set.policy == cli_set.general
    assert (cli_set.tokenizer / "tokenizer.json").exists()
    for head in ("colbert_linear.pt", "sparse_linear.pt"):
        assert (cli_set.embedding / head).exists()
    manifest = json.loads((cli_set.root / MARKER).read_text())
    assert manifest["fingerprint"] == fingerprint("tiny")
    assert 500_000 < manifest["parameters"]["general"] < 2_000_000
    first, last = manifest["losses"]["general"]
    assert last < first - 1.0, "pretraining must move the general model off random weights"


def test_saved_config_is_native_and_yarn_parameters_are_derived(cli_set):
    config = json.loads((cli_set.policy / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM CPU attention minimum
    assert config["max_position_embeddings"] == 2048
    assert config["rope_parameters"]["rope_type"] == "default"  # YaRN is applied at serve time only
    assert config["dtype"] == "float32"
    assert native_window(cli_set.policy) == 2048
    assert yarn_rope_parameters(cli_set.policy, factor=4.0) == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 2048,
        "rope_theta": 10000.0,
    }


def test_policy_runs_past_its_window_with_yarn(cli_set):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    window = native_window(cli_set.policy)
    config = Qwen2Config.from_pretrained(
        cli_set.policy,
        rope_parameters=yarn_rope_parameters(cli_set.policy, 4.0),
        max_position_embeddings=4 * window,
    )
    model = AutoModelForCausalLM.from_pretrained(cli_set.policy, config=config).eval()
    assert model.config.rope_parameters["rope_type"] == "yarn"
    ids = torch.randint(10, config.vocab_size, (1, 2600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 2600, config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tags_are_single_tokens_that_survive_decoding(policy_tokenizer):
    tok = policy_tokenizer
    for tag in STRUCTURE_TAGS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
    response = "<summary>国企改革总结</summary><outline>1. 背景</outline><answer>Report body.</answer><|im_end|>"
    ids = tok.encode(response, add_special_tokens=False)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == response.removesuffix("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_renders_chatml_with_generation_prompt(policy_tokenizer):
    messages = [{"role": "system", "content": "系统"}, {"role": "user", "content": "Write a report."}]
    text = policy_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\n系统<|im_end|>\n<|im_start|>user\nWrite a report.<|im_end|>\n<|im_start|>assistant\n")
    without = policy_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("assistant\n")
    assert without == _render_chat(messages)  # the pretraining text uses the same format


def test_every_loader_sees_the_same_ids(cli_set, policy_tokenizer):
    """transformers rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer: ids must match raw tokenizers."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(cli_set.tokenizer / "tokenizer.json"))
    standalone = AutoTokenizer.from_pretrained(cli_set.tokenizer)
    texts = [json.loads(line)["query"] for line in (DATA_DIR / "test_queries.jsonl").read_text().splitlines()[:6]]
    texts += ["国有资产监督管理委员会于2024年发布了12号文件。", "  Mixed 123 text\n\n<answer>x</answer> ｅｍ 😀"]
    for text in texts:
        ids = raw.encode(text).ids
        assert policy_tokenizer.encode(text, add_special_tokens=False) == ids
        assert standalone.encode(text, add_special_tokens=False) == ids
        assert policy_tokenizer.decode(ids) == text  # Chinese round-trips byte-exact
    assert len(raw.encode(texts[-2]).ids) < len(texts[-2])  # trained merges, not bytes


def _perplexity(model_dir: Path, blocks) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return math.exp(model(input_ids=blocks, labels=blocks).loss.item())


def test_domain_model_is_adapted_to_domain_text(cli_set, policy_tokenizer):
    import torch

    def blocks(name: str):
        lines = [x for x in (DATA_DIR / name).read_text().splitlines() if x.strip()]
        ids = policy_tokenizer("\n".join(lines), add_special_tokens=False, verbose=False)["input_ids"]
        n = min(len(ids) // 256, 16)
        return torch.tensor(ids[: n * 256]).view(n, 256)

    domain, general = blocks("domain_corpus.txt"), blocks("general_corpus.txt")
    ppl = {
        (m, t): _perplexity(getattr(cli_set, m), b)
        for m in ("general", "domain")
        for t, b in (("domain", domain), ("general", general))
    }
    logging.getLogger(__name__).info("perplexities %s", ppl)
    assert ppl["domain", "domain"] < 0.8 * ppl["general", "domain"]
    assert ppl["domain", "general"] > 0.9 * ppl["general", "general"]


def test_bge_m3_loader_reads_encoder_and_both_heads(cli_set, caplog):
    import numpy as np
    import torch
    from FlagEmbedding import BGEM3FlagModel

    caplog.set_level(logging.INFO, logger="FlagEmbedding")
    encoder = BGEM3FlagModel(str(cli_set.embedding), use_fp16=False, devices="cpu")
    assert "loading existing colbert_linear and sparse_linear" in caplog.text
    assert "new initialize" not in caplog.text
    saved = torch.load(cli_set.embedding / "colbert_linear.pt", weights_only=True)
    assert torch.equal(encoder.model.colbert_linear.weight, saved["weight"])

    long_doc = "国有企业深化改革，完善公司治理。" * 80  # > 512 tokens: max_length must be honoured
    texts = ["国有企业改革工作报告", "国有企业改革的主要做法", "An energy storage market brief.", long_doc]
    out = encoder.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=4096)
    dense = out["dense_vecs"]
    assert dense.shape == (4, 128)
    assert np.allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-5)
    weights = out["lexical_weights"]
    assert len(weights) == 4 and all(w and all(v > 0 for v in w.values()) for w in weights)
    assert out["colbert_vecs"][3].shape[0] > 512
    assert encoder.compute_lexical_matching_score(weights[0], weights[1]) > 0  # shared tokens
    assert encoder.compute_lexical_matching_score(weights[0], weights[2]) == 0  # no shared tokens
    assert math.isfinite(float(encoder.colbert_score(out["colbert_vecs"][0], out["colbert_vecs"][1])))
    scores = encoder.compute_score([(texts[0], texts[1])], max_passage_length=4096, weights_for_different_modes=[1.0, 0.3, 1.0])
    assert set(scores) >= {"dense", "sparse", "colbert", "colbert+sparse+dense"}


def test_two_builds_are_identical_and_a_complete_build_is_reused(cli_set, tmp_path):
    second = build_model_set(tmp_path / "again", preset="tiny")
    for name in ("general", "domain", "embedding"):
        assert weights_checksum(getattr(second, name)) == weights_checksum(getattr(cli_set, name)), name
    for name in ("tokenizer.json", "colbert_linear.pt", "sparse_linear.pt"):
        a = cli_set.embedding / name
        assert a.read_bytes() == (second.embedding / name).read_bytes(), name
    assert (second.tokenizer / "tokenizer.json").read_bytes() == (cli_set.tokenizer / "tokenizer.json").read_bytes()
    assert not list(tmp_path.glob(".again.tmp-*")), "the temporary build folder must be renamed away"

    marker = (second.root / MARKER).stat().st_mtime_ns
    started = time.perf_counter()
    assert build_model_set(tmp_path / "again", preset="tiny") == second
    assert time.perf_counter() - started < 5 and (second.root / MARKER).stat().st_mtime_ns == marker


def test_fingerprint_depends_on_preset_and_a_half_set_is_not_complete(tmp_path):
    assert fingerprint("tiny") == fingerprint("tiny")
    assert fingerprint("tiny") != fingerprint("small")
    with pytest.raises(ValueError, match="preset"):
        fingerprint("huge")
    from shared.tiny_models import _is_complete

    (tmp_path / "half").mkdir()
    assert not _is_complete(tmp_path / "half", fingerprint("tiny"))


def test_ensure_and_resolve_use_the_cache_under_grace_home(cli_set, tmp_path, monkeypatch):
    from shared.settings import ServiceSettings

    monkeypatch.setenv("GRACE_HOME", str(tmp_path))
    cached = tmp_path / "models" / f"tiny-{fingerprint('tiny')[:12]}"
    shutil.copytree(cli_set.root, cached)  # a finished build in the cache is used as is
    started = time.perf_counter()
    assert ensure_model_set("tiny") == ModelSet.at(cached)
    assert time.perf_counter() - started < 5

    everything_local = resolve_models(ServiceSettings())
    assert everything_local == ModelSet.at(cached)

    mixed = resolve_models(ServiceSettings(policy_model="/models/policy", embedding_model="BAAI/bge-m3"))
    assert mixed.policy == mixed.general == mixed.tokenizer == Path("/models/policy")
    assert mixed.domain == cached / "domain"
    assert str(mixed.embedding) == "BAAI/bge-m3"

    configured = resolve_models(ServiceSettings(policy_model="/p", general_model="/g", domain_model="/d", embedding_model="/e"))
    assert (configured.policy, configured.general, configured.domain, configured.embedding) == (
        Path("/p"),
        Path("/g"),
        Path("/d"),
        Path("/e"),
    )
