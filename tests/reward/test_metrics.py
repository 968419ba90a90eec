"""Hand-computed examples of every metric's math (paper eq. 1-4, 13-15)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from services.reward import metrics as M


def test_diversity_counts_unique_token_ngrams():
    tokens = [1, 2, 1, 2, 1]
    assert M.diversity(tokens, n=2) == pytest.approx(50.0)  # (1,2),(2,1),(1,2),(2,1): 2 unique of 4
    assert M.diversity(tokens, n=1) == pytest.approx(40.0)  # 2 unique of 5
    assert M.diversity([7, 8, 9], n=2) == pytest.approx(100.0)
    assert M.diversity([7], n=2) == 0.0  # no bigram at all
    assert M.diversity([], n=1) == 0.0


def test_perplexity_is_exp_of_mean_nll():
    assert M.perplexity(2 * math.log(2), 2) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


def test_sliding_windows_hand_example():
    spans = M.sliding_windows(10, window=4, stride=2)
    assert [(w.begin, w.end, w.target_start) for w in spans] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert [(w.begin, w.end, w.target_start) for w in M.sliding_windows(3, 8, 4)] == [(0, 3, 1)]
    with pytest.raises(ValueError):
        M.sliding_windows(10, window=4, stride=4)


@given(n=st.integers(1, 300), window=st.integers(2, 64), data=st.data())
def test_sliding_windows_score_every_position_once_with_context(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    spans = M.sliding_windows(n, window, stride)
    scored = [t for w in spans for t in range(w.target_start, w.end)]
    assert scored == list(range(1, n))  # every position but the first, once, in order: nothing truncated
    for w in spans:
        assert w.end - w.begin <= window and w.begin < w.target_start
        if w.begin > 0:
            assert w.target_start - w.begin >= window - stride  # overlap context kept


def test_dense_score_is_cosine_of_cls_states():
    assert M.dense_score(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])) == pytest.approx(0.96)


def test_token_weights_keep_the_max_per_token_and_skip_specials():
    assert M.token_weights([5, 6, 5, 0, 7], [0.1, 0.3, 0.4, 0.9, 0.0], skip={0}) == {5: 0.4, 6: 0.3}


def test_lexical_score_sums_products_of_shared_terms():
    assert M.lexical_score({1: 0.5, 2: 0.2}, {2: 0.4, 3: 1.0}) == pytest.approx(0.08)
    assert M.lexical_score({1: 0.5}, {2: 0.4}) == 0.0


def test_colbert_score_is_mean_of_best_matches():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalized inside
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert M.colbert_score(q, p) == pytest.approx((1.0 + 0.8) / 2)
    assert M.colbert_score(q, torch.zeros(0, 2)) == 0.0


def test_relevance_is_a_plain_weighted_sum():
    # eq. 4: not divided by the sum of weights as FlagEmbedding's compute_score does
    assert M.relevance(1.0, 0.5, 0.8, M.SUMMARY_WEIGHTS) == pytest.approx(1.0 + 0.15 + 0.8)
    assert M.relevance(1.0, 0.5, 0.8, M.DOCUMENT_WEIGHTS) == pytest.approx(0.15 + 0.25 + 0.28)
