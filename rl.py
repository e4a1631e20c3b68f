"""PRIME's advantage estimation and policy loss: RLOO on process and outcome rewards, PPO-clip.

Implements (docs/ALGORITHM.md §2.4-6, which follows the paper's code [O]):
  - the online accuracy filter (paper §3.3):        keep a prompt iff low ≤ mean_k r_o ≤ high
  - `batch_norm` of process rewards (code only):    p = q / (max |reward-to-go| over the batch + 1e-6)
  - leave-one-out (RLOO) returns (paper Eq. 4-5):   per source, s̃_t^i = (K s_t^i − Σ_j m_j)/(K−1)
    with m_j the mean of sample j's rewards on its mask, then a reverse (discounted) cumsum;
    process and outcome returns are summed 1:1
  - GRPO (paper Eq. 7) and REINFORCE (Eq. 8) with process rewards, as options
  - min-form credit (PURE, arXiv 2504.15275):       G_t = min_{t' ≥ t} r_t' instead of Σ_{t' ≥ t} r_t'
  - step-value advantages (VinePPO, arXiv 2410.01679): A_t = V(s_k) − V(s_{k−1}) on the tokens of step k
  - whitening over all valid tokens of the batch (code only)
  - the PPO-clip loss (paper Eq. 6), no KL term (the paper's coefficient is 0), no entropy bonus.
Pure tensor math: no models, no config object.

Shapes: P prompts, K samples per prompt (consecutive rows), B = P·K rows, T response positions.
`mask` is 1 on valid response tokens (up to and including the first EOS), 0 elsewhere.
"""
import torch


def accuracy_filter(r_o, K, low, high):
    """keep[p] = low ≤ mean_k r_o[p, k] ≤ high, both ends inclusive (ALGORITHM.md §6).

    Example: accuracy_filter(tensor([1., 0, 0, 0, 1, 1, 1, 1]), K=4, low=0.2, high=0.8)
             -> tensor([True, False])   (1/4 kept; 4/4 dropped)
    """
    acc = r_o.float().view(-1, K).mean(1)  # (P,)
    return (acc >= low) & (acc <= high)


def reverse_cumsum(x, gamma=1.0):
    """G_t = x_t + γ G_{t+1} along the last axis (the return-to-go)."""
    if gamma == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)  # (B, T)
    G = torch.zeros_like(x)  # (B, T)
    running = torch.zeros_like(x[..., 0])  # (B,)
    for t in reversed(range(x.shape[-1])):
        running = x[..., t] + gamma * running
        G[..., t] = running
    return G


def min_form_returns(r, mask):
    """Min-form credit (PURE: Cheng et al., 2025, arXiv 2504.15275): G_t = min_{t' ≥ t, mask_t' = 1} r_t'.

    The process return of a token is the smallest process reward still to come in its response,
    not their (discounted) sum `reverse_cumsum`: one high reward can no longer lift the return of
    every token before it, which the paper finds is how summed PRM rewards get hacked, and a
    return stays within the range of the rewards. No γ: a min does not discount.
    Masked positions take no part in the min (they may hold anything) and get return 0.
    This is the hard min of the paper's definition of the value. In practice the paper reaches
    min-form through a temperature-weighted (softmin) transform of the rewards followed by the usual
    sum, which tends to this min as the temperature goes to 0; that transform is not implemented
    here. PURE's rewards are per reasoning step; with PRIME's per-token q the min is over tokens.
    Example: min_form_returns(tensor([[0.3, -0.2, 0.5, 9.0]]), tensor([[1, 1, 1, 0]]))
             -> tensor([[-0.2, -0.2, 0.5, 0.0]])
    """
    assert r.is_floating_point(), f"process rewards must be floating point, got {r.dtype}"
    valid = mask.bool()  # (B, T)
    inf = torch.full_like(r, float("inf"))  # (B, T)
    future_min = torch.where(valid, r, inf).flip(-1).cummin(-1).values.flip(-1)  # (B, T) min over t' ≥ t
    return torch.where(valid, future_min, torch.zeros_like(r))  # (B, T)


def batch_norm(q, mask):
    """`prime_norm=batch_norm` ([O], ALGORITHM.md §2.4): q / (max_{i,t} |Σ_{s≥t} q_s^i| + 1e-6).

    The maximum is over every reward-to-go of the whole batch, so afterwards |process return| ≤ 1.
    """
    q = q * mask  # (B, T)
    scale = reverse_cumsum(q).abs().max()  # () largest |return-to-go| in the batch
    return q / (scale + 1e-6)  # (B, T)


