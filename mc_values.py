"""Monte-Carlo step values: `--reward-mode mc-value`, the true bound of dense credit on the embedded task.

VinePPO (Kazemnejad et al., 2024, arXiv 2410.01679) gives each reasoning step the advantage
V(s_k) − V(s_{k−1}), where s_k is the response up to the end of step k and V(s) is the current
policy's chance of finishing right from s, estimated by sampling continuations of s. Here:

  - the steps are the embedded task's `;`-ended pieces (tasks.label_batch); state s_k is the
    prompt and the response's tokens through the token that ends step k (`step_states`);
  - V(s_k), k ≥ 1: m = --mc-samples continuations of s_k sampled from π_θ (sampling.generate, the
    rollouts' temperature, at most --max-new-tokens minus the prefix's response tokens; calls of
    at most --gen-batch rows, or P·K, the rollout's batch, when it is 0), scored by
    the outcome verifier against the prompt's row, averaged (`estimate_values`). States with the
    same prompt and prefix tokens (the K samples of a prompt often share their first steps) are
    estimated once; VinePPO does not deduplicate, the estimator per distinct state is the same.
    A state that is the whole response (cut at the length limit right after a step) is terminal:
    V = the response's own r_o, nothing is sampled;
  - V(s_0) = the mean outcome of the prompt's other K−1 samples (RLOO's baseline: K−1 draws from
    s_0 that exist already), and the value after the response is its own r_o;
  - advantages: rl.step_value_advantages, then rl.masked_whiten over the batch (ALGORITHM.md §12).

`mc_advantages` is block 6 of the loop for this mode. Under torchrun each rank estimates its share
of the distinct states and the values are gathered, so every rank gets the same advantages.

It must not touch: optimizers, the PRM adapter, or the config beyond reading it.
"""
import time

import torch

import parallel
import rl
import sampling
from tasks import verify_batch


def step_states(batch, labelled):
    """The states to estimate, each once, and where each response's steps end.

    `labelled`: tasks.label_batch of the batch (per row: labels, the steps' token ranges, the
    box's range, the number of valid tokens). Step k of row i ends before token e = its range's
    end (a token shared with the next step belongs to this one). Returns
      states:  the distinct non-terminal states, each (i, e): row i's prompt (its valid tokens) and
               resp[i, :e], i the first row that has it; in order of first appearance
      ends:    (B, S) long, ends[i, k] = e of step k+1 of row i (0 beyond its steps), S = most steps
      n_steps: (B,) long, the steps of each row
      index:   per row, per step, the index of its state in `states`, or -1 for a terminal state
               (e = the row's valid length: the response ended there; its value is r_o)
    Example: two rows of one prompt, "1+1=2;2+1=3;..." and "1+1=2;2+2=4;..." (character tokens) ->
             states [(0, 6), (0, 12), (1, 12)], index [[0, 1], [0, 2]]: the first step is one state
    """
    B = batch.B
    key_of, states, index, ends_list = {}, [], [], []
    for i, (labels, spans, box, n) in enumerate(labelled):
        prompt = tuple(batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist())
        resp = batch.resp[i, :n].tolist()
        ends = [j for _, j in spans]
        row = []
        for e in ends:
            if e >= n:
                row.append(-1)
                continue
            key = (prompt, tuple(resp[:e]))
            if key not in key_of:
                key_of[key] = len(states)
                states.append((i, e))
            row.append(key_of[key])
        index.append(row)
        ends_list.append(ends)
    S = max([len(e) for e in ends_list], default=0)
    ends = torch.zeros(B, S, dtype=torch.long)  # (B, S)
    for i, e in enumerate(ends_list):
        ends[i, :len(e)] = torch.tensor(e, dtype=torch.long)
    n_steps = torch.tensor([len(e) for e in ends_list], dtype=torch.long)  # (B,)
    return states, ends, n_steps, index


def continuation_batches(batch, states, m, per_call, max_new_tokens, pad_id):
    """The generate() calls that sample m continuations of each state: a list of (which, ids,
    mask, budget), one per call. Rows: the states in order of length (similar lengths share a
    call: less padding, and a call of short continuations ends early), each state's m copies
    consecutive (generate shares one prefill across consecutive identical rows), `per_call` rows a
    call (the last one fewer). which (n,): the state
    of each row (an index into `states`); ids, mask (n, L): the prompt's valid tokens and the
    response's first e tokens, left-padded to the call's longest row L; budget (n,): the tokens
    each row may still add, max_new_tokens − e, as a rollout of the whole response would.
    """
    if not states:
        return []
    length = [int(batch.prompt_mask[i].sum()) + e for i, e in states]
    order = sorted(range(len(states)), key=lambda s: length[s])
    rows = [s for s in order for _ in range(m)]
    out = []
    for c in range(0, len(rows), per_call):
        which = rows[c:c + per_call]
        L = max(length[s] for s in which)
        ids = torch.full((len(which), L), pad_id, dtype=batch.prompt_ids.dtype, device=batch.prompt_ids.device)  # (n, L)
        mask = torch.zeros(len(which), L, dtype=batch.prompt_mask.dtype, device=batch.prompt_mask.device)  # (n, L)
        for r, s in enumerate(which):
            i, e = states[s]
            seq = torch.cat([batch.prompt_ids[i][batch.prompt_mask[i].bool()], batch.resp[i, :e]])  # (length,)
            ids[r, L - len(seq):] = seq
            mask[r, L - len(seq):] = 1
        budget = torch.tensor([max_new_tokens - states[s][1] for s in which], device=ids.device)  # (n,)
        out.append((torch.tensor(which), ids, mask, budget))
    return out


