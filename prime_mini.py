"""prime-mini: PRIME (Process Reinforcement through IMplicit REwards) on one machine.

Cui et al., 2025, arXiv 2502.01456. Online RL for reasoning with dense token rewards from an
*implicit* process reward model (PRM) trained online from outcome labels only. Algorithm 1:

    for each step:
      1. sample K responses per prompt from the policy π_θ               (rollout)
      2. score each with the outcome verifier r_o                          (verify)
      3. keep prompts whose accuracy is in [0.2, 0.8]; refill the batch    (filter)
      4. token rewards r_φ(y_t) = β log π_φ(y_t)/π_ref(y_t)                (implicit PRM)
      5. update the PRM π_φ with cross-entropy on r_o                      (PRM update)
      6. RLOO advantages from process and outcome rewards                  (advantages)
      7. PPO-clip update of the policy                                     (policy update)

One frozen base (the SFT model) carries two LoRA adapters: `policy` (π_θ) and `prm` (π_φ). The
base with adapters disabled is the reference π_ref. Both adapters start at zero, so at step 0
π_θ = π_φ = π_ref and every process reward is exactly 0, as in the paper (§5.1).

Run:  python prime_mini.py                 # tiny model, embedded task, CPU, a few minutes
      python prime_mini.py --help          # every Config field as a flag
      python prime_mini.py --preset qwen2.5-math-7b --plan-memory   # 7B in 4-bit: will it fit?
This file is the loop: `run()` below is Algorithm 1 in numbered blocks, and the functions above it
are its steps (collect = blocks 1-3, prm_step = 4-5, advantages = 6, policy_step = 7). The math
of those steps is in prm.py and rl.py (pure functions, tensors in and out); the rest is in flat
modules that the loop calls and that never import it:
    config.py       Config (every flag), presets, --faithful, checks before anything is built
    tasks.py        data rows, chat prompts, outcome scores r_o (verifiers.py, sandbox.py)
    sampling.py     generate, token_logprobs (log π(y_t | x, y_<t)), the Rollout batch
    models.py       the tiny model, real models (4-bit), the two adapters, the memory planner
    sft.py          the embedded default's SFT warm-up
    evaluation.py   held-out accuracy, the start report and the drop warning
    checkpoints.py  checkpoints, metrics.jsonl, TensorBoard
    experiments.py  `compare` and the token-reward page (`show-rewards`)
    mc_values.py    --reward-mode mc-value: Monte-Carlo step values from continuations (VinePPO)
The algorithm, formula by formula with the paper's equations and where the paper's code
differs, is written down in docs/ALGORITHM.md (cited below as ALGORITHM.md §N).

Paper symbol → variable → Config field
    π_θ (policy)              adapter "policy"        lora_r, lr_policy
    π_φ (implicit PRM)        adapter "prm"           prm_lora_r, lr_prm
    π_ref (reference)         adapters disabled       ref_type
    K                         K                       K
    β                         beta                    beta
    r_o                       r_o                     (verifiers.py)
    q_t = log π_φ/π_ref       q                       prime_norm, process_coef
    A_t                       A                       adv_estimator, gamma_process, gamma_outcome
    ε (PPO clip)              eps_clip                eps_clip

Departures from the paper's code [O], each an option; `--faithful` restores [O] in one flag:
    1. LoRA adapters on one frozen base instead of three full models (ALGORITHM.md §11); LoRA needs far
       larger learning rates than the paper's 5e-7 / 1e-6 full fine-tuning rates.
    2. Double-forward PRM rewards (`prm_update`, [R]'s default; [O]: single-forward), a PRM that
       learns 3x faster than the policy (`lr_prm`; [O]: 2x), half weight on process returns
       (`process_coef`; [O]: 1) and a 10-step PRM warm-up (`prm_warmup`; [O]: 0). On the tiny
       task [O]'s choices let the policy exploit an untrained PRM (docs/RESULTS.md, "Ablations").
    3. One policy update per iteration (`policy_minibatches`; [O]: 4).
"""
import dataclasses
import math
import os
import random
import sys
import time

import torch
from tqdm.auto import tqdm

import experiments
import mc_values
import parallel
import prm
import rl
from checkpoints import (latest_checkpoint, load_checkpoint, load_prm_init, make_logger, replace_folder, save_checkpoint,
                         write_json)
from config import check_run_dir_free, new_run_dir, parse_config, print_memory_plan, saved_config
from evaluation import (answered, drop_warning, evaluate, final_scored_samples, held_out_step_truth, start_report,
                        step_truth)
