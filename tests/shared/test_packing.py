"""Token-budget packing: the one function behind the reward's forward batches and the trainer's micro-batches."""

from shared.packing import token_budget_batches


def assert_packed(lengths: list[int], batches: list[list[int]], max_tokens: int, max_waste: float) -> None:
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = lengths[b[0]]
        assert longest == max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= max_tokens
        real = sum(lengths[i] for i in b)
        assert len(b) * longest - real <= max_waste * real
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first


def test_batches_stay_within_budget_and_padding():
    lengths = [500, 120, 480, 130, 60, 900, 125, 61]
    batches = token_budget_batches(lengths, max_tokens=1000)
    assert_packed(lengths, batches, 1000, 0.1)
    assert [5] in batches  # over half the budget: alone
    assert [0, 2] in batches  # 500 + 480 pad 20 tokens (2%): one forward
    assert any(len(b) > 2 for b in batches)  # the short ones share a forward


def test_a_much_shorter_text_starts_a_new_batch_and_a_long_one_runs_alone():
    lengths = [10, 100, 95, 12, 50, 11]
    batches = token_budget_batches(lengths, max_tokens=220)
    assert_packed(lengths, batches, 220, 0.1)
    assert batches == [[1, 2], [4], [3, 5, 0]]
    assert token_budget_batches([300, 10], max_tokens=100) == [[0], [1]]
    assert token_budget_batches([], max_tokens=100) == []


def test_max_waste_zero_batches_only_equal_lengths():
    lengths = [7, 7, 6, 7]
    assert token_budget_batches(lengths, max_tokens=100, max_waste=0.0) == [[0, 1, 3], [2]]