def estimate_values(model, tok, batch, states, cfg, verify=None):
    """V of each state (N,): the mean outcome of cfg.mc_samples continuations sampled from the active
    adapter (the policy) and verified against the state's prompt row; and counts and timings.

    A generate() call samples at most --gen-batch rows, or P·K (a rollout's batch) when that is 0:
    the KV cache stays the size the memory plan counts for rollouts, and one call of all the
    continuations (~1200 rows on the tiny default) took 22 s where calls of 128 took 6.4 s (its
    rows all run as long as the longest one, the short continuations of late steps included)."""
    verify = verify or verify_batch
    m, K = cfg.mc_samples, cfg.K
    which_all, texts, rows = [], [], []
    t_gen, n_tok = 0.0, 0
    per_call = cfg.gen_batch or cfg.P * cfg.K
    for which, ids, am, budget in continuation_batches(batch, states, m, per_call, cfg.max_new_tokens,
                                                       tok.pad_token_id):
        t = time.time()
        cont, cmask = sampling.generate(model, tok, ids, am, int(budget.max()), cfg.temperature,
                                        merged=cfg.merged_rollout, decode=cfg.decode)  # (n, T'), (n, T')
        t_gen += time.time() - t
        cmask = cmask * (torch.arange(cont.shape[1], device=cont.device) < budget.view(-1, 1))  # (n, T') each row's own limit
        n_tok += int(cmask.sum())
        full = []
        for r, s in enumerate(which.tolist()):
            i, e = states[s]
            full.append(batch.resp[i, :e].tolist() + cont[r][cmask[r].bool()].tolist())  # the whole response
            rows.append(batch.rows[i // K])
        texts += tok.batch_decode(full, skip_special_tokens=True)
        which_all.append(which)
    t = time.time()
    scores = verify(rows, texts, 1, cfg.verify_workers, cfg.sandbox)[0] if texts else torch.zeros(0)  # (N·m,)
    t_ver = time.time() - t
    values = torch.zeros(len(states))  # (N,)
    if texts:
        values.index_add_(0, torch.cat(which_all), scores.float())
    return values / m, {"mc_states": len(states), "mc_rollouts": len(texts), "mc_tokens": n_tok,
                        "t_mc": t_gen, "t_mc_verify": t_ver}


def blame_shares(labelled, r_o, A_raw):
    """On the wrong responses (r_o = 0): the share of their tokens in right steps (right and
    following the chain), which is the share of outcome-only's blame those steps get (it blames
    every token alike), and the share of the negative mass of the step-value advantages A_raw
    (B, T) that falls on right steps. Step k's tokens are those between the ends of steps k−1 and
    k, as in rl.step_value_advantages. NaN where there is nothing to share."""
    tok_all = tok_right = neg_all = neg_right = 0.0
    for i, (labels, spans, box, n) in enumerate(labelled):
        if r_o[i].item() != 0:
            continue
        neg = A_raw[i, :n].clamp(max=0)  # (n,)
        tok_all += n
        neg_all += neg.sum().item()
        start = 0
        for step, (_, e) in zip(labels.steps, spans):
            if step.right and step.follows:
                tok_right += e - start
                neg_right += neg[start:e].sum().item()
            start = e
    nan = float("nan")
    return {"blame_right_outcome": tok_right / tok_all if tok_all else nan,
            "blame_right_mc": neg_right / neg_all if neg_all else nan}


def mc_advantages(model, tok, batch, labelled, cfg, verify=None):
    """Block 6 of `--reward-mode mc-value`: step values from continuations, step-local advantages,
    whitened over the batch like every other mode's (VinePPO uses them raw; whitening gives every
    arm the same step size). Returns A (B, T) and the step's stats (counts, timings, blame shares,
    mc_v_spread = mean |V(s_k) − V(s_{k−1})| over the batch's steps)."""
    model.set_adapter("policy")  # the continuations are the current policy's
    states, ends, n_steps, index = step_states(batch, labelled)
    a, b = parallel.share(len(states))  # one process: all of them
    values, st = estimate_values(model, tok, batch, states[a:b], cfg, verify)
    values = torch.tensor(parallel.gather_objects(values.tolist()), dtype=torch.float32)  # (N,) every rank's states
    names = ["mc_states", "mc_rollouts", "mc_tokens"]
    st.update(zip(names, (int(x) for x in parallel.sum_values([st[k] for k in names]))))
    v0 = rl.leave_one_out_mean(batch.r_o, cfg.K)  # (B,) V(s_0)
    V = torch.zeros(ends.shape)  # (B, S) V(s_k) for k = 1..n_i
    for i, row in enumerate(index):
        for k, s in enumerate(row):
            V[i, k] = float(batch.r_o[i]) if s < 0 else values[s]
    r_o = batch.r_o.float().cpu()
    A_raw = rl.step_value_advantages(v0.cpu(), V, ends, n_steps, r_o, batch.mask.cpu())  # (B, T)
    diffs = [abs(V[i, k] - (V[i, k - 1] if k else v0[i])).item() for i in range(batch.B) for k in range(len(index[i]))]
    st["mc_v_spread"] = sum(diffs) / len(diffs) if diffs else float("nan")
    st.update(blame_shares(labelled, r_o, A_raw))
    valid = batch.mask.cpu().sum(1) > 0  # (B,)
    out_only = (r_o - v0.cpu())[valid]  # outcome-only's return at the first token: r_o − mean_{j≠i} r_o^j
    st["ret_outcome"] = out_only.abs().mean().item() if valid.any() else float("nan")
    st["ret_process"] = (A_raw[valid, 0] - out_only).abs().mean().item() if valid.any() else 0.0
    A = rl.masked_whiten(A_raw.to(batch.mask.device), batch.mask)  # (B, T)
    return A, st