from models import ConfigError, add_adapters, adapter_params, keep_freed_memory, load_base, run_device
from sampling import Rollout, decode_responses, encode_prompts, generate, pad_cat, token_logprobs
from sft import SHIPPED_SFT, sft_path, sft_warmup
from tasks import (check_sandbox, drop_long_prompts, is_step_task, label_batch, load_rows, oracle_process_rewards,
                   prompt_text, verify_batch)


# ---------------------------------------------------------------------------------------------
# The RL loop, as the paper's Algorithm 1.
# ---------------------------------------------------------------------------------------------
class PromptStream:
    """Endless shuffled passes over the RL prompts (a new order each epoch), as row indices.
    Its position is part of a checkpoint: `state()` / `load_state()`."""

    def __init__(self, n, seed):
        self.n, self.rng, self.order, self.pos = n, random.Random(seed), [], 0

    def next(self):
        if self.pos == len(self.order):  # start a new epoch
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]

    def state(self):
        return {"rng": self.rng.getstate(), "order": self.order, "pos": self.pos}

    def load_state(self, st):
        self.rng.setstate(st["rng"])
        self.order, self.pos = list(st["order"]), st["pos"]


def collect(model, tok, cfg, train_rows, stream, buffer, device):
    """Blocks 1-3: sample K per prompt, verify, keep prompts with accuracy in the band.

    Generates batches of prompts (leftover prompts from the buffer first, ALGORITHM.md §6) until P
    groups pass the filter or `max_rollout_rounds` is reached; surplus passing prompts go back to
    the buffer (their rollouts are discarded, as in [O]). The first round has P prompts; a refill
    round has only as many as the missing groups need at this step's pass rate so far, plus 25%
    (at most P): a full round of P to fill the last few groups wasted most of its generation.
    The buffer and the stream hold indices into `train_rows`. Returns (Rollout or None, stats).
    """
    K = cfg.K
    kept, n_gen, n_correct, reasons, t_gen, t_ver = [], 0, 0.0, {}, 0.0, 0.0
    for _ in range(cfg.max_rollout_rounds):
        n = cfg.P if not kept else min(cfg.P, math.ceil(1.25 * (cfg.P - len(kept)) * (n_gen // K) / len(kept)))
        idx = [buffer.pop(0) if buffer else stream.next() for _ in range(n)]
        rows = [train_rows[i] for i in idx]
        texts = [prompt_text(tok, r["prompt"], r.get("ability")) for r in rows for _ in range(K)]  # K consecutive copies
        p_ids, p_mask = encode_prompts(tok, texts, device)
        a, b = parallel.share(n)  # this rank's prompts (all of them in one process)
        t = time.time()
        resp, mask = (generate(model, tok, p_ids[a * K:b * K], p_mask[a * K:b * K], cfg.max_new_tokens, cfg.temperature,
                               merged=cfg.merged_rollout, batch_size=cfg.gen_batch, decode=cfg.decode) if b > a else
                      (p_ids.new_zeros((0, 0)), torch.zeros((0, 0), device=device)))
        t_gen += time.time() - t
        t = time.time()
        outs = decode_responses(tok, resp, mask) if b > a else []
        r_o, why = verify_batch(rows[a:b], outs, K, cfg.verify_workers, cfg.sandbox) if b > a else (torch.zeros(0), {})
        t_ver += time.time() - t
        # Every rank's responses, scores and failure counts: the filter below sees the whole round.
        resp, mask = parallel.gather_rows(resp, tok.pad_token_id), parallel.gather_rows(mask, 0.0)  # (n*K, T)
        r_o, outs = parallel.gather_rows(r_o, 0.0), parallel.gather_objects(outs)  # (n*K,)
        for part in parallel.gather_objects([why]):
            for k, v in part.items():
                reasons[k] = reasons.get(k, 0) + v
        n_gen += len(outs)
        n_correct += r_o.sum().item()
        keep = rl.accuracy_filter(r_o, K, cfg.filter_low, cfg.filter_high)  # (P,)
        for g in keep.nonzero().flatten().tolist():
            sl = slice(g * K, (g + 1) * K)
            kept.append((idx[g], p_ids[sl], p_mask[sl], resp[sl], mask[sl], r_o[sl], outs[sl]))
        if len(kept) >= cfg.P:
            break
    buffer.extend(k[0] for k in kept[cfg.P:])  # surplus prompts are re-generated next step
    kept = kept[:cfg.P]
    stats = {"acc": n_correct / n_gen, "kept": len(kept), "generated": n_gen, "t_rollout": t_gen, "t_verify": t_ver, **{f"n_{k}": v for k, v in reasons.items()}}
    if not kept:
        return None, stats
    batch = Rollout(prompt_ids=pad_cat([k[1] for k in kept], left=True, value=tok.pad_token_id),
                    prompt_mask=pad_cat([k[2] for k in kept], left=True, value=0),
                    resp=pad_cat([k[3] for k in kept], left=False, value=tok.pad_token_id),
                    mask=pad_cat([k[4] for k in kept], left=False, value=0.0),
                    r_o=torch.cat([k[5] for k in kept]).to(device), rows=[train_rows[k[0]] for k in kept],
                    texts=[t for k in kept for t in k[6]])
    return batch, stats


def minibatches(n_groups, K, n):
    """Row ranges (start, end) of min(n, n_groups) mini-batches of whole groups, in order.

    The filter can keep fewer groups than asked for, or a number that `n` does not divide: the
    groups are dealt out as evenly as possible (sizes differ by at most one group), so no
    mini-batch is empty and a step never makes more than `n` optimizer steps.
    Example: minibatches(5, K=2, n=4) -> [(0, 4), (4, 6), (6, 8), (8, 10)]   (2, 1, 1, 1 groups)
    """
    n = min(n, n_groups)
    bounds, g = [], 0
    for k in range(n):
        size = n_groups // n + (1 if k < n_groups % n else 0)  # groups in mini-batch k
        bounds.append((g * K, (g + size) * K))
        g += size
    return bounds


def shared_logprobs(model, batch, cfg):
    """log-probs (B, T) of the batch's responses under the active adapter, without gradients.
    Under torchrun each rank computes its share of the rows (parallel.my_micro_batches)."""
    out = torch.zeros_like(batch.mask)  # (B, T)
    with torch.no_grad():
        for i, j in parallel.my_micro_batches(0, batch.B, cfg.micro_batch):
            out[i:j] = token_logprobs(model, *batch.slice(i, j), chunk=cfg.logprob_chunk)
    return parallel.sum_rows(out)


def prm_step(model, batch, logp_ref, cfg, opt_prm, labelled=None):
    """Blocks 4-5: implicit rewards q from the PRM, then its cross-entropy update (ALGORITHM.md §3).

    Single-forward (default): q is recorded from the same forward that the update uses, so the
    rewards come from the PRM before it saw this batch (mini-batch by mini-batch, as [O]).
    Double-forward: after the update, q is recomputed with the updated PRM. `none`: no update.
    Returns q (B, T) and stats, including the pairwise accuracy on this fresh batch before the
    update (does the PRM generalise?) and, with double-forward, after it (single-forward makes no
    forward for that statistic alone). With the batch's step labels (`labelled`,
    tasks.label_batch), also whether the fresh rewards point at the step that went wrong (step_*).
    """
    model.set_adapter("prm")  # the PRM adapter is active and trainable, the policy's is frozen
    B, K, micro = batch.B, cfg.K, cfg.micro_batch
    q, loss_sum = torch.zeros_like(batch.mask), 0.0  # (B, T); under torchrun each rank fills its micro-batches' rows
    for m0, m1 in minibatches(B // K, K, cfg.prm_minibatches):  # in order, not shuffled ([O])
        if cfg.prm_update != "none":
            opt_prm.zero_grad(set_to_none=True)
        for i, j in parallel.my_micro_batches(m0, m1, micro):  # one process: all of them; else this rank's share
            with torch.set_grad_enabled(cfg.prm_update != "none"):
                logp_phi = token_logprobs(model, *batch.slice(i, j), chunk=cfg.logprob_chunk)  # (b, T)
                q_ij = prm.implicit_rewards(logp_phi, logp_ref[i:j], batch.mask[i:j])  # (b, T)
                loss = prm.ce_loss(q_ij, batch.r_o[i:j], batch.mask[i:j], cfg.beta)
            if cfg.prm_update != "none":
                (loss * (j - i) / (m1 - m0)).backward()  # by its share of the mini-batch: the mini-batch's mean
            q[i:j] = q_ij.detach()
            loss_sum += loss.item() * (j - i) / B
        if cfg.prm_update != "none":
            parallel.sum_grads(opt_prm.param_groups[0]["params"])  # the whole mini-batch's gradient on every rank
            torch.nn.utils.clip_grad_norm_(opt_prm.param_groups[0]["params"], cfg.prm_grad_clip)
            opt_prm.step()
    q = parallel.sum_rows(q)  # (B, T) every rank's rows
    stats = {"prm_loss": parallel.sum_values([loss_sum])[0],
             "prm_acc_fresh": prm.pairwise_accuracy(q, batch.r_o, batch.mask, K)}
    if labelled:
        stats.update(step_truth(labelled, cfg.beta * q))  # (B, T) β·q_t before the update
    if cfg.prm_update == "double":  # single: no forward whose only use would be the ranking after the update
        t = time.time()
        logp_phi = shared_logprobs(model, batch, cfg)  # (B, T) the updated PRM
        stats["t_prm_recompute"] = time.time() - t
        q = prm.implicit_rewards(logp_phi, logp_ref, batch.mask)  # (B, T)
        stats["prm_acc_after"] = prm.pairwise_accuracy(q, batch.r_o, batch.mask, K)
    return q, stats


def advantages(q, batch, cfg, use_process):
    """Block 6: process rewards p from q, RLOO (or GRPO/REINFORCE) returns, whitening (ALGORITHM.md §4)."""
    K, mask = cfg.K, batch.mask
    p = None
    if use_process:
        p = rl.batch_norm(q, mask) if cfg.prime_norm == "batch_norm" else cfg.beta * q  # (B, T)
        p = cfg.process_coef * p
    if cfg.adv_estimator == "rloo":
        returns = rl.rloo_returns(p, batch.r_o, mask, K, cfg.gamma_process, cfg.gamma_outcome, cfg.process_credit)
    elif cfg.adv_estimator == "grpo":
        returns = rl.grpo_returns(p, batch.r_o, mask, K, cfg.gamma_process)
    else:
        returns = rl.reinforce_returns(p, batch.r_o, mask, cfg.gamma_process)
    A = rl.masked_whiten(returns, mask)  # (B, T)
    # Size of each source's return at the first token, to see how much the PRM steers.
    out_only = rl.rloo_returns(None, batch.r_o, mask, K, 1.0, cfg.gamma_outcome)[:, 0] if cfg.adv_estimator == "rloo" else None
    stats = {"ret_outcome": out_only.abs().mean().item() if out_only is not None else float("nan")}
    stats["ret_process"] = (returns[:, 0] - out_only).abs().mean().item() if (p is not None and out_only is not None) else 0.0
    return A, stats


def policy_step(model, batch, logp_old, A, cfg, opt_policy, gen):
    """Block 7: PPO-clip update of the policy adapter, over shuffled mini-batches (ALGORITHM.md §5).

    `logp_old=None` with a single mini-batch: π_old is the policy as it is now (nothing has been
    updated since the rollout), so its log-probs are the detached log-probs of this very forward
    and ρ = 1 exactly; that saves [O]'s separate recomputation forward and gives the same numbers.
    """
    assert logp_old is not None or cfg.policy_minibatches == 1, "logp_old is needed with several mini-batches"
    model.set_adapter("policy")
    B, micro = batch.B, cfg.micro_batch
    groups = torch.randperm(B // cfg.K, generator=gen)  # shuffle whole groups
    order = (groups.view(-1, 1) * cfg.K + torch.arange(cfg.K)).flatten()
    splits = minibatches(B // cfg.K, cfg.K, cfg.policy_minibatches)
    stats = {"pg_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    nll = 0.0  # Σ -log π_θ(y_t) over the batch's tokens: a sampled estimate of the policy's entropy
    for m0, m1 in splits:
        idx = order[m0:m1]
        n_tok = batch.mask[idx].sum()
        opt_policy.zero_grad(set_to_none=True)
        for i, j in parallel.my_micro_batches(0, len(idx), micro):  # one process: all of them; else this rank's share
            sub = idx[i:j]
            logp = token_logprobs(model, batch.prompt_ids[sub], batch.prompt_mask[sub], batch.resp[sub], batch.mask[sub],
                                  chunk=cfg.logprob_chunk)
            old = logp.detach() if logp_old is None else logp_old[sub]
            loss, st = rl.ppo_clip_loss(logp, old, A[sub], batch.mask[sub], cfg.eps_clip, cfg.loss_agg)
            # Each micro-batch by its share of its own mini-batch (rows, or valid tokens for
            # token-mean), so the summed gradient is that of the mini-batch's loss in one piece.
            w = len(sub) / len(idx) if cfg.loss_agg == "seq-mean-token-mean" else (batch.mask[sub].sum() / n_tok).item()
            (loss * w).backward()
            nll -= (logp.detach() * batch.mask[sub]).sum().item()
            stats["pg_loss"] += loss.item() * w / len(splits)
            stats["clipfrac"] += st["clipfrac"] * len(sub) / B
            stats["approx_kl"] += st["approx_kl"] * len(sub) / B
        parallel.sum_grads(opt_policy.param_groups[0]["params"])  # the whole mini-batch's gradient on every rank
        torch.nn.utils.clip_grad_norm_(opt_policy.param_groups[0]["params"], cfg.policy_grad_clip)
        opt_policy.step()
    names = list(stats)
    *sums, nll = parallel.sum_values([stats[k] for k in names] + [nll])  # over every rank's micro-batches
    stats = dict(zip(names, sums))
    stats["entropy"] = nll / batch.mask.sum().item()  # nats per response token (each row is in one mini-batch)
    return stats


def fmt_step(step, cfg, m):
    s = (f"step {step}/{cfg.steps} | acc {m['acc']:.3f} | kept {m['kept']}/{cfg.P} | ")
    if "prm_loss" in m:
        after = f"->{m['prm_acc_after']:.2f}" if "prm_acc_after" in m else ""  # double-forward only
        s += f"prm_loss {m['prm_loss']:.3f} | prm_acc {m['prm_acc_fresh']:.2f}{after} | "
    if "step_f1" in m:  # the fresh rewards against the step labels: first-error F1, step AUROC
        s += f"step F1 {m['step_f1']:.2f} auc {m.get('step_auroc', float('nan')):.2f} | "
    if cfg.reward_mode != "outcome":
        s += f"|ret| p {m['ret_process']:.3f}{'' if m['process_on'] else ' (off)'} o {m['ret_outcome']:.3f} | "
    if "mc_rollouts" in m:  # --reward-mode mc-value: continuations sampled this step (their time is in roll)
        s += f"mc {m['mc_rollouts']} | "
    s += (f"pg {m.get('pg_loss', 0):+.3f} | clip {m.get('clipfrac', 0):.3f} | ent {m.get('entropy', 0):.3f} | len {m['len']:.1f} | "
          f"{m['t_step']:.2f}s (roll {m['t_rollout']:.2f} ver {m['t_verify']:.2f} prm {m.get('t_prm', 0):.2f} pol {m.get('t_policy', 0):.2f}"
          + (f" comm {m['t_comm']:.2f})" if "t_comm" in m else ")"))
    fails = [f"{k[2:]} {v}" for k, v in sorted(m.items()) if k.startswith("n_") and k != "n_correct"]
    return s + (" | " + ", ".join(fails) if fails else "")  # why responses scored below 1 (verifiers.REASONS)


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs: a run killed at any moment resumes from its last complete checkpoint.
# ---------------------------------------------------------------------------------------------
















def resumed_base(cfg):
    """The base a resumed run goes on with: the one its config.json names. Its adapters fit only
    that base, so a base that its settings no longer give, or an SFT model that is gone (training
    it again would give another one: the warm-up's rounding differs between machines), stops the
    run instead of loading the checkpoint onto something else."""
    _, saved = saved_config(cfg.resume, "--resume: ")
    base, where = saved.get("base_path"), os.path.join(cfg.resume, "config.json")
    if cfg.model:
        if base != cfg.model:
            raise ConfigError(f"--resume: {where} says the run was trained on {base!r}, but its model is {cfg.model!r}")
        return base
    path = sft_path(cfg)  # where this run's settings keep the SFT model (the key of those settings)
    shipped = os.path.join(SHIPPED_SFT, os.path.basename(path))
    if base and os.path.dirname(os.path.normpath(base)) == os.path.dirname(shipped):
        path = shipped  # trained on the shipped model of these settings
    if not base or os.path.basename(os.path.normpath(base)) != os.path.basename(path):
        raise ConfigError(f"--resume: {where} says the run was trained on the SFT model {base!r}, but its settings give "
                          f"{path} (other SFT settings, or a version that keys the cache otherwise): its adapters fit "
                          "only the base they were trained on; start a new run")
    if not os.path.exists(os.path.join(path, "done")):
        raise ConfigError(f"--resume: the SFT model the run was trained on ({path}) is gone; training it again would "
                          "give another base than the one the checkpoint's adapters fit (the warm-up's rounding differs "
                          "between machines): restore that folder, or start a new run")
    return path


def run(cfg):
    t_start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # reuse freed activations instead of page-faulting them back in every forward
    device = parallel.setup(run_device(cfg))  # under torchrun: join the job (cuda:LOCAL_RANK on GPUs)
    main_rank = parallel.is_main()  # rank 0 evaluates, prints, logs and writes; one process is rank 0
    if not main_rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints for the job (errors still reach stderr)
    # an existing run folder is refused before anything is built (every rank names the same one)
    run_dir = cfg.resume or new_run_dir(cfg, parallel.broadcast_object(time.strftime("%Y%m%d-%H%M%S")))
    # Read and check all data before building anything expensive.
    train_rows = [r for path in cfg.data.split(",") for r in load_rows(path)]
    test_rows = load_rows(cfg.test_data)
    check_sandbox(cfg.sandbox, train_rows + test_rows)
    truth = is_step_task(train_rows)  # the embedded task: every step of a response can be checked (steps.py)
    if cfg.reward_mode in ("oracle", "mc-value") and not truth:
        what = "process rewards come" if cfg.reward_mode == "oracle" else "steps (whose values it estimates) come"
        raise ConfigError(f"--reward-mode {cfg.reward_mode}: its {what} from the step labels of the embedded "
                          f"arithmetic task (rows with data_source 'arith_chain', data/generate.py); {cfg.data} has other rows")

    if cfg.resume:
        base_path = resumed_base(cfg)
    elif cfg.model:
        base_path = cfg.model
    else:  # SFT seeds the CPU and CUDA RNGs: restored after, so a cold run draws what a cached one does
        if not main_rank:
            parallel.barrier()  # rank 0 builds the SFT model; the others then find it in the cache
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()), device_type="cuda"):
            base_path = sft_warmup(cfg, device)
        if main_rank:
            parallel.barrier()
    base, tok = load_base(base_path, device, cfg)
    train_rows = drop_long_prompts(train_rows, tok, cfg.max_prompt_len, cfg.data)
    test_rows = drop_long_prompts(test_rows, tok, cfg.max_prompt_len, cfg.test_data)[: cfg.eval_n or None]
    model = add_adapters(base, cfg)
    if cfg.prm_init and not cfg.resume:  # a trained π_φ (a resumed run loads its checkpoint's)
        load_prm_init(model, cfg, base_path)
    if parallel.world() > 1:  # rank 0's adapters everywhere (new, --prm-init or resumed ones below: the same file)
        parallel.broadcast(adapter_params(model, "policy") + adapter_params(model, "prm"))
        parallel.seed_rank(cfg.seed)  # each rank samples its own share with its own draws
    opt_policy = torch.optim.AdamW(adapter_params(model, "policy"), lr=cfg.lr_policy, weight_decay=cfg.wd_policy)
    opt_prm = torch.optim.AdamW(adapter_params(model, "prm"), lr=cfg.lr_prm, weight_decay=0.0)  # ALGORITHM.md §3.3

    if not cfg.resume and main_rank:
        check_run_dir_free(run_dir)  # again: another process may have taken the name during the SFT warm-up
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "config.json"), {**dataclasses.asdict(cfg), "base_path": base_path,
                                                          "device_used": device})
    print(f"run directory: {run_dir}")

    stream, buffer = PromptStream(len(train_rows), cfg.seed), []
    gen = torch.Generator().manual_seed(cfg.seed)
    acc_ema = 0.5  # running mean of the PRM's pairwise accuracy on fresh batches, from chance
    model.set_adapter("policy")  # generation and evaluation use π_θ
    if cfg.resume:
        ckpt = latest_checkpoint(run_dir)
        st = load_checkpoint(ckpt, model, opt_policy, opt_prm)
        stream.load_state(st["stream"])
        buffer, acc_ema, start, ev = st["buffer"], st["acc_ema"], st["step"], st["eval_before"]
        gen.set_state(st["rng_gen"])
        t_start -= st["wall_time_s"]
        if parallel.world() > 1:  # the checkpoint holds rank 0's sampling RNG
            parallel.seed_rank(cfg.seed + start)
        print(f"resuming from {ckpt} (step {start}); metrics after step {start} are re-done")
    else:
        start, ev = 0, None
        if main_rank:  # the evaluations run on rank 0 alone
            why = {}
            acc, se = evaluate(model, tok, test_rows, cfg, device, False, "eval (sampled) before RL", with_se=True, reasons=why)
            ev = {"acc_before": acc, "acc_before_se": se, "answered_before": answered(why),
                  "greedy_before": evaluate(model, tok, test_rows, cfg, device, True, "eval (greedy) before RL")}
    if main_rank:
        print(f"before RL: held-out accuracy sampled {ev['acc_before']:.3f} | greedy {ev['greedy_before']:.3f}")
        report = start_report(cfg, ev)
        if report:
            print(report)
    history = []  # this process's step metrics, for drop_warning
    log, close_log = make_logger(cfg, run_dir, start) if main_rank else (lambda m: None, lambda: None)

    use_prm = cfg.reward_mode == "prime"
    q_source = cfg.reward_mode in ("prime", "oracle", "mc-value")  # step labels: score the PRM, or give rewards / steps
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="RL", disable=not (cfg.show_progress and main_rank), mininterval=1,
               initial=start, total=cfg.steps)
    for step in bar:
        t0, comm0 = time.time(), parallel.comm_seconds()
        m = {"step": step}
        # 1-3. Rollout, verify, filter (with refill from the prompt buffer).
        model.set_adapter("policy")
        batch, st = collect(model, tok, cfg, train_rows, stream, buffer, device)
        m.update(st)
        if batch is None:
            m.update(len=float("nan"), t_step=time.time() - t0)
            tqdm.write(f"step {step}/{cfg.steps} | acc {m['acc']:.3f} | kept {m['kept']}/{cfg.P} | skipped: too few prompts in the band")
        else:
            m["len"] = batch.mask.sum(1).mean().item()

            # log π_old: the training policy's log-probs right after rollout ([O]). With one policy
            # mini-batch they come for free from the update's own forward (see policy_step).
            t = time.time()
            logp_old = None
            if cfg.policy_minibatches > 1 or (use_prm and cfg.ref_type == "policy"):
                logp_old = shared_logprobs(model, batch, cfg)  # (B, T)
            m["t_policy"] = time.time() - t

            # 4-5. Implicit process rewards and the PRM's cross-entropy update. On the embedded task
            # the step labels say which step went wrong: the PRM is scored against them, or, with
            # --reward-mode oracle, they give the process rewards in place of a PRM.
            labelled = label_batch(batch.rows, batch.resp, batch.mask, tok, cfg.K) if truth and q_source else None
            q = None
            if use_prm:
                t = time.time()
                if cfg.ref_type == "freeze":
                    with model.disable_adapter():  # π_ref: the same base, adapters off
                        logp_ref = shared_logprobs(model, batch, cfg)
                else:
                    logp_ref = logp_old
                m["t_ref"] = time.time() - t  # (part of t_prm: bench.py's floor of PRIME's step counts it)
                q, st = prm_step(model, batch, logp_ref, cfg, opt_prm, labelled)
                m.update(st)
                m["t_prm"] = time.time() - t
            elif cfg.reward_mode == "oracle":
                q = oracle_process_rewards(labelled, batch.resp.shape[1], cfg.oracle_form)  # (B, T)

            # 6. Advantages: RLOO on process and outcome rewards, summed, whitened. Optional guards
            # (off in [O]): a PRM warm-up, and a gate on the PRM's ranking of fresh samples. With
            # --reward-mode mc-value instead: each step's change of the policy's Monte-Carlo value, from
            # continuations of every step's state (VinePPO; mc_values.py, ALGORITHM.md §12), whitened;
            # their sampling and verifying count in the step's rollout and verify times.
            if use_prm:
                if step > 1:  # step 1 scores (part of) the batch with the zero PRM: ties count as 0
                    acc_ema = 0.9 * acc_ema + 0.1 * m["prm_acc_fresh"]
                m["prm_acc_ema"] = acc_ema
            m["process_on"] = (cfg.reward_mode in ("oracle", "mc-value")
                               or (use_prm and step > cfg.prm_warmup and acc_ema >= cfg.prm_gate))
            if cfg.reward_mode == "mc-value":
                A, st = mc_values.mc_advantages(model, tok, batch, labelled, cfg, verify_batch)
                st["t_rollout"], st["t_verify"] = m["t_rollout"] + st["t_mc"], m["t_verify"] + st["t_mc_verify"]
            else:
                A, st = advantages(q, batch, cfg, use_process=m["process_on"])
            m.update(st)

            # 7. PPO-clip policy update.
            t = time.time()
            m.update(policy_step(model, batch, logp_old, A, cfg, opt_policy, gen))
            m["t_policy"] += time.time() - t
            model.set_adapter("policy")

            # 8. Log, evaluate, checkpoint.
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and main_rank:
                m["eval_acc"] = evaluate(model, tok, test_rows, cfg, device, False, f"eval step {step}")
                if use_prm:
                    m.update(held_out_step_truth(model, tok, test_rows, cfg, device))
            m["t_step"] = time.time() - t0
            if parallel.world() > 1:
                m["t_comm"] = parallel.comm_seconds() - comm0  # rank 0's time in collectives, waits included
            tqdm.write(fmt_step(step, cfg, m))
        history.append(m)
        warning = drop_warning(step, m["eval_acc"], ev, history, cfg) if "eval_acc" in m else None
        if warning:
            tqdm.write(warning)
        log(m)
        if main_rank and (step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)):
            save_checkpoint(run_dir, step, model, opt_policy, opt_prm,
                            {"stream": stream.state(), "buffer": list(buffer), "acc_ema": acc_ema,
                             "rng_gen": gen.get_state(), "eval_before": ev, "wall_time_s": time.time() - t_start})
    close_log()
    parallel.check_same(adapter_params(model, "policy") + adapter_params(model, "prm"), "adapters")
    parallel.close()  # the job's collectives end here; rank 0 alone goes on
    if not main_rank:
        return None, run_dir

    # Evaluation after RL, the token-reward page, both adapters (peft format) and the summary.
    model.set_adapter("policy")
    why = {}
    acc_after = evaluate(model, tok, test_rows, cfg, device, False, "eval (sampled) after RL", reasons=why)
    greedy_after = evaluate(model, tok, test_rows, cfg, device, True, "eval (greedy) after RL")
    scored = final_scored_samples(model, tok, test_rows, cfg, device) if use_prm else None  # one draw for both
    truth_after = held_out_step_truth(model, tok, test_rows, cfg, device, scored) if use_prm else {}
    if cfg.reward_pages and use_prm:
        experiments.write_reward_page(model, tok, test_rows, cfg, device, os.path.join(run_dir, "rewards.html"), run_dir,
                                      scored=scored)
    adapters = os.path.join(run_dir, "adapters")
    model.save_pretrained(adapters + ".tmp")  # adapters/policy/ and adapters/prm/, written aside, then renamed
    replace_folder(adapters + ".tmp", adapters)
    summary = {**ev, "acc_after": acc_after, "answered_after": answered(why), "greedy_after": greedy_after, "seed": cfg.seed,
               "reward_mode": cfg.reward_mode, "steps": cfg.steps, "eval_prompts": len(test_rows),
               "eval_samples": cfg.eval_samples, **truth_after, "world_size": parallel.world(),
               "wall_time_s": time.time() - t_start}
    write_json(os.path.join(run_dir, "summary.json"), summary)  # last: a run with a summary is finished
    acc_before, greedy_before = ev["acc_before"], ev["greedy_before"]
    print("\nheld-out accuracy (%d prompts)   sampled T=1 (%d/prompt)   greedy" % (len(test_rows), cfg.eval_samples))
    print(f"  before RL (SFT model)        {acc_before:.3f}                    {greedy_before:.3f}")
    print(f"  after RL ({cfg.reward_mode}, {cfg.steps} steps)   {acc_after:.3f}                    {greedy_after:.3f}")
    print(f"  change                       {acc_after - acc_before:+.3f}                   {greedy_after - greedy_before:+.3f}")
    if "answered_before" in ev:  # a run resumed from a checkpoint of an earlier version has no count
        print(f"samples with a readable answer (the format): {ev['answered_before']:.3f} before, "
              f"{summary['answered_after']:.3f} after")
    if "eval_step_f1" in truth_after:
        print(f"PRM against the step labels ({cfg.truth_prompts} held-out prompts x {cfg.K}): first-error F1 "
              f"{truth_after['eval_step_f1']:.3f}, step AUROC {truth_after.get('eval_step_auroc', float('nan')):.3f}")
    warning = drop_warning(cfg.steps, acc_after, ev, history, cfg)
    if warning:
        print(warning)
    print(f"wall time {summary['wall_time_s']:.0f}s; outputs in {run_dir}")
    return summary, run_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in ("compare", "show-rewards", "chain", "sweep", "export-verl"):
            if argv[0] == "compare":
                experiments.compare_main(argv[1:], run)  # each arm and seed is a call of run()
            elif argv[0] == "sweep":
                experiments.sweep_main(argv[1:], run)  # a compare at each chain length
            elif argv[0] == "chain":
                experiments.chain_main(argv[1:])  # a chain length's data and SFT model
            elif argv[0] == "export-verl":
                import verl_export  # the run's data, reward and launch script for veRL (docs/SCALING.md)
                verl_export.export_main(argv[1:])
            else:
                experiments.show_rewards_main(argv[1:])
        else:
            cfg = parse_config(argv)
            if cfg.plan_memory:
                print_memory_plan(cfg)
                return
            run(cfg)
    except ConfigError as e:  # a bad flag or a malformed data row, found before any model is built
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
