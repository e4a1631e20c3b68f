"""Tests for `rl.min_form_returns` (PURE's min-form credit, arXiv 2504.15275): G_t = min_{t' ≥ t} r_t'.

Expected values come from a plain Python loop over floats or from hand computation, never from
the module's own helpers. Tiny tensors, CPU.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rl  # noqa: E402

# Rows of different lengths, one full, one empty, one with a hole (not made by the loop, but the
# definition covers it). Off the mask the rewards are deliberately garbage: huge of either sign.
MASK = [
    [1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1],
    [1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [1, 1, 0, 1, 0],
]
R = [
    [0.3, -0.1, 0.2, -9.0, 9.0],
    [0.05, 0.4, -0.3, 0.1, 0.25],
    [-0.2, -7.0, 7.0, -7.0, 7.0],
    [-5.0, 5.0, -5.0, 5.0, -5.0],
    [0.5, 0.2, -8.0, 0.4, -8.0],
]


def loop_min_form(r_row, m_row):
    """G_t = min of r_s over valid s ≥ t, 0 where m_t = 0: a plain loop over floats."""
    G = []
    for t in range(len(r_row)):
        future = [r_row[s] for s in range(t, len(r_row)) if m_row[s]]
        G.append(min(future) if m_row[t] else 0.0)
    return G


def test_min_form_returns_match_a_plain_python_loop():
    G = rl.min_form_returns(torch.tensor(R), torch.tensor(MASK))
    for i, (r_row, m_row) in enumerate(zip(R, MASK)):
        for t, expected in enumerate(loop_min_form(r_row, m_row)):
            assert abs(G[i, t].item() - expected) < 1e-6, f"G[{i},{t}] = {G[i, t].item()}, expected {expected}"


def test_min_form_hand_computed_row():
    # r = [0.05, 0.4, -0.3, 0.1, 0.25]: mins of the suffixes are -0.3, -0.3, -0.3, 0.1, 0.25.
    G = rl.min_form_returns(torch.tensor([R[1]]), torch.tensor([MASK[1]]))
    assert torch.allclose(G, torch.tensor([[-0.3, -0.3, -0.3, 0.1, 0.25]])), f"got {G}"


def test_masked_tokens_get_zero_and_do_not_enter_the_min():
    r = torch.tensor(R)
    G = rl.min_form_returns(r, torch.tensor(MASK))
    off = torch.tensor(MASK) == 0
    assert (G[off] == 0).all(), f"masked positions must get return 0, got {G[off]}"
    # Changing the rewards off the mask changes nothing.
    G2 = rl.min_form_returns(torch.where(off, -r * 100, r), torch.tensor(MASK))
    assert torch.equal(G, G2), "rewards off the mask changed the min-form returns"
    assert (G[3] == 0).all(), f"a row with no valid token must be all 0, got {G[3]}"


def test_single_valid_token_return_is_its_reward():
    G = rl.min_form_returns(torch.tensor([[-0.7, 3.0, 3.0]]), torch.tensor([[1, 0, 0]]))
    assert torch.allclose(G, torch.tensor([[-0.7, 0.0, 0.0]])), f"got {G}"


def test_all_equal_rewards_give_that_reward_on_every_valid_token():
    G = rl.min_form_returns(torch.full((2, 4), 0.25), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.allclose(G, torch.tensor([[0.25] * 4, [0.25, 0.25, 0.0, 0.0]])), f"got {G}"


def test_a_later_high_reward_does_not_lift_earlier_returns():
    # The point of min-form: with the sum, the 5.0 at t = 3 would raise the returns of t = 0..3.
    r = torch.tensor([[0.1, -0.4, 0.2, 5.0]])
    mask = torch.ones(1, 4)
    G = rl.min_form_returns(r, mask)
    assert torch.allclose(G, torch.tensor([[-0.4, -0.4, 0.2, 5.0]])), f"got {G}"
    # The sum-form returns would be 4.9, 4.8, 5.2, 5.0.


def test_min_form_returns_lie_between_the_row_min_and_the_own_reward():
    torch.manual_seed(0)
    r = torch.randn(6, 9)
    mask = (torch.arange(9) < torch.tensor([9, 1, 4, 7, 2, 5]).view(6, 1)).float()  # (B, T) prefixes
    G = rl.min_form_returns(r, mask)
    row_min = torch.where(mask.bool(), r, torch.full_like(r, float("inf"))).min(1, keepdim=True).values
    on = mask.bool()
    assert (G[on] <= r[on]).all(), "a return exceeds its own token's reward"
    assert (G >= row_min.expand_as(G))[on].all(), "a return is below the row's smallest reward"
    assert torch.equal(G[:, 0], row_min[:, 0]), "the first token's return must be the row's minimum"


def test_rloo_returns_with_min_credit_is_the_outcome_part_plus_the_min_of_leave_one_out_scores():
    """A plain loop: per group of K, each row's process scores K/(K-1)·p_t - Σ_j mean_j/(K-1) on its
    valid tokens; the process return at t is their minimum from t on; the outcome part is RLOO's."""
    K = 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    p = torch.tensor([[0.2, -0.4, 0.1, 5.0], [0.3, 0.1, -5.0, 5.0], [-0.1, 0.2, 0.0, 0.3], [0.4, 9.0, 9.0, 9.0]])
    r_o = torch.tensor([1.0, 0.0, 0.0, 1.0])
    got = rl.rloo_returns(p, r_o, mask, K, process_credit="min")
    outcome_only = rl.rloo_returns(None, r_o, mask, K)
    P, M = p.tolist(), mask.tolist()
    for g in range(2):
        rows = [2 * g, 2 * g + 1]
        means = [sum(P[i][t] for t in range(4) if M[i][t]) / sum(M[i]) for i in rows]
        for i in rows:
            valid = [t for t in range(4) if M[i][t]]
            s = {t: (K * P[i][t] - sum(means)) / (K - 1) for t in valid}
            for t in range(4):
                want = outcome_only[i, t].item() + (min(s[u] for u in valid if u >= t) if M[i][t] else 0.0)
                assert abs(got[i, t].item() - want) < 1e-6, (i, t, got[i, t].item(), want)
    summed = rl.rloo_returns(p, r_o, mask, K)
    assert not torch.allclose(summed, got), "min and sum credit differ on these rewards"
