"""The scorer's model metrics against independent reference computations (tiny models, fp32)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.reward import metrics as M
from services.reward.scorer import Scorer
from tests.fixtures.reward import model_settings


def structured(summary: str, document: str, outline: str = "1. a\n2. b") -> str:
    return f"<summary>{summary}</summary>\n<outline>{outline}</outline>\n<answer>{document}</answer>"


DOC_SHORT = "The state-owned enterprise reform deepened market-oriented operating mechanisms this year."
DOC_OTHER = "国有企业改革深化提升行动取得积极成效，公司治理结构进一步完善。"


def reference_ppl(model_dir, tokens: list[int], prefix: int, window: int, stride: int) -> float:
    """Hugging Face's fixed-length perplexity recipe, one window at a time, labels masked with -100."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([[prefix, *tokens]])
    n = ids.shape[1]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        chunk = ids[:, begin:end]
        labels = chunk.clone()
        labels[:, : max(prev_end - begin, 0)] = -100
        with torch.no_grad():
            logits = model(chunk).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != -100
        nll += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
        prev_end = end
        if end == n:
            break
    assert count == len(tokens)
    return math.exp(nll / count)


def test_length_diversity_and_perplexities_match_a_plain_forward(reward_scorer, tiny_models):
    (metrics,) = reward_scorer.score([("q", [structured("s", DOC_SHORT)])])
    m = metrics[0]
    tok = AutoTokenizer.from_pretrained(str(tiny_models.tokenizer))
    tokens = tok(DOC_SHORT, add_special_tokens=False)["input_ids"]
    assert m.length == len(tokens)  # eq. 1
    assert m.diversity == pytest.approx(M.diversity(tokens, 2))  # eq. 2
    prefix = reward_scorer.prefix_id
    for model_dir, value in ((tiny_models.general, m.general_perplexity), (tiny_models.domain, m.domain_perplexity)):
        assert value == pytest.approx(
            reference_ppl(model_dir, tokens, prefix, reward_scorer.window, reward_scorer.stride), rel=1e-4
        )
    assert m.professionalism == pytest.approx(m.general_perplexity - m.domain_perplexity)  # eq. 3
    assert m.general_perplexity != m.domain_perplexity


def test_long_documents_use_a_sliding_window_not_truncation(tiny_models):
    scorer = Scorer(model_settings(tiny_models, dtype="fp32", ppl_window=64, ppl_stride=24, max_batch_tokens=256))
    document = " ".join([DOC_SHORT, DOC_OTHER] * 6)
    (metrics,) = scorer.score([("q", [structured("s", document), structured("s", DOC_SHORT)])])
    tok = AutoTokenizer.from_pretrained(str(tiny_models.tokenizer))
    tokens = tok(document, add_special_tokens=False)["input_ids"]
    assert len(tokens) > 3 * 64  # several windows
    assert metrics[0].length == len(tokens)
    expected = reference_ppl(tiny_models.general, tokens, scorer.prefix_id, 64, 24)
    assert metrics[0].general_perplexity == pytest.approx(expected, rel=1e-4)
    truncated = reference_ppl(tiny_models.general, tokens[:63], scorer.prefix_id, 64, 24)
    assert abs(metrics[0].general_perplexity - truncated) > 1e-3 * truncated


def test_relevance_matches_flagembedding_components_as_a_plain_sum(reward_scorer, tiny_models):
    from FlagEmbedding import BGEM3FlagModel

    query = "Write a report on deepening SOE reform"
    summary = "A report on SOE reform results."
    (metrics,) = reward_scorer.score([(query, [structured(summary, DOC_OTHER + DOC_SHORT)])])
    flag = BGEM3FlagModel(str(tiny_models.embedding), use_fp16=False, devices="cpu", normalize_embeddings=True)
    for passage, value, weights in (
        (summary, metrics[0].relevance_summary, M.SUMMARY_WEIGHTS),
        (DOC_OTHER + DOC_SHORT, metrics[0].relevance_document, M.DOCUMENT_WEIGHTS),
    ):
        ref = flag.compute_score([(query, passage)], max_passage_length=8192, weights_for_different_modes=list(weights))
        plain = weights[0] * ref["dense"][0] + weights[1] * ref["sparse"][0] + weights[2] * ref["colbert"][0]
        assert value == pytest.approx(plain, rel=1e-4, abs=1e-5)
        normalized = ref["colbert+sparse+dense"][0]  # FlagEmbedding divides by sum(weights): not the paper's R
        if abs(sum(weights) - 1.0) > 1e-6:
            assert value != pytest.approx(normalized, rel=1e-3)


def test_batching_and_padding_do_not_change_results(reward_scorer):
    groups = [
        ("q1", [structured("s1", DOC_SHORT), structured("s2", DOC_OTHER * 3), "no tags here"]),
        ("q2", [structured("s3", DOC_OTHER), structured("s1", DOC_SHORT + " " + DOC_SHORT * 4)]),
    ]
    together = reward_scorer.score(groups)
    alone = [reward_scorer.score([(q, [r])])[0][0] for q, rs in groups for r in rs]
    flat = [m for g in together for m in g]
    assert [m is None for m in flat] == [m is None for m in alone] == [False, False, True, False, False]
    for a, b in zip(flat, alone):
        if a is not None:
            for key, value in a.model_dump().items():
                assert value == pytest.approx(getattr(b, key), rel=1e-4, abs=1e-5), key


def test_identical_responses_tie_exactly_and_unparsed_are_none(reward_scorer):
    same = structured("s", DOC_OTHER)
    (metrics,) = reward_scorer.score([("q", [same, "", "<summary>x</summary> no answer", same, "<answer></answer>"])])
    assert metrics[1] is None and metrics[2] is None and metrics[4] is None
    assert metrics[0] == metrics[3]
