"""Evaluation: held-out accuracy (sampled at T=1 and greedy), and the run's self-checks.

`evaluate` scores the current policy on held-out prompts with common random numbers (its own
seed), so before/after and run-to-run differences are not blurred by sampling noise.
`step_truth` judges the PRM's token rewards against the step labels of the embedded task (is the
PRM right about which step failed?), and `held_out_step_truth` does it on fresh held-out samples.
`start_report` says whether the SFT model landed inside the band the defaults were tuned for
(`SFT_BAND`, measured: docs/RESULTS.md, "The embedded default"); `drop_warning` names the likely cause
when held-out accuracy falls below the start by more than the noise.

It must not touch: optimizers or adapters (it samples with whatever adapter is active).
"""
import contextlib
import statistics

import torch
from tqdm.auto import tqdm

import prm
import steps
from config import Config
from sampling import Rollout, decode_responses, encode_prompts, generate, logprobs_nograd
from tasks import is_step_task, label_batch, prompt_text, verify_batch

@contextlib.contextmanager
def seeded(seed):
    """Run a block on its own random numbers (torch CPU and CUDA), then restore the training RNG."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate(model, tok, rows, cfg, device, greedy, desc, with_se=False, reasons=None):
    """Held-out accuracy: mean outcome score of `eval_samples` samples per prompt at T=1, or of
    one greedy response. Sampling uses its own fixed seed (common random numbers), so the
    before/after difference and the difference between runs are not blurred by sampling noise;
    the training RNG state is restored afterwards. `with_se`: also the standard error of the
    mean over prompts, (accuracy, se). `reasons`: a dict that gets the verifier's counts added
    (correct, wrong, no_answer, ...; tasks.verify_batch)."""
    n = 1 if greedy else cfg.eval_samples
    texts = [prompt_text(tok, r["prompt"], r.get("ability")) for r in rows]
    scores = []
    bs = max(1, 512 // n)
    with seeded(cfg.eval_seed):
        for i in tqdm(range(0, len(rows), bs), desc=desc, disable=not cfg.show_progress, leave=False):
            chunk = [t for t in texts[i:i + bs] for _ in range(n)]
            ids, am = encode_prompts(tok, chunk, device)
            resp, mask = generate(model, tok, ids, am, cfg.max_new_tokens, 1.0, greedy=greedy,
                                  merged=cfg.merged_rollout, batch_size=cfg.gen_batch, decode=cfg.decode)
            outs = decode_responses(tok, resp, mask)
            s, why = verify_batch(rows[i:i + bs], outs, n, cfg.verify_workers, cfg.sandbox)
            scores.append(s)
            if reasons is not None:
                for k, v in why.items():
                    reasons[k] = reasons.get(k, 0) + v
    per_prompt = torch.cat(scores).view(-1, n).mean(1)  # (prompts,)
    if with_se:
        return per_prompt.mean().item(), (per_prompt.std() / len(per_prompt) ** 0.5).item() if len(per_prompt) > 1 else 0.0
    return per_prompt.mean().item()


def answered(reasons):
    """The fraction of responses with an answer the verifier could read (for math: a `\\boxed{}`,
    else "the answer is ..."): the format, apart from whether the answer is right."""
    total = sum(reasons.values())
    return 1 - reasons.get("no_answer", 0) / total if total else float("nan")


def step_truth(labelled, r_tok, prefix="step_"):
    """ProcessBench-style metrics of token rewards `r_tok` (B, T) (β·q_t) against the step labels
    `labelled` (tasks.label_batch): the F1 of first-error identification, its two accuracies, and
    the AUROC of summed step rewards, right steps against wrong ones (steps.process_metrics; a
    step's reward is the sum over its tokens, a step below 0 is the PRM's predicted error).
    Keys carry `prefix`; a metric with nothing to average is left out."""
    items = [(labels, steps.step_scores(r_tok[i].tolist(), spans)) for i, (labels, spans, _, _) in enumerate(labelled)]
    m = steps.process_metrics(items)
    return {prefix + k: v for k, v in m.items() if v is not None}


def prm_scored_samples(model, tok, rows, cfg, device):
    """K samples of the policy for each of `rows` (the evaluation's own seed), their outcomes, and
    the PRM's token rewards β·q_t against π_ref: (Rollout, r_tok (B, T)). Leaves the policy active."""
    texts = [prompt_text(tok, r["prompt"], r.get("ability")) for r in rows for _ in range(cfg.K)]
    p_ids, p_mask = encode_prompts(tok, texts, device)
    model.set_adapter("policy")
    with seeded(cfg.eval_seed):
        resp, mask = generate(model, tok, p_ids, p_mask, cfg.max_new_tokens, cfg.temperature,
                              merged=cfg.merged_rollout, batch_size=cfg.gen_batch, decode=cfg.decode)
    outs = decode_responses(tok, resp, mask)
    r_o, _ = verify_batch(rows, outs, cfg.K, cfg.verify_workers, cfg.sandbox)
    batch = Rollout(p_ids, p_mask, resp, mask, r_o, rows, outs)
    model.set_adapter("prm")
    logp_phi = logprobs_nograd(model, batch, cfg.micro_batch, cfg.logprob_chunk)  # (B, T)
    with model.disable_adapter():
        logp_ref = logprobs_nograd(model, batch, cfg.micro_batch, cfg.logprob_chunk)  # (B, T)
    model.set_adapter("policy")
    return batch, cfg.beta * prm.implicit_rewards(logp_phi, logp_ref, mask)  # (B, T) β·q_t


def leading(scored, n, K):
    """The first `n` prompts (n·K rows) of prm_scored_samples' (Rollout, r_tok)."""
    b, r_tok = scored
    return Rollout(b.prompt_ids[:n * K], b.prompt_mask[:n * K], b.resp[:n * K], b.mask[:n * K], b.r_o[:n * K],
                   b.rows[:n], b.texts[:n * K]), r_tok[:n * K]


def final_scored_samples(model, tok, rows, cfg, device):
    """After RL, one prm_scored_samples for both the step metrics (the first `truth_prompts`
    prompts) and the token-reward page (its candidates, the first 4·`reward_pages`), so that the
    same leading prompts are not sampled and scored twice. None when neither wants any."""
    n = max(cfg.truth_prompts if is_step_task(rows[:cfg.truth_prompts]) else 0, 4 * cfg.reward_pages)
    return prm_scored_samples(model, tok, rows[:n], cfg, device) if n else None


def held_out_step_truth(model, tok, rows, cfg, device, scored=None):
    """step_truth on fresh samples of the first `truth_prompts` held-out prompts (keys eval_step_*);
    {} when off or when the rows are not the embedded task. `scored`: prm_scored_samples of at
    least those prompts, drawn already (final_scored_samples)."""
    rows = rows[:cfg.truth_prompts]
    if not cfg.truth_prompts or not is_step_task(rows):
        return {}
    batch, r_tok = leading(scored, len(rows), cfg.K) if scored else prm_scored_samples(model, tok, rows, cfg, device)
    return step_truth(label_batch(rows, batch.resp, batch.mask, tok, cfg.K), r_tok, prefix="eval_step_")


# Where the embedded default's SFT model lands on the default held-out prompts: the range over the
# SFT models measured in docs/RESULTS.md "The embedded default" (several seeds, 1 and 2 threads) and
# the shipped model (data/sft/: sampled 0.407, greedy 0.662), widened by 0.03 (about two standard
# errors of a 500-prompt evaluation). RL was measured from inside it (from the shipped model: RL seeds 0-4, +0.197 +- 0.010 sampled).
SFT_BAND = {"acc_before": (0.38, 0.59), "greedy_before": (0.58, 0.85)}


def in_sft_band(cfg, ev):
    """Whether the SFT model's before-RL accuracies `ev` lie inside SFT_BAND; None when the run
    does not start from the embedded default's warm-up (the band is its own)."""
    d = Config()
    if cfg.model or (cfg.sft_data, cfg.test_data, cfg.eval_n, cfg.eval_samples, cfg.max_new_tokens) != \
            (d.sft_data, d.test_data, d.eval_n, d.eval_samples, d.max_new_tokens):
        return None
    return all(lo <= ev[name] <= hi for name, (lo, hi) in SFT_BAND.items())


def start_report(cfg, ev):
    """One line on where the SFT model landed relative to SFT_BAND, a warning when it is outside;
    None when the band does not apply (in_sft_band)."""
    inside = in_sft_band(cfg, ev)
    if inside is None:
        return None
    (s_lo, s_hi), (g_lo, g_hi) = SFT_BAND["acc_before"], SFT_BAND["greedy_before"]
    band = f"sampled {s_lo:.2f}-{s_hi:.2f}, greedy {g_lo:.2f}-{g_hi:.2f}"
    if inside:
        return f"the SFT model is inside the band the defaults were tuned for ({band})"
    return (f"warning: the SFT model (sampled {ev['acc_before']:.3f}, greedy {ev['greedy_before']:.3f}) is outside "
            f"the band the defaults were tuned for ({band}); RL from here may not gain what the README reports. "
            "Train another with --retrain-sft (another --sft-seed, or another --sft-target)")


def drop_warning(step, acc, ev, history, cfg):
    """A warning when held-out sampled accuracy `acc` at `step` is below the start by more than the
    evaluation's noise (two standard errors of the before-RL estimate, at least 0.01), naming the
    likely causes that this run's logged metrics (`history`: its step dicts so far) point at; None
    when there is no drop."""
    noise = max(0.01, 2 * ev.get("acc_before_se", 0.0))
    if acc >= ev["acc_before"] - noise:
        return None
    mean = statistics.fmean
    causes = []
    ent = [m["entropy"] for m in history if "entropy" in m]
    if len(ent) >= 10:
        first, last = mean(ent[:5]), mean(ent[-5:])
        if last < 0.5 * first or last > 2 * first:
            causes.append(f"the policy's entropy went from {first:.3f} to {last:.3f} nats per token: a smaller "
                          "--lr-policy moves it more slowly")
    steered = [m["prm_acc_fresh"] for m in history[-10:] if m.get("process_on")]
    if steered and mean(steered) < 0.5:
        causes.append(f"the PRM ranks fresh samples below chance ({mean(steered):.2f}) while its rewards steer the "
                      "policy: --prm-gate 0.55 turns them off until it ranks better, --reward-mode outcome drops them")
    kept = [m["kept"] for m in history[-10:]]
    if kept and mean(kept) < 0.5 * cfg.P:
        causes.append(f"only {mean(kept):.0f} of {cfg.P} prompts per step pass the filter: the model is too weak or "
                      "too strong for --filter-low/--filter-high")
    if in_sft_band(cfg, ev) is False:
        causes.append("the SFT model started outside the band the defaults were tuned for")
    return (f"warning: held-out sampled accuracy at step {step} is {acc:.3f}, {ev['acc_before'] - acc:.3f} below the "
            f"start ({ev['acc_before']:.3f}; noise ±{noise:.3f}). "
            + ("Likely: " + "; ".join(causes) if causes else "No logged metric points at a cause; a smaller "
               "--lr-policy is the first thing to try") + ".")
