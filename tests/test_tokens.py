"""Tokens and masks: BOS policy, padding side, positions, valid masks, target lookup."""

from __future__ import annotations

import pytest
import torch

from mechlens import DataError, MechlensError, TokenError, encode, single_token_id, target_positions

TEXTS = ["I like oat milk in my coffee", "Hello world"]


def test_bos_policy_and_positions(gpt2_pair):
    m = gpt2_pair.bridge
    with_bos = encode(m, TEXTS, bos=True)
    without = encode(m, TEXTS, bos=False)
    assert with_bos.tokens[:, 0].tolist() == [50256, 50256]
    assert with_bos.tokens[0, 1:].tolist() == [40, 588, 267, 265, 7545, 287, 616, 6891]
    assert without.tokens[0].tolist() == [40, 588, 267, 265, 7545, 287, 616, 6891]
    assert without.positions[1].tolist() == [0, 1, -1, -1, -1, -1, -1, -1]
    assert not with_bos.text_mask[:, 0].any()  # BOS is not text
    assert with_bos.valid_mask(exclude_first=True).sum() == with_bos.text_mask.sum()
    assert without.valid_mask(exclude_first=True).sum() == without.text_mask.sum() - 2


def test_left_and_right_padding_give_the_same_positions(gpt2_pair):
    m = gpt2_pair.bridge
    right = encode(m, TEXTS, bos=True, padding_side="right")
    left = encode(m, TEXTS, bos=True, padding_side="left")
    for r in range(2):
        assert (
            right.tokens[r][right.attention_mask[r].bool()].tolist()
            == left.tokens[r][left.attention_mask[r].bool()].tolist()
        )
        assert sorted(right.positions[r][right.text_mask[r]].tolist()) == sorted(
            left.positions[r][left.text_mask[r]].tolist()
        )
    assert left.attention_mask[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_masked_lm_gets_its_special_tokens(roberta_pair):
    m = roberta_pair.bridge
    b = encode(m, ["I like coffee"], bos=True)
    assert b.tokens[0].tolist() == [0, 44, 588 + 4, 6891 + 4, 2]
    assert b.text_mask[0].tolist() == [False, True, True, True, False]
    with pytest.raises(MechlensError, match="bos=True"):
        encode(m, ["I like coffee"], bos=False)


def test_bad_input_errors(gpt2_pair):
    m = gpt2_pair.bridge
    with pytest.raises(DataError, match="fewer than 5 tokens"):
        encode(m, TEXTS, bos=False, min_tokens=5)
    with pytest.raises(MechlensError, match="padding_side"):
        encode(m, TEXTS, bos=False, padding_side="middle")
    with pytest.raises(DataError, match="no texts"):
        encode(m, [], bos=False)


def test_single_token_lookup(gpt2_pair):
    m = gpt2_pair.bridge
    assert single_token_id(m, " coffee") == 6891
    with pytest.raises(TokenError, match="not one"):
        single_token_id(m, " oat milk")
    with pytest.raises(TokenError, match="outside the vocabulary"):
        single_token_id(m, 10**6)


def test_target_positions(gpt2_pair):
    m = gpt2_pair.bridge
    b = encode(m, ["Hot coffee, cold coffee", "no target here"], bos=True, padding_side="left")
    pos = target_positions(b, 6891)
    assert pos[:, 0].tolist() == [0, 0]
    assert all(b.tokens[r, c] == 6891 for r, c in pos.tolist())
    assert torch.equal(b.positions[pos[:, 0], pos[:, 1]], torch.tensor([2, 5]))
