"""The implicit process reward model (PRM): token rewards, its cross-entropy loss, its accuracy.

PRIME (Cui et al., 2025, arXiv 2502.01456) never trains a reward head. The PRM π_φ is a causal LM
like the policy, and its reward for a token is how much more likely π_φ finds it than the frozen
reference π_ref (paper Eq. 3, §3.1):

    q_t      = log π_φ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)       (the log-ratio)
    r_φ(y_t) = β · q_t                                                  (token / process reward)
    r_φ(y)   = β · Σ_t q_t                                              (sequence reward)

It is trained online from outcome labels only, with cross-entropy on σ(r_φ(y)) (Algorithm 1
line 8; docs/ALGORITHM.md §3.1). Pure tensor math: no models, no config object.

Shapes: P prompts, K samples per prompt (consecutive rows), B = P·K rows, T response positions.
`mask` is 1 on valid response tokens (up to and including the first EOS), 0 elsewhere.
"""
import torch
import torch.nn.functional as F


def implicit_rewards(logp_phi, logp_ref, mask):
    """q_t = log π_φ(y_t) − log π_ref(y_t) on valid tokens, 0 elsewhere (ALGORITHM.md §2.2-2.3).

    Token granularity, every valid token including EOS gets its q ([O]'s placement, ALGORITHM.md §2.3).
    β is *not* applied here: the policy sees q (normalised by `rl.batch_norm`), as in [O].
    Example: implicit_rewards(tensor([[-1., -2.]]), tensor([[-1.5, -1.]]), tensor([[1, 0]]))
             -> tensor([[0.5, 0.0]])
    """
    # where(), not a product: a padded position holding -inf would otherwise give nan.
    return torch.where(mask.bool(), logp_phi - logp_ref, torch.zeros_like(logp_phi))  # (B, T)


def ce_loss(q, r_o, mask, beta):
    """L_CE(φ) = −mean_i [ r_o log σ(β Σ_t q_t) + (1 − r_o) log(1 − σ(β Σ_t q_t)) ] (ALGORITHM.md §3.1).

    `r_o` may be fractional (a code pass rate): it is then a soft label.
    """
    r_phi = beta * (q * mask).sum(-1)  # (B,) sequence reward β Σ_t q_t
    # binary_cross_entropy_with_logits is the numerically stable form of BCE(σ(x), y).
    return F.binary_cross_entropy_with_logits(r_phi, r_o.to(r_phi.dtype))


@torch.no_grad()
def pairwise_accuracy(q, r_o, mask, K):
    """[O]'s `dpo_acc` (ALGORITHM.md §3.2): does the PRM rank a group's better samples higher?

    Within each group of K, over unordered pairs (i, j) with r_o^i ≠ r_o^j: the pair scores 1 when
    sign(Σq^i − Σq^j) == sign(r_o^i − r_o^j), weighted by |r_o^i − r_o^j|. A group with no
    outcome difference counts 0.5. Returns the mean over groups (a float in [0, 1]).
    """
    B = q.shape[0]
    assert B % K == 0, f"batch of {B} rows is not a whole number of groups of K={K}"
    s = (q * mask).sum(-1).view(B // K, K)  # (P, K) summed log-ratio per sample
    a = r_o.to(s.dtype).view(B // K, K)  # (P, K)
    ds = s.unsqueeze(2) - s.unsqueeze(1)  # (P, K, K) Σq^i − Σq^j
    da = a.unsqueeze(2) - a.unsqueeze(1)  # (P, K, K) r_o^i − r_o^j
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=q.device), diagonal=1)  # each pair once
    w = da.abs() * upper  # (P, K, K) pair weights, 0 for ties and the lower triangle
    correct = ((torch.sign(ds) == torch.sign(da)).to(s.dtype) * w).sum((1, 2))  # (P,)
    total = w.sum((1, 2))  # (P,)
    acc = torch.where(total > 0, correct / total.clamp_min(1e-12), torch.full_like(total, 0.5))  # (P,)
    return acc.mean().item()
