"""Formula tests for the pure functions in `prm.py` and `rl.py` (docs/ALGORITHM.md §2-6, §11).

Every expected value is either computed by hand (numbers in comments) or by a plain Python loop
over floats written from docs/ALGORITHM.md, never by calling the module's own helpers. Tiny tensors, CPU.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prm  # noqa: E402
import rl  # noqa: E402

TOL = 1e-5


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=TOL):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def assert_tensor_matches(actual, expected_rows, what, tol=TOL):
    """actual: (B, T) tensor; expected_rows: list of lists of floats."""
    assert list(actual.shape) == [len(expected_rows), len(expected_rows[0])], f"{what}: shape {tuple(actual.shape)}"
    for i, row in enumerate(expected_rows):
        for j, e in enumerate(row):
            a = actual[i, j].item()
            assert close(a, e, tol), f"{what}[{i},{j}] = {a}, expected {e}"


def lengths(mask_rows):
    return [int(sum(r)) for r in mask_rows]


def loop_reverse_return(x_row, gamma):
    """G_t = x_t + gamma * G_{t+1}, plain loop."""
    G = [0.0] * len(x_row)
    running = 0.0
    for k in range(len(x_row) - 1, -1, -1):
        running = x_row[k] + gamma * running
        G[k] = running
    return G


# A shared tiny batch: P=2 prompts, K=3 samples each, T=5 positions, right padding, rows of
# different lengths (one row truncated = full mask, none empty).
MASK = [
    [1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1],
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0],
    [1, 1, 1, 0, 0],
]
# Process rewards; values off the mask are deliberately non-zero garbage (must be ignored).
P_REW = [
    [0.3, -0.1, 0.2, 9.0, 9.0],
    [0.05, 0.4, -0.3, 0.1, 0.25],
    [-0.2, 7.0, 7.0, 7.0, 7.0],
    [0.1, 0.1, -5.0, -5.0, -5.0],
    [0.0, -0.25, 0.5, 0.15, 3.0],
    [0.2, 0.3, -0.1, 4.0, 4.0],
]
R_O = [1.0, 0.0, 1.0, 0.4, 0.0, 1.0]
K3 = 3


# --------------------------------------------------------------------------------------------
# prm.implicit_rewards (ALGORITHM.md §2.1-2.3)
# --------------------------------------------------------------------------------------------

def test_implicit_rewards_is_log_ratio_on_mask_and_exactly_zero_off_mask():
    logp_phi = t([[-1.0, -2.0, -0.5, -3.0], [-0.1, -4.0, -2.5, -1.0]])
    logp_ref = t([[-1.5, -1.0, -0.5, -0.2], [-0.3, -3.0, -9.0, -7.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    q = prm.implicit_rewards(logp_phi, logp_ref, mask)
    # hand: row 0: 0.5, -1.0, 0.0, (off) ; row 1: 0.2, -1.0, (off), (off)
    assert_tensor_matches(q, [[0.5, -1.0, 0.0, 0.0], [0.2, -1.0, 0.0, 0.0]], "q")
    off = mask == 0
    assert torch.all(q[off] == 0.0), f"q must be exactly 0 off the mask, got {q[off]}"


def test_implicit_rewards_zero_when_prm_equals_reference():
    # zero-initialised LoRA: PRM == reference at step 0 -> every process reward is 0 (ALGORITHM.md §11)
    logp = t([[-1.3, -0.2, -5.0], [-0.7, -2.2, -0.01]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    q = prm.implicit_rewards(logp, logp.clone(), mask)
    assert torch.all(q == 0.0), f"identical models must give q == 0 everywhere, got {q}"


# --------------------------------------------------------------------------------------------
# prm.ce_loss (ALGORITHM.md §3.1)
# --------------------------------------------------------------------------------------------

def loop_ce(q_rows, r_o, mask_rows, beta):
    total = 0.0
    for qr, y, mr in zip(q_rows, r_o, mask_rows):
        x = beta * sum(qv * mv for qv, mv in zip(qr, mr))
        sig = 1.0 / (1.0 + math.exp(-x))
        total += -(y * math.log(sig) + (1.0 - y) * math.log(1.0 - sig))
    return total / len(r_o)


def test_ce_loss_equals_plain_loop_bce_of_sigmoid_beta_masked_sum_incl_soft_label():
    q_rows = [[2.0, -1.0, 3.0, 50.0], [-4.0, 1.0, 0.0, 0.0], [10.0, 5.0, -2.0, 1.0], [0.5, 0.5, -100.0, 7.0]]
    mask_rows = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    r_o = [1.0, 0.0, 0.4, 1.0]  # 0.4 = fractional code pass rate, used as a soft label
    beta = 0.05
    loss = prm.ce_loss(t(q_rows), t(r_o), t(mask_rows), beta)
    expected = loop_ce(q_rows, r_o, mask_rows, beta)
    assert close(loss.item(), expected), f"ce_loss {loss.item()} != plain-loop BCE {expected}"


def test_ce_loss_single_sample_hand_value():
    # one sample, Σq = 20 on the mask, β = 0.05 -> x = 1; label 1 -> loss = -log σ(1) = log(1 + e^-1)
    loss = prm.ce_loss(t([[15.0, 5.0, 123.0]]), t([1.0]), t([[1, 1, 0]]), 0.05)
    assert close(loss.item(), math.log(1.0 + math.exp(-1.0))), f"got {loss.item()}"


def test_ce_loss_gradient_negative_for_correct_positive_for_wrong_zero_off_mask():
    beta = 0.05
    q = t([[1.0, -2.0, 0.5, 3.0], [0.3, 0.7, 8.0, 8.0], [-1.0, 2.0, 2.0, 2.0]]).requires_grad_(True)
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    r_o = t([1.0, 0.0, 1.0])
    prm.ce_loss(q, r_o, mask, beta).backward()
    g = q.grad
    for i, y in enumerate(r_o.tolist()):
        for j in range(q.shape[1]):
            if mask[i, j] == 0:
                assert g[i, j].item() == 0.0, f"gradient off the mask must be exactly 0, got {g[i, j]} at {(i, j)}"
            elif y == 1.0:
                assert g[i, j].item() < 0, f"r_o=1: raising q must lower the loss; grad {g[i, j]} at {(i, j)}"
            else:
                assert g[i, j].item() > 0, f"r_o=0: raising q must raise the loss; grad {g[i, j]} at {(i, j)}"
    # magnitude, by hand: d loss/d q_t = β (σ(β Σq) − r_o) / B on valid tokens
    for i, y in enumerate(r_o.tolist()):
        x = beta * sum(q[i, j].item() * mask[i, j].item() for j in range(q.shape[1]))
        want = beta * (1.0 / (1.0 + math.exp(-x)) - y) / q.shape[0]
        assert close(g[i, 0].item(), want), f"row {i}: grad {g[i, 0].item()} != β(σ−r_o)/B = {want}"


# --------------------------------------------------------------------------------------------
# prm.pairwise_accuracy = dpo_acc (ALGORITHM.md §3.2)
# --------------------------------------------------------------------------------------------

def _pa(sums, r_o, K=4):
    """q with one valid token per row holding the desired Σq, plus masked-out garbage."""
    q = t([[s, 99.0] for s in sums])
    mask = t([[1, 0]] * len(sums))
    return prm.pairwise_accuracy(q, t(r_o), mask, K)


def test_pairwise_accuracy_perfect_ranking_is_one():
    assert close(_pa([3.0, -1.0, 2.0, -5.0], [1.0, 0.0, 1.0, 0.0]), 1.0)


def test_pairwise_accuracy_reversed_ranking_is_zero():
    assert close(_pa([-3.0, 1.0, -2.0, 5.0], [1.0, 0.0, 1.0, 0.0]), 0.0)


def test_pairwise_accuracy_group_without_outcome_difference_is_half():
    assert close(_pa([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]), 0.5)
    assert close(_pa([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]), 0.5)


def test_pairwise_accuracy_fractional_outcomes_weight_pairs_by_abs_delta():
    # r_o = [1, .4, .4, 0], Σq = [3, 1, 2, 2.5]
    # pairs (i<j) with Δr≠0: (0,1) w.6 ✓, (0,2) w.6 ✓, (0,3) w1 ✓, (1,3) w.4 ✗ (1<2.5), (2,3) w.4 ✗ (2<2.5)
    # (1,2) has Δr = 0 -> not counted.  acc = (.6+.6+1)/(.6+.6+1+.4+.4) = 2.2/3
    got = _pa([3.0, 1.0, 2.0, 2.5], [1.0, 0.4, 0.4, 0.0])
    assert close(got, 2.2 / 3.0), f"got {got}, expected 2.2/3"


def test_pairwise_accuracy_tie_in_sum_q_counts_as_wrong():
    # r_o = [1, 0, 0, 0], Σq = [1, 1, 0, 0]: pair (0,1) has ΔΣq = 0 whose sign ≠ sign(Δr) -> wrong.
    # pairs: (0,1) ✗, (0,2) ✓, (0,3) ✓ (all weight 1) -> 2/3
    got = _pa([1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    assert close(got, 2.0 / 3.0), f"got {got}"


def test_pairwise_accuracy_is_mean_over_groups():
    # group 0 perfect (1), group 1 reversed (0), group 2 all-equal (0.5), group 3 the 2.2/3 case
    sums = [3.0, -1.0, 2.0, -5.0] + [-3.0, 1.0, -2.0, 5.0] + [1.0, 2.0, 3.0, 4.0] + [3.0, 1.0, 2.0, 2.5]
    r_o = [1.0, 0.0, 1.0, 0.0] + [1.0, 0.0, 1.0, 0.0] + [1.0] * 4 + [1.0, 0.4, 0.4, 0.0]
    got = _pa(sums, r_o)
    want = (1.0 + 0.0 + 0.5 + 2.2 / 3.0) / 4.0
    assert close(got, want), f"got {got}, expected mean over groups {want}"


def test_pairwise_accuracy_ignores_tokens_off_mask():
    q = t([[1.0, -50.0], [0.0, 50.0], [0.5, 50.0], [-1.0, 50.0]])
    mask = t([[1, 0], [1, 0], [1, 0], [1, 0]])
    # on the mask: Σq = [1, 0, .5, -1] with r_o = [1, 0, 1, 0] -> perfect
    assert close(prm.pairwise_accuracy(q, t([1.0, 0.0, 1.0, 0.0]), mask, 4), 1.0)


# --------------------------------------------------------------------------------------------
# rl.accuracy_filter (ALGORITHM.md §6)
# --------------------------------------------------------------------------------------------

def test_accuracy_filter_band_edges_inclusive_with_k5():
    # K=5: means 0/5, 1/5=0.2, 2/5, 3/5, 4/5=0.8, 5/5
    groups = [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    r_o = t([v for g in groups for v in g])
    keep = rl.accuracy_filter(r_o, 5, 0.2, 0.8).tolist()
    assert keep == [False, True, True, True, True, False], f"0.2 and 0.8 are inclusive edges; got {keep}"


def test_accuracy_filter_k4_drops_all_wrong_and_all_right_keeps_one_to_three():
    groups = [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]]
    r_o = t([v for g in groups for v in g])
    keep = rl.accuracy_filter(r_o, 4, 0.2, 0.8).tolist()
    assert keep == [False, True, True, True, False], f"got {keep}"


def test_accuracy_filter_uses_group_mean_of_fractional_scores():
    # code pass rates: means 0.1 (drop), 0.5 (keep), 0.85 (drop)
    r_o = t([0.1, 0.1, 0.1, 0.1, 0.5, 0.25, 0.75, 0.5, 0.85, 0.85, 0.85, 0.85])
    keep = rl.accuracy_filter(r_o, 4, 0.2, 0.8).tolist()
    assert keep == [False, True, False], f"got {keep}"


def test_accuracy_filter_groups_are_consecutive_rows_and_band_is_monotone():
    r_o = t([1, 1, 0, 0, 1, 1, 1, 1])  # group 0: 2/4, group 1: 4/4 (not interleaved)
    assert rl.accuracy_filter(r_o, 4, 0.2, 0.8).tolist() == [True, False]
    # widening the band never drops a group that a narrower band kept
    r = t([0, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    narrow = rl.accuracy_filter(r, 4, 0.3, 0.6)
    wide = rl.accuracy_filter(r, 4, 0.0, 1.0)
    assert torch.all(wide | ~narrow), f"narrow {narrow} wide {wide}"
    assert torch.all(wide), "[0, 1] keeps every group"


# --------------------------------------------------------------------------------------------
# rl.batch_norm (ALGORITHM.md §2.4)
# --------------------------------------------------------------------------------------------

def loop_batch_norm(q_rows, mask_rows):
    masked = [[qv * mv for qv, mv in zip(qr, mr)] for qr, mr in zip(q_rows, mask_rows)]
    biggest = 0.0
    for row in masked:
        for k in range(len(row)):
            biggest = max(biggest, abs(sum(row[k:])))
    return [[v / (biggest + 1e-6) for v in row] for row in masked]


def test_batch_norm_equals_plain_loop_over_max_abs_return_to_go():
    out = rl.batch_norm(t(P_REW), t(MASK))
    assert_tensor_matches(out, loop_batch_norm(P_REW, MASK), "batch_norm")


def test_batch_norm_hand_value():
    # row 0 valid [1, -3]: returns-to-go [-2, -3]; row 1 valid [2, 0.5]: [2.5, 0.5] -> max |.| = 3
    q = t([[1.0, -3.0, 100.0], [2.0, 0.5, 0.0]])
    out = rl.batch_norm(q, t([[1, 1, 0], [1, 1, 1]]))
    s = 3.0 + 1e-6
    assert_tensor_matches(out, [[1 / s, -3 / s, 0.0], [2 / s, 0.5 / s, 0.0]], "batch_norm")


def test_batch_norm_caps_all_returns_to_go_at_one_and_respects_mask():
    out = rl.batch_norm(t(P_REW), t(MASK))
    for i, mrow in enumerate(MASK):
        row = out[i].tolist()
        for k in range(len(row)):
            assert abs(sum(row[k:])) <= 1.0 + 1e-6, f"|return-to-go| > 1 at {(i, k)}"
            if mrow[k] == 0:
                assert row[k] == 0.0, f"batch_norm output must be 0 off the mask at {(i, k)}"
    best = max(abs(sum(out[i].tolist()[k:])) for i in range(len(MASK)) for k in range(len(MASK[0])))
    assert close(best, 1.0, 1e-4), f"the largest |return-to-go| should become ~1, got {best}"


# --------------------------------------------------------------------------------------------
# rl.rloo_returns (ALGORITHM.md §4.1-4.2, §11)
# --------------------------------------------------------------------------------------------

def loop_outcome_advantage(r_o, K):
    """A_o^i = r_o^i − mean_{j≠i} r_o^j  (paper Eq. 4)."""
    out = []
    for g in range(len(r_o) // K):
        grp = r_o[g * K:(g + 1) * K]
        for i in range(K):
            out.append(grp[i] - sum(grp[j] for j in range(K) if j != i) / (K - 1))
    return out


def loop_rloo_process_scores(p_rows, mask_rows, K):
    """ALGORITHM.md §4.2 steps 1-2: m_i = mean of p on the mask; s̃_t^i = (K p_t^i − Σ_j m_j)/(K−1) on mask."""
    m = []
    for pr, mr in zip(p_rows, mask_rows):
        n = sum(mr)
        m.append(sum(pv for pv, mv in zip(pr, mr) if mv) / n)
    out = []
    for i, (pr, mr) in enumerate(zip(p_rows, mask_rows)):
        g = i // K
        gsum = sum(m[g * K:(g + 1) * K])
        out.append([(K * pv - gsum) / (K - 1) if mv else 0.0 for pv, mv in zip(pr, mr)])
    return out, m


def loop_rloo_returns(p_rows, r_o, mask_rows, K, gamma_p=1.0, gamma_o=1.0):
    T = len(mask_rows[0])
    A_o = loop_outcome_advantage(r_o, K)
    rows = []
    for i, mr in enumerate(mask_rows):
        last = max(k for k in range(T) if mr[k])
        outcome = [A_o[i] if k == last else 0.0 for k in range(T)]
        G = loop_reverse_return(outcome, gamma_o)
        rows.append(G)
    if p_rows is not None:
        s, _ = loop_rloo_process_scores(p_rows, mask_rows, K)
        for i in range(len(rows)):
            Gp = loop_reverse_return(s[i], gamma_p)
            rows[i] = [a + b for a, b in zip(rows[i], Gp)]
    return [[v if mv else 0.0 for v, mv in zip(row, mr)] for row, mr in zip(rows, mask_rows)]


def test_rloo_outcome_only_is_leave_one_out_constant_on_valid_tokens_and_zero_off_mask():
    R = rl.rloo_returns(None, t(R_O), t(MASK), K3)
    A_o = loop_outcome_advantage(R_O, K3)
    # hand check of two entries: group 0 r=[1,0,1]: A_0 = 1 − 0.5 = 0.5, A_1 = 0 − 1 = −1
    assert close(A_o[0], 0.5) and close(A_o[1], -1.0)
    for i, mr in enumerate(MASK):
        for k, mv in enumerate(mr):
            want = A_o[i] if mv else 0.0
            assert close(R[i, k].item(), want), f"returns[{i},{k}] = {R[i, k].item()}, expected {want}"
            if not mv:
                assert R[i, k].item() == 0.0, f"returns must be exactly 0 off the mask at {(i, k)}"


def test_rloo_process_matches_plain_loop_of_the_code_line_plus_reverse_cumsum():
    R = rl.rloo_returns(t(P_REW), t(R_O), t(MASK), K3)
    assert_tensor_matches(R, loop_rloo_returns(P_REW, R_O, MASK, K3), "rloo_returns")


def test_rloo_process_return_at_first_token_equals_paper_eq5_form():
    # G_1^i = Σ_t p_t^i − L_i·(1/(K−1)) Σ_{j≠i} m_j  + A_o^i   (ALGORITHM.md §4.2: "returns at the first token equal the paper's")
    R = rl.rloo_returns(t(P_REW), t(R_O), t(MASK), K3)
    _, m = loop_rloo_process_scores(P_REW, MASK, K3)
    A_o = loop_outcome_advantage(R_O, K3)
    L = lengths(MASK)
    for i in range(len(MASK)):
        g = i // K3
        others = sum(m[j] for j in range(g * K3, (g + 1) * K3) if j != i)
        sum_p = sum(pv for pv, mv in zip(P_REW[i], MASK[i]) if mv)
        want = sum_p - L[i] * others / (K3 - 1) + A_o[i]
        assert close(R[i, 0].item(), want), f"row {i}: G_1 = {R[i, 0].item()} vs paper Eq.5 form {want}"


def test_rloo_process_per_token_scores_differ_from_paper_after_first_token():
    # The code's LOO adds (p_t − m_i)/(K−1) per token (zero-sum per sequence): for t>1 the returns
    # generally differ from the paper's Σ_{s≥t}[p_s − (1/(K−1))Σ_{j≠i} m_j]. Checks the implementation
    # follows the code line (ALGORITHM.md §11) rather than the paper at later tokens.
    R = rl.rloo_returns(t(P_REW), t([0.0] * 6), t(MASK), K3)
    _, m = loop_rloo_process_scores(P_REW, MASK, K3)
    i, k = 1, 2
    others = sum(m[j] for j in range(0, 3) if j != i)
    valid = [pv for pv, mv in zip(P_REW[i], MASK[i]) if mv]
    paper = sum(valid[k:]) - (len(valid) - k) * others / (K3 - 1)
    code = sum(valid[k:]) - (len(valid) - k) * others / (K3 - 1) + sum(v - m[i] for v in valid[k:]) / (K3 - 1)
    assert not close(paper, code), "test data should separate the two forms"
    assert close(R[i, k].item(), code), f"got {R[i, k].item()}, code form {code}, paper form {paper}"


def test_rloo_process_with_gamma_below_one_matches_plain_loop():
    R = rl.rloo_returns(t(P_REW), t(R_O), t(MASK), K3, gamma_process=0.9)
    assert_tensor_matches(R, loop_rloo_returns(P_REW, R_O, MASK, K3, gamma_p=0.9), "rloo γ_p=0.9")
    R2 = rl.rloo_returns(t(P_REW), t(R_O), t(MASK), K3, gamma_process=0.7, gamma_outcome=0.5)
    assert_tensor_matches(R2, loop_rloo_returns(P_REW, R_O, MASK, K3, 0.7, 0.5), "rloo γ_p=0.7 γ_o=0.5")


def test_rloo_outcome_gamma_discounts_from_last_valid_token():
    # one group K=2, r_o=[1, 0] -> A_o=[1, −1]; γ_o = 0.5, lengths 3 and 2
    R = rl.rloo_returns(None, t([1.0, 0.0]), t([[1, 1, 1, 0], [1, 1, 0, 0]]), 2, gamma_outcome=0.5)
    assert_tensor_matches(R, [[0.25, 0.5, 1.0, 0.0], [-0.5, -1.0, 0.0, 0.0]], "outcome γ=0.5")


def test_rloo_leave_one_out_baseline_excludes_own_sample():
    base = list(R_O)
    delta = 0.3
    for i in range(len(base)):
        bumped = list(base)
        bumped[i] += delta
        R0 = rl.rloo_returns(t(P_REW), t(base), t(MASK), K3)
        R1 = rl.rloo_returns(t(P_REW), t(bumped), t(MASK), K3)
        diff = R1 - R0
        g = i // K3
        for r in range(len(MASK)):
            if r // K3 != g:
                want = 0.0
            elif r == i:
                want = delta
            else:
                want = -delta / (K3 - 1)
            for k, mv in enumerate(MASK[r]):
                w = want if mv else 0.0
                assert close(diff[r, k].item(), w), (
                    f"bumping r_o[{i}] by {delta}: returns[{r},{k}] changed by {diff[r, k].item()}, expected {w}")


def test_rloo_first_token_returns_sum_to_zero_over_a_group_when_lengths_are_equal():
    # Outcome LOO advantages always sum to 0 over a group; the process part at t=1 is
    # Σ_i L_i (m_i − mean_{j≠i} m_j), which is 0 when all L_i are equal.
    R_out = rl.rloo_returns(None, t(R_O), t(MASK), K3)
    for g in range(len(MASK) // K3):
        s = sum(R_out[g * K3 + i, 0].item() for i in range(K3))
        assert abs(s) < 1e-5, f"group {g}: Σ_i A_o^i = {s}, expected 0"
    eq_mask = [[1, 1, 1, 0, 0]] * 6
    R = rl.rloo_returns(t(P_REW), t(R_O), t(eq_mask), K3)
    for g in range(len(eq_mask) // K3):
        s = sum(R[g * K3 + i, 0].item() for i in range(K3))
        assert abs(s) < 1e-5, f"group {g}: Σ_i G_1^i = {s}, expected 0 with equal lengths"


# --------------------------------------------------------------------------------------------
# rl.masked_whiten (ALGORITHM.md §4.2 step 5)
# --------------------------------------------------------------------------------------------

def test_masked_whiten_mean_zero_unbiased_variance_one_on_valid_tokens_zero_off_mask():
    x_rows = [[1.0, 2.0, 3.0, 50.0], [-1.0, 0.5, -40.0, -40.0], [4.0, 0.0, 2.0, 1.0]]
    mask_rows = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    A = rl.masked_whiten(t(x_rows), t(mask_rows))
    vals = [x for xr, mr in zip(x_rows, mask_rows) for x, mv in zip(xr, mr) if mv]
    n = len(vals)
    mu = sum(vals) / n
    var = sum((v - mu) ** 2 for v in vals) / (n - 1)
    expected = [[(x - mu) / math.sqrt(var + 1e-8) if mv else 0.0 for x, mv in zip(xr, mr)]
                for xr, mr in zip(x_rows, mask_rows)]
    assert_tensor_matches(A, expected, "masked_whiten")
    out = [A[i, k].item() for i, mr in enumerate(mask_rows) for k, mv in enumerate(mr) if mv]
    m_out = sum(out) / n
    v_out = sum((v - m_out) ** 2 for v in out) / (n - 1)
    assert abs(m_out) < 1e-5, f"whitened mean over valid tokens = {m_out}"
    assert abs(v_out - 1.0) < 1e-5, f"whitened unbiased variance over valid tokens = {v_out}"
    for i, mr in enumerate(mask_rows):
        for k, mv in enumerate(mr):
            if not mv:
                assert A[i, k].item() == 0.0, f"whitened value off the mask must be 0 at {(i, k)}"


# --------------------------------------------------------------------------------------------
# rl.ppo_clip_loss (ALGORITHM.md §5)
# --------------------------------------------------------------------------------------------

EPS = 0.2
# ratios chosen on both sides of the clip band, for A>0 and A<0; row lengths differ.
RATIOS = [[1.5, 0.5, 1.1, 3.0], [1.5, 0.5, 0.9, 1.0], [0.7, 1.3, 2.0, 0.1]]
ADV = [[1.0, 2.0, -1.0, 5.0], [-2.0, -1.0, 0.5, 1.0], [-0.5, 0.5, 0.0, 3.0]]
PPO_MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
# per valid token, by hand (ℓ = max(−Aρ, −A·clip(ρ, .8, 1.2))):
#  (0,0) A=1  ρ=1.5 -> max(−1.5, −1.2) = −1.2   clipped (A>0, ρ>1.2)
#  (0,1) A=2  ρ=0.5 -> max(−1.0, −1.6) = −1.0   not clipped (pessimistic side)
#  (0,2) A=−1 ρ=1.1 -> max(1.1, 1.1)   =  1.1   inside band
#  (1,0) A=−2 ρ=1.5 -> max(3.0, 2.4)   =  3.0   not clipped
#  (1,1) A=−1 ρ=0.5 -> max(0.5, 0.8)   =  0.8   clipped (A<0, ρ<0.8)
#  (1,2) A=.5 ρ=0.9 -> −0.45 inside;  (1,3) A=1 ρ=1.0 -> −1.0 inside
#  (2,0) A=−.5 ρ=0.7 -> max(0.35, 0.4) = 0.4    clipped (A<0, ρ<0.8)
#  (2,1) A=.5 ρ=1.3 -> max(−0.65, −0.6) = −0.6  clipped (A>0, ρ>1.2)
#  (2,2) A=0  ρ=2.0 -> 0
HAND_TOKEN_LOSS = [[-1.2, -1.0, 1.1, None], [3.0, 0.8, -0.45, -1.0], [0.4, -0.6, 0.0, None]]
HAND_CLIPPED = {(0, 0), (1, 1), (2, 0), (2, 1)}  # off-mask (0,3) ρ=3 A=5 would be clipped too


def _ppo_inputs(requires_grad=False):
    logp_old = t([[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.8, -2.0, -1.0], [-1.2, -0.4, -3.0, -2.0]])
    logp = (logp_old + torch.log(t(RATIOS))).detach()
    if requires_grad:
        logp.requires_grad_(True)
    return logp, logp_old, t(ADV), t(PPO_MASK)


def loop_ppo_token_loss():
    out = []
    for rr, ar, mr in zip(RATIOS, ADV, PPO_MASK):
        row = []
        for rho, a, mv in zip(rr, ar, mr):
            clipped = min(max(rho, 1 - EPS), 1 + EPS)
            row.append(max(-a * rho, -a * clipped) if mv else None)
        out.append(row)
    return out


def test_ppo_plain_loop_token_losses_agree_with_hand_values():
    loop = loop_ppo_token_loss()
    for i, row in enumerate(HAND_TOKEN_LOSS):
        for k, v in enumerate(row):
            if v is not None:
                assert close(loop[i][k], v), f"hand table wrong at {(i, k)}"


def test_ppo_seq_mean_token_mean_is_mean_over_rows_of_row_token_means():
    logp, logp_old, A, mask = _ppo_inputs()
    loss, _ = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS)  # default agg
    row_means = [sum(v for v in row if v is not None) / sum(1 for v in row if v is not None)
                 for row in loop_ppo_token_loss()]
    want = sum(row_means) / len(row_means)
    assert close(loss.item(), want), f"seq-mean-token-mean {loss.item()} != {want}"
    loss2, _ = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS, agg="seq-mean-token-mean")
    assert close(loss2.item(), want), "explicit agg must equal the default"


def test_ppo_token_mean_is_mean_over_all_valid_tokens():
    logp, logp_old, A, mask = _ppo_inputs()
    loss, _ = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS, agg="token-mean")
    vals = [v for row in loop_ppo_token_loss() for v in row if v is not None]
    want = sum(vals) / len(vals)
    assert close(loss.item(), want), f"token-mean {loss.item()} != {want}"
    seq, _ = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS, agg="seq-mean-token-mean")
    assert not close(seq.item(), loss.item()), "with unequal row lengths the two aggregations must differ"


def test_ppo_gradient_zero_for_tokens_clipped_in_direction_of_advantage():
    logp, logp_old, A, mask = _ppo_inputs(requires_grad=True)
    loss, _ = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS, agg="token-mean")
    loss.backward()
    g = logp.grad
    n_valid = sum(sum(r) for r in PPO_MASK)
    for i, mr in enumerate(PPO_MASK):
        for k, mv in enumerate(mr):
            if not mv or (i, k) in HAND_CLIPPED:
                assert g[i, k].item() == 0.0, f"grad must be 0 at {(i, k)} (clipped or off-mask), got {g[i, k]}"
            else:
                # unclipped: d(−Aρ)/d logp = −Aρ, averaged over valid tokens
                want = -ADV[i][k] * RATIOS[i][k] / n_valid
                assert close(g[i, k].item(), want), f"grad at {(i, k)} = {g[i, k].item()}, expected {want}"


def test_ppo_gradient_seq_mean_token_mean_weights_by_row_length():
    logp, logp_old, A, mask = _ppo_inputs(requires_grad=True)
    loss, _ = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS)
    loss.backward()
    B = len(PPO_MASK)
    for i, mr in enumerate(PPO_MASK):
        L = sum(mr)
        for k, mv in enumerate(mr):
            want = 0.0 if (not mv or (i, k) in HAND_CLIPPED) else -ADV[i][k] * RATIOS[i][k] / (B * L)
            assert close(logp.grad[i, k].item(), want), f"grad at {(i, k)} = {logp.grad[i, k].item()}, want {want}"


def test_ppo_clipfrac_matches_hand_count_on_valid_tokens():
    logp, logp_old, A, mask = _ppo_inputs()
    _, stats = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS)
    n_valid = sum(sum(r) for r in PPO_MASK)
    assert close(stats["clipfrac"], len(HAND_CLIPPED) / n_valid), f"clipfrac {stats['clipfrac']} != 4/{n_valid}"


def test_ppo_no_clipping_and_zero_loss_grad_equals_minus_advantage_when_ratio_is_one():
    logp_old = t([[-1.0, -2.0], [-0.5, -0.7]])
    logp = logp_old.clone().requires_grad_(True)
    A = t([[1.0, -2.0], [0.5, 3.0]])
    mask = t([[1, 1], [1, 0]])
    loss, stats = rl.ppo_clip_loss(logp, logp_old, A, mask, EPS, agg="token-mean")
    assert close(loss.item(), -(1.0 - 2.0 + 0.5) / 3.0), f"ρ=1: loss = −mean A, got {loss.item()}"
    assert stats["clipfrac"] == 0.0
    assert abs(stats["approx_kl"]) < 1e-7, "approx KL is 0 when π_θ == π_old"


def test_ppo_unknown_aggregation_raises_value_error():
    logp, logp_old, A, mask = _ppo_inputs()
    with pytest.raises(ValueError):
        rl.ppo_clip_loss(logp, logp_old, A, mask, EPS, agg="seq-sum")


# --------------------------------------------------------------------------------------------
# rl.grpo_returns (paper Eq. 7) and rl.reinforce_returns (paper Eq. 8), ALGORITHM.md §4.3
# --------------------------------------------------------------------------------------------

def loop_std_unbiased(xs):
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def loop_grpo(p_rows, r_o, mask_rows, K, gamma=1.0, eps=1e-6):
    T = len(mask_rows[0])
    m = [sum(pv for pv, mv in zip(pr, mr) if mv) / sum(mr) for pr, mr in zip(p_rows, mask_rows)] if p_rows else None
    out = []
    for i, mr in enumerate(mask_rows):
        g = i // K
        grp_r = r_o[g * K:(g + 1) * K]
        a_o = (r_o[i] - sum(grp_r) / K) / (loop_std_unbiased(grp_r) + eps)
        row = [a_o if mr[k] else 0.0 for k in range(T)]
        if p_rows is not None:
            grp_m = m[g * K:(g + 1) * K]
            mu, sd = sum(grp_m) / K, loop_std_unbiased(grp_m)
            x = [(p_rows[i][k] - mu) / (sd + eps) if mr[k] else 0.0 for k in range(T)]
            G = loop_reverse_return(x, gamma)
            row = [row[k] + (G[k] if mr[k] else 0.0) for k in range(T)]
        out.append(row)
    return out


def test_grpo_matches_plain_loop_of_eq7():
    R = rl.grpo_returns(t(P_REW), t(R_O), t(MASK), K3)
    assert_tensor_matches(R, loop_grpo(P_REW, R_O, MASK, K3), "grpo_returns", tol=1e-4)


def test_grpo_with_gamma_below_one_matches_plain_loop():
    R = rl.grpo_returns(t(P_REW), t(R_O), t(MASK), K3, gamma_process=0.8)
    assert_tensor_matches(R, loop_grpo(P_REW, R_O, MASK, K3, gamma=0.8), "grpo γ=0.8", tol=1e-4)


def test_grpo_outcome_only_hand_value_and_zero_off_mask():
    # group r_o = [1, 0, 0, 1]: mean .5, unbiased std = sqrt(4·.25/3) = sqrt(1/3) -> A = ±.5/sqrt(1/3)
    mask = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    R = rl.grpo_returns(None, t([1.0, 0.0, 0.0, 1.0]), t(mask), 4)
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    assert_tensor_matches(R, [[a, a, 0.0], [-a, 0.0, 0.0], [-a, -a, -a], [a, 0.0, 0.0]], "grpo outcome-only")


def test_grpo_all_equal_group_is_finite_and_zero():
    # all-equal outcomes and every token's process reward equal to the group's mean: std = 0 in both
    # terms, numerators are 0 too, eps keeps the result finite (0) instead of 0/0.
    R = rl.grpo_returns(t([[0.2, 0.2], [0.2, 0.2]]), t([1.0, 1.0]), t([[1, 1], [1, 1]]), 2)
    assert torch.isfinite(R).all(), f"eps must keep an all-equal group finite, got {R}"
    assert torch.all(R.abs() < 1e-6), f"all-equal outcomes and identical constant process rewards give 0, got {R}"


def loop_reinforce(p_rows, r_o, mask_rows, gamma=1.0):
    out = []
    for i, mr in enumerate(mask_rows):
        T = len(mr)
        row = [r_o[i] if mr[k] else 0.0 for k in range(T)]
        if p_rows is not None:
            x = [p_rows[i][k] if mr[k] else 0.0 for k in range(T)]
            G = loop_reverse_return(x, gamma)
            row = [row[k] + (G[k] if mr[k] else 0.0) for k in range(T)]
        out.append(row)
    return out


def test_reinforce_matches_plain_loop_of_eq8_no_baseline():
    R = rl.reinforce_returns(t(P_REW), t(R_O), t(MASK))
    assert_tensor_matches(R, loop_reinforce(P_REW, R_O, MASK), "reinforce_returns")
    R2 = rl.reinforce_returns(t(P_REW), t(R_O), t(MASK), gamma_process=0.6)
    assert_tensor_matches(R2, loop_reinforce(P_REW, R_O, MASK, 0.6), "reinforce γ=0.6")


def test_reinforce_hand_value():
    # r_o = 1, valid p = [0.5, -0.25, 1.0] -> returns [1 + 1.25, 1 + 0.75, 1 + 1.0, 0]
    R = rl.reinforce_returns(t([[0.5, -0.25, 1.0, 8.0]]), t([1.0]), t([[1, 1, 1, 0]]))
    assert_tensor_matches(R, [[2.25, 1.75, 2.0, 0.0]], "reinforce")
    R0 = rl.reinforce_returns(None, t([0.4]), t([[1, 1, 0]]))
    assert_tensor_matches(R0, [[0.4, 0.4, 0.0]], "reinforce outcome-only")