def last_token_mask(mask):
    """1 at each row's last valid token (EOS, or the last token when truncated), else 0."""
    T = mask.shape[1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    last = (idx * mask).argmax(1, keepdim=True)  # (B, 1) position of the last valid token
    return torch.zeros_like(mask).scatter(1, last, 1) * (mask.sum(1, keepdim=True) > 0)  # (B, T)


def rloo_token_scores(s, m, K):
    """The code's leave-one-out line (ALGORITHM.md §4.2 step 2), for one reward source.

    s: (B, T) rewards, m: (B, T) that source's mask. m_i = mean of row i's rewards on its mask;
    s̃_t^i = (K·s_t^i − Σ_{j in group} m_j)/(K − 1) on the mask, 0 elsewhere. For the outcome
    (a single token) this is exactly r_o^i − mean_{j≠i} r_o^j (paper Eq. 4).
    """
    B, T = s.shape
    s = s * m
    mean_i = s.sum(1) / m.sum(1).clamp_min(1)  # (B,)
    group_sum = mean_i.view(B // K, K).sum(1, keepdim=True)  # (P, 1) Σ_j m_j
    group_sum = group_sum.expand(B // K, K).reshape(B, 1)  # (B, 1)
    return (K * s - group_sum) / (K - 1) * m  # (B, T)


def rloo_returns(p, r_o, mask, K, gamma_process=1.0, gamma_outcome=1.0, process_credit="sum"):
    """Returns-to-go from RLOO on process rewards `p` and outcomes `r_o`, summed 1:1 (ALGORITHM.md §4.2).

    p: (B, T) process rewards (already normalised) or None for the outcome-only baseline;
    r_o: (B,) outcome scores, placed at each row's last valid token.
    process_credit: "sum" (PRIME) gives the process part as the discounted sum of the leave-one-out
    scores still to come; "min" (PURE's min-form) as their minimum (`min_form_returns`; no γ).
    The leave-one-out line maps a row's scores by one affine map with a positive scale
    (K/(K−1)·s − const), so taking it before or after the min gives the same returns.
    """
    B, T = mask.shape
    assert K >= 2 and B % K == 0, f"need K >= 2 and whole groups: B={B}, K={K}"
    mask = mask.to(torch.float32)
    last = last_token_mask(mask)  # (B, T)
    outcome = r_o.to(torch.float32).view(B, 1) * last  # (B, T) r_o at the last valid token
    returns = reverse_cumsum(rloo_token_scores(outcome, last, K), gamma_outcome)  # (B, T)
    if p is not None:
        s = rloo_token_scores(p.float(), mask, K)  # (B, T) leave-one-out process scores
        assert process_credit in ("sum", "min"), f"process_credit must be sum or min, got {process_credit!r}"
        returns = returns + (reverse_cumsum(s, gamma_process) if process_credit == "sum" else min_form_returns(s, mask))
    return returns * mask  # (B, T)


def grpo_returns(p, r_o, mask, K, gamma_process=1.0, eps=1e-6):
    """GRPO with PRIME (paper Eq. 7, ALGORITHM.md §4.3): group-normalised outcome plus a process return
    with baseline mean_j m_j and scale std_j m_j, m_j = sample j's mean process reward.

    The outcome term is a per-sample constant, added on every valid token. `std` is unbiased
    (torch's default, as in common GRPO code); eps keeps an all-equal group finite.
    """
    B, T = mask.shape
    mask = mask.to(torch.float32)
    ro = r_o.to(torch.float32).view(B // K, K)  # (P, K)
    A_o = (ro - ro.mean(1, keepdim=True)) / (ro.std(1, keepdim=True) + eps)  # (P, K)
    returns = A_o.reshape(B, 1) * mask  # (B, T)
    if p is not None:
        p = p.float() * mask
        m = (p.sum(1) / mask.sum(1).clamp_min(1)).view(B // K, K)  # (P, K) mean process reward
        mu = m.mean(1, keepdim=True).expand(B // K, K).reshape(B, 1)  # (B, 1)
        sd = m.std(1, keepdim=True).expand(B // K, K).reshape(B, 1)  # (B, 1)
        returns = returns + reverse_cumsum((p - mu) / (sd + eps) * mask, gamma_process)
    return returns * mask  # (B, T)


def reinforce_returns(p, r_o, mask, gamma_process=1.0):
    """REINFORCE with PRIME (paper Eq. 8, ALGORITHM.md §4.3): r_o + Σ_{s≥t} γ^{s−t} r_φ(y_s), no baseline."""
    mask = mask.to(torch.float32)
    returns = r_o.to(torch.float32).view(-1, 1) * mask  # (B, T)
    if p is not None:
        returns = returns + reverse_cumsum(p.float() * mask, gamma_process)
    return returns * mask  # (B, T)


def leave_one_out_mean(x, K):
    """mean_{j≠i} x_j over each row's group of K (consecutive rows): RLOO's baseline of row i.

    Example: leave_one_out_mean(tensor([1., 0, 0, 1]), K=2) -> tensor([0., 1., 1., 0.])
    """
    g = x.float().view(-1, K)  # (P, K)
    return ((g.sum(1, keepdim=True) - g) / (K - 1)).flatten()  # (B,)


def step_value_advantages(v0, values, ends, n_steps, r_o, mask):
    """Step-local advantages from state values (`--reward-mode mc-value`; VinePPO, arXiv 2410.01679;
    ALGORITHM.md §12).

    Response i has n_i = n_steps[i] steps; step k (1-based) ends before token ends[i, k−1]
    (exclusive, non-decreasing). V(s_0) = v0[i] is the value before the response, V(s_k) =
    values[i, k−1] the value after step k, and the response's own outcome r_o[i] the value after
    it. Every token of step k (ends[k−2] ≤ t < ends[k−1], with 0 before step 1) gets
    V(s_k) − V(s_{k−1}), and every token after the last step (the box, the EOS) r_o − V(s_n): the
    advantage of the step the token is in, not a reward-to-go. Columns k ≥ n_i of `values` and
    `ends` are ignored. Over the steps a response's advantages telescope to r_o − V(s_0), RLOO's
    outcome advantage when V(s_0) is the group's leave-one-out mean, given that a step that ends
    the response (no token after it) has V = r_o, the value of a finished response.
    Example: step_value_advantages(tensor([0.5]), tensor([[1.0, 0.25]]), tensor([[2, 4]]), tensor([2]),
                                   tensor([0.]), torch.ones(1, 6))
             -> tensor([[0.5, 0.5, -0.75, -0.75, -0.25, -0.25]])   (steps t 0-1, 2-3; box 4-5)
    """
    B, T = mask.shape
    S = values.shape[1]
    t = torch.arange(T, device=mask.device)  # (T,)
    counted = torch.arange(S, device=mask.device) < n_steps.view(B, 1)  # (B, S) the response's own steps
    done = (ends.view(B, 1, S) <= t.view(1, T, 1)) & counted.view(B, 1, S)  # (B, T, S) step k ended at or before t
    seg = done.sum(-1)  # (B, T) steps finished before token t: t is in step seg+1, or after the last
    v_ext = torch.cat([v0.view(B, 1), values, torch.zeros(B, 1, dtype=values.dtype, device=values.device)], 1).float()  # (B, S+2)
    v_ext = v_ext.scatter(1, n_steps.view(B, 1).long() + 1, r_o.view(B, 1).float())  # (B, S+2) r_o after step n_i
    A = v_ext.gather(1, seg + 1) - v_ext.gather(1, seg)  # (B, T) V(s_{seg+1}) − V(s_seg)
    return A * mask  # (B, T)


def masked_whiten(x, mask):
    """A = (x − μ) / sqrt(σ² + 1e-8) with μ and the unbiased σ² over all valid tokens (ALGORITHM.md §4.2)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n  # ()
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp_min(1)  # () unbiased, as [O]
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask  # (B, T)


def ppo_clip_loss(logp, logp_old, A, mask, eps_clip, agg="seq-mean-token-mean"):
    """PPO-clip (paper Eq. 6, ALGORITHM.md §5): ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)).

    ρ_t = exp(log π_θ(y_t) − log π_old(y_t)). `agg`: "seq-mean-token-mean" = mean over rows of
    each row's token mean ([O], whose micro-batches held one sequence); "token-mean" = mean over
    all valid tokens of the batch ([R]). Returns (loss, stats) with the clip fraction and the
    approximate KL(π_old ‖ π_θ) on valid tokens.
    """
    mask = mask.to(logp.dtype)
    log_ratio = logp - logp_old  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T) ρ_t
    pg1 = -A * ratio  # (B, T)
    pg2 = -A * torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip)  # (B, T)
    per_token = torch.maximum(pg1, pg2)  # (B, T)
    if agg == "seq-mean-token-mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    elif agg == "token-mean":
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}: use 'seq-mean-token-mean' or 'token-mean'")
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        stats = {
            "clipfrac": (((pg2 > pg1).to(mask.dtype)) * mask).sum().item() / n.item(),
            "approx_kl": (((ratio - 1) - log_ratio) * mask).sum().item() / n.item(),
        }
    return loss, stats
