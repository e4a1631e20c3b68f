"""Experiments on top of the loop: `compare` (arms x seeds, one plot and one table: the paper's
Figure 3 for a task) and the token-reward page (`show-rewards`: each token of sampled responses
coloured by its implicit process reward β·q_t).

Run through prime_mini.py:
    python prime_mini.py compare --arms prime,outcome --seeds 3
    python prime_mini.py show-rewards RUN_DIR

It must not touch: the loop's internals. `compare` calls prime_mini.run() (passed in, so this module
never imports prime_mini.py) and reads the runs' metrics.jsonl and summary.json.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings

import torch

import steps
from checkpoints import latest_checkpoint, load_adapters, write_json
from config import Config, explicit_fields, in_use, parse_config, saved_config
from evaluation import leading, prm_scored_samples
from models import ConfigError, add_adapters, keep_freed_memory, load_base, run_device
from tasks import check_sandbox, drop_long_prompts, is_step_task, label_batch, load_rows, prompt_text


# ---------------------------------------------------------------------------------------------
# Seeing the process rewards: an HTML page of sampled responses, each token coloured by β·q_t.
# ---------------------------------------------------------------------------------------------
def reward_page_html(groups, beta, title):
    """A self-contained HTML page. `groups`: [{"prompt", "answer", "responses": [{"tokens": [str],
    "r": [float] (β·q_t per token), "r_o": float}]}]. Green: the PRM credits a token; red: blames it."""
    import html
    vals = [abs(v) for g in groups for resp in g["responses"] for v in resp["r"]]
    scale = sorted(vals)[math.ceil(0.98 * (len(vals) - 1))] if vals else 1.0  # robust to a few outliers
    scale = scale or 1.0

    def fe(resp, k):  # is token k inside the response's true first wrong step?
        return resp.get("first_error") is not None and resp["first_error"][0] <= k < resp["first_error"][1]

    def span(tok, v, first_error=False):
        a = min(1.0, abs(v) / scale)
        rgb = "0,150,60" if v >= 0 else "215,40,40"
        shown = html.escape(tok).replace("\n", "↵\n")
        cls = "t fe" if first_error else "t"  # fe: a token of the true first wrong step
        return f'<span class="{cls}" style="background:rgba({rgb},{a:.2f})" title="{v:+.4f}">{shown}</span>'

    parts = [f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;color:#222}}
.g{{border-top:1px solid #ccc;padding:.4em 0}} .p{{font-family:monospace;color:#555}}
.r{{display:flex;gap:1em;align-items:baseline;margin:.3em 0}}
.meta{{min-width:11em;font-size:90%}} .ok{{color:#080}} .bad{{color:#c00}}
.resp{{font-family:monospace;white-space:pre-wrap;line-height:1.6}} .t{{border-radius:2px;padding:0 1px}}
.fe{{text-decoration:underline wavy #c00;text-underline-offset:3px}} .truth{{color:#555;font-size:85%}}</style>
</head><body><h2>{html.escape(title)}</h2>
<p>Each response token is coloured by its implicit process reward <b>β·q<sub>t</sub> = β·log
π<sub>φ</sub>(y<sub>t</sub>)/π<sub>ref</sub>(y<sub>t</sub>)</b> (β = {beta}): <span style="background:rgba(0,150,60,.8)">
green</span> where the PRM credits the token, <span style="background:rgba(215,40,40,.8)">red</span> where it blames
it; full colour at |β·q<sub>t</sub>| ≥ {scale:.3g}. Hover a token for its value. r<sub>o</sub> is the verifier's outcome;
Σ = β·Σ<sub>t</sub>q<sub>t</sub> is the PRM's sequence reward (its logit that the response is correct). On the
arithmetic task, <span class="fe">wavy underline</span>: the response's true first wrong step (by the step labels),
and which step the PRM blames first (the first whose summed reward is below 0).</p>"""]
    for g in groups:
        parts.append(f'<div class="g"><div class="p">prompt: {html.escape(g["prompt"])} &nbsp; '
                     f'(answer {html.escape(str(g["answer"]))})</div>')
        for resp in g["responses"]:
            cls, mark = ("ok", "✓") if resp["r_o"] >= 1 else ("bad", "✗")
            parts.append(f'<div class="r"><div class="meta"><span class="{cls}">{mark} r<sub>o</sub> = '
                         f'{resp["r_o"]:g}</span> &nbsp; Σ = <span class="sum">{sum(resp["r"]):+.3f}</span>'
                         + (f'<br><span class="truth">{html.escape(resp["truth"])}</span>' if "truth" in resp else "")
                         + f'</div><div class="resp">{"".join(span(t, v, fe(resp, k)) for k, (t, v) in enumerate(zip(resp["tokens"], resp["r"])))}</div></div>')
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def token_pieces(tok, ids):
    """The text each token adds, so that the pieces join to tok.decode(ids). A byte-level BPE
    token (SmolLM2, Qwen) can hold part of a character's UTF-8 bytes (an emoji, `÷`): decoded
    alone it is U+FFFD. Such a token shows nothing and the token that completes the character
    shows all of it; a character never completed shows as U+FFFD, as in the decoded text."""
    pieces, start = [], 0
    for k in range(len(ids)):
        text = tok.decode(ids[start:k + 1])
        if text.endswith("\ufffd") and k + 1 < len(ids):  # a character's bytes continue in the next token
            pieces.append("")
            continue
        pieces.append(text)
        start = k + 1
    return pieces


def reward_groups(tok, rows, batch, r, K):
    """The page's groups (`reward_page_html`) for a scored batch: row g of `rows` is the prompt of
    the K consecutive responses g·K.. of `batch`, `r` (B, T) their token rewards β·q_t. Groups whose
    samples are both right and wrong come first. On the embedded task each response also gets its
    true first wrong step (underlined) and the step the PRM blames first (the first whose summed
    reward is below 0)."""
    labelled = label_batch(rows, batch.resp, batch.mask, tok, K) if is_step_task(rows) else None
    groups = []
    for g, row in enumerate(rows):
        responses = []
        for i in range(g * K, (g + 1) * K):
            n = int(batch.mask[i].sum())
            resp = {"tokens": token_pieces(tok, batch.resp[i, :n].tolist()), "r": r[i, :n].tolist(),
                    "r_o": batch.r_o[i].item()}
            if labelled:
                labels, spans, _, _ = labelled[i]
                pred = steps.predicted_first_error(steps.step_scores(resp["r"], spans))
                resp["first_error"] = spans[labels.first_wrong] if labels.first_wrong is not None else None
                resp["truth"] = (f"first wrong step {labels.first_wrong + 1}" if labels.first_wrong is not None else
                                 "every step right" + ("" if labels.ok else f" ({', '.join(labels.errors)})"))
                resp["truth"] += f"; PRM blames {'step ' + str(pred + 1) if pred is not None else 'none'}"
            responses.append(resp)
        mixed = len({x["r_o"] for x in responses}) > 1
        groups.append((not mixed, g, {"prompt": prompt_text(tok, row["prompt"], row.get("ability")),
                                      "answer": row["reward_model"]["ground_truth"], "responses": responses}))
    return [x[2] for x in sorted(groups, key=lambda x: x[:2])]


def write_reward_page(model, tok, rows, cfg, device, path, run_dir, n_prompts=None, scored=None):
    """Sample K responses for held-out prompts with the policy, score their tokens with the PRM
    against π_ref, and write the page of `reward_groups`. `scored`: those samples and scores of at
    least the candidate prompts, drawn already (evaluation.final_scored_samples)."""
    n_prompts = n_prompts or cfg.reward_pages
    cand = rows[: 4 * n_prompts]
    batch, r = (leading(scored, len(cand), cfg.K) if scored else
                prm_scored_samples(model, tok, cand, cfg, device))  # r: (B, T) β·q_t
    groups = reward_groups(tok, cand, batch, r, cfg.K)[:n_prompts]
    with open(path, "w") as f:
        f.write(reward_page_html(groups, cfg.beta, f"Implicit process rewards: {run_dir}"))
    print(f"token-reward page: {path}")
    return path


def show_rewards_main(argv):
    """`python prime_mini.py show-rewards RUN_DIR`: the token-reward page of a saved run."""
    import argparse
    ap = argparse.ArgumentParser(prog="prime_mini.py show-rewards", description=show_rewards_main.__doc__,
                                 allow_abbrev=False)
    ap.add_argument("run_dir", help="a run directory (with config.json and adapters/ or a checkpoint)")
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts on the page (K responses each)")
    ap.add_argument("--out", default="", help="output file (default: RUN_DIR/rewards.html)")
    args = ap.parse_args(argv)
    cfg, saved = saved_config(args.run_dir, "", strict=False)  # an older run's page is still worth a look
    folder = os.path.join(args.run_dir, "adapters")
    if not os.path.isdir(folder):
        ckpt = latest_checkpoint(args.run_dir)
        if ckpt is None:
            raise ConfigError(f"{args.run_dir}: no adapters/ folder and no checkpoint")
        folder = os.path.join(ckpt, "adapters")
    rows = load_rows(cfg.test_data)
    check_sandbox(cfg.sandbox, rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tok = load_base(saved["base_path"], device, cfg)
    model = add_adapters(base, cfg)
    load_adapters(model, folder)
    rows = drop_long_prompts(rows, tok, cfg.max_prompt_len, cfg.test_data)
    return write_reward_page(model, tok, rows, cfg, device, args.out or os.path.join(args.run_dir, "rewards.html"),
                             args.run_dir, n_prompts=args.prompts)


# ---------------------------------------------------------------------------------------------
# compare: arms x seeds on the same task, one folder with a plot and a table (paper Figure 3).
# ---------------------------------------------------------------------------------------------
ARMS = {  # named arms; any other arm is written NAME:flag=value:flag=value (e.g. coef1:process-coef=1)
    "prime": [],
    "outcome": ["--reward-mode", "outcome"],
    "faithful": ["--faithful"],
    # A control, not the paper's offline PRM: the PRM stays at zero, so every process reward is 0
    # (outcome-only plus unused PRM forwards). The offline PRM freezes a *trained* one:
    # offline:prm-init=RUN/adapters/prm:prm-update=none (docs/EXPERIMENTS.md, compare).
    "zero-prm": ["--prm-update", "none"],
    "grpo": ["--adv-estimator", "grpo"],
    "reinforce": ["--adv-estimator", "reinforce"],
    # Process rewards from the embedded task's step labels instead of the PRM: the upper bound of
    # what dense process rewards can buy on this task (docs/EXPERIMENTS.md, "Process ground truth").
    "oracle": ["--reward-mode", "oracle"],
    # PRIME with min-form credit (PURE, arXiv 2504.15275): process return = min of future rewards.
    "min-form": ["--process-credit", "min"],
    # The oracle without reward-to-go: a token's process return is its own leave-one-out score, so
    # only the wrong step's tokens carry the -1, not every token before them too.
    "oracle-g0": ["--reward-mode", "oracle", "--gamma-process", "0"],
    # No PRM: each step's advantage is the change of the policy's Monte-Carlo chance of finishing
    # right (VinePPO, arXiv 2410.01679): the true step values, the bound of dense credit here.
    "mc-value": ["--reward-mode", "mc-value"],
}


def arm_flags(arm):
    """(name, flags) of an arm: a name in ARMS or `name:flag=value:flag` (a bare flag is a switch)."""
    name, *pairs = arm.split(":")
    if not pairs:
        if name not in ARMS:
            raise ConfigError(f"--arms: unknown arm {name!r}; use one of {', '.join(ARMS)} or NAME:flag=value")
        return name, list(ARMS[name])
    flags = []
    for pair in pairs:
        k, _, v = pair.partition("=")
        flags += ["--" + k.lstrip("-")] + ([v] if v else [])
    return name, flags


def trailing_mean(curve, window):
    """Mean of the last `window` values up to each step (fewer at the start).
    Example: trailing_mean([1, 2, 3, 4], 2) -> [1.0, 1.5, 2.5, 3.5]"""
    return [sum(curve[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(curve))]


def compare_table(results, ref, window=10):
    """Per arm, from each seed's metrics and summary: final training reward (mean sampled accuracy,
    before filtering, of the last `window` steps), the first step at which the arm's seed-mean
    curve (trailing mean over `window` steps) reaches the `ref` arm's final reward, the ratio of
    those step counts (sample efficiency, paper: PRIME reaches it in 40% of the steps), median
    seconds per step and its ratio to `ref`, held-out accuracy before/after, and the PRM's
    pairwise ranking accuracy on fresh batches. `results`: {arm: [{"metrics": [...], "summary": {...}}]}."""
    import statistics as stats_

    def mean_sd(xs):
        return (stats_.mean(xs), stats_.stdev(xs) if len(xs) > 1 else 0.0)
    table = {}
    for arm, seeds in results.items():
        curves = [[m["acc"] for m in sorted(r["metrics"], key=lambda m: m["step"])] for r in seeds]
        n = min(map(len, curves))
        if any(len(c) != n for c in curves):
            warnings.warn(f"{arm}: the seeds' curves have {', '.join(str(len(c)) for c in curves)} steps; "
                          f"all are cut to the shortest ({n})", RuntimeWarning)
        mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(n)]  # (steps,)
        smooth = trailing_mean(mean_curve, window)
        # A value that was NaN is null in metrics.jsonl (None here): left out like a missing one.
        t_steps = [m["t_step"] for r in seeds for m in r["metrics"] if m.get("t_step") is not None]
        prm_acc = [m["prm_acc_fresh"] for r in seeds for m in r["metrics"]
                   if m.get("process_on") and m.get("prm_acc_fresh") is not None]
        last = [m for r in seeds for m in sorted(r["metrics"], key=lambda m: m["step"])[n - window:n]]
        step_f1 = [m["step_f1"] for m in last if m.get("step_f1") is not None]  # fresh batches, last `window` steps
        step_auc = [m["step_auroc"] for m in last if m.get("step_auroc") is not None]
        table[arm] = {"seeds": len(seeds), "final_reward": mean_sd([sum(c[n - window:n]) / window for c in curves]),
                      "curve": mean_curve, "smooth": smooth, "t_step": stats_.median(t_steps) if t_steps else float("nan"),
                      "prm_acc_fresh": stats_.mean(prm_acc) if prm_acc else None,
                      "step_f1": stats_.mean(step_f1) if step_f1 else None,
                      "step_auroc": stats_.mean(step_auc) if step_auc else None,
                      **{k: mean_sd([r["summary"][k] for r in seeds]) for k in
                         ("acc_before", "acc_after", "greedy_before", "greedy_after")}}
    target = table[ref]["final_reward"][0]
    for arm, row in table.items():
        hit = next((i + 1 for i, v in enumerate(row["smooth"]) if v >= target), None)
        row["steps_to_target"] = hit
        row["t_ratio"] = row["t_step"] / table[ref]["t_step"]
    for arm, row in table.items():
        ref_hit = table[ref]["steps_to_target"]
        row["efficiency"] = ref_hit / row["steps_to_target"] if (ref_hit and row["steps_to_target"]) else None
    return table, target


def compare_markdown(table, ref, target, window):
    def pm_(x):
        return f"{x[0]:.3f} ± {x[1]:.3f}"
    lines = [f"| arm | seeds | training reward, last {window} steps | held-out sampled: before → after (Δ) | "
             f"held-out greedy Δ | steps to reach {ref}'s final reward ({target:.3f}) | sample efficiency vs {ref} | "
             f"s/step (median) | time vs {ref} | PRM ranking acc. (fresh) | PRM step F1 / AUROC (fresh, last {window}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in table.items():
        d = r["acc_after"][0] - r["acc_before"][0]
        g = r["greedy_after"][0] - r["greedy_before"][0]
        hit = r["steps_to_target"] or "not reached"
        eff = f"{r['efficiency']:.2f}x" if r["efficiency"] else "-"
        prm_acc = f"{r['prm_acc_fresh']:.3f}" if r["prm_acc_fresh"] is not None else "-"
        f1 = r.get("step_f1")
        truth = f"{f1:.3f} / {r['step_auroc']:.3f}" if f1 is not None and r.get("step_auroc") is not None else "-"
        lines.append(f"| {arm} | {r['seeds']} | {pm_(r['final_reward'])} | {r['acc_before'][0]:.3f} → "
                     f"{pm_(r['acc_after'])} ({d:+.3f}) | {g:+.3f} | {hit} | {eff} | {r['t_step']:.2f} | "
                     f"{r['t_ratio']:.2f}x | {prm_acc} | {truth} |")
    return "\n".join(lines)


def compare_plot(results, table, ref, target, window, path):
    """Training reward and held-out accuracy against RL step, and (when logged) the PRM's step F1 on
    fresh batches: one line per arm, band = ±1 sd over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    with_f1 = any("step_f1" in m for seeds in results.values() for r in seeds for m in r["metrics"])
    fig, axes = plt.subplots(1, 3 if with_f1 else 2, figsize=(18 if with_f1 else 12, 4.5))
    ax1, ax2 = axes[:2]
    for arm, seeds in results.items():
        n = len(table[arm]["curve"])
        curves = np.array([[m["acc"] for m in sorted(r["metrics"], key=lambda m: m["step"])][:n] for r in seeds])
        sm = np.array([[c[max(0, i - window + 1):i + 1].mean() for i in range(n)] for c in curves])  # trailing mean
        x = np.arange(1, n + 1)
        line, = ax1.plot(x, sm.mean(0), label=arm)
        ax1.fill_between(x, sm.mean(0) - sm.std(0), sm.mean(0) + sm.std(0), color=line.get_color(), alpha=0.2)
        # Held-out: before RL (step 0), every eval_every steps, after RL.
        pts = []
        for r in seeds:
            p = {0: r["summary"]["acc_before"], r["summary"]["steps"]: r["summary"]["acc_after"]}
            p.update({m["step"]: m["eval_acc"] for m in r["metrics"] if "eval_acc" in m})
            pts.append(p)
        steps = sorted(set.intersection(*[set(p) for p in pts]))
        ys = np.array([[p[s] for s in steps] for p in pts])
        ax2.plot(steps, ys.mean(0), marker="o", color=line.get_color(), label=arm)
        ax2.fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(), alpha=0.2)
        if with_f1 and all(any("step_f1" in m for m in r["metrics"]) for r in seeds):
            f1 = np.array([[np.nan if m.get("step_f1") is None else m["step_f1"]
                            for m in sorted(r["metrics"], key=lambda m: m["step"])][:n] for r in seeds])  # (seeds, steps)
            f1 = np.array([[np.nanmean(c[max(0, i - window + 1):i + 1]) for i in range(n)] for c in f1])
            axes[2].plot(x, f1.mean(0), color=line.get_color(), label=arm)
            axes[2].fill_between(x, f1.mean(0) - f1.std(0), f1.mean(0) + f1.std(0), color=line.get_color(), alpha=0.2)
    ax1.axhline(target, color="gray", ls="--", lw=1, label=f"{ref} final ({target:.3f})")
    ax1.set(xlabel="RL step", ylabel=f"training reward (sampled accuracy, mean of last {window} steps)",
            title="Training reward")
    ax2.set(xlabel="RL step", ylabel="held-out accuracy (sampled, T=1)", title="Held-out accuracy")
    if with_f1:
        axes[2].set(xlabel="RL step", ylabel=f"first-error F1 (fresh batch, mean of last {window} steps)",
                    title="PRM against the step labels", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    n_seeds = len(next(iter(results.values())))
    fig.suptitle(f"{' vs '.join(results)} ({n_seeds} seeds; band: ±1 sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Settings that change how a run executes or logs, not what it computes: a run folder made with
# other values of these is still reused.
NOT_COMPARED = ("resume", "run_name", "out_dir", "threads", "device", "show_progress", "save_every", "tensorboard",
                "wandb_project", "verify_workers", "retrain_sft", "gpu_memory_gb",
                "decode")  # decode: the same tokens either way (tests/test_decode.py); only the speed differs


def same_sft_init(old, now):
    """Whether two --sft-init folders are the same starting model: the same weights when the old
    folder is still there, else the same folder name (an SFT cache key: a run folder copied from
    another checkout, whose cache or shipped models live elsewhere)."""
    if old == now:
        return True
    if not old or not now:
        return False
    if os.path.exists(old) and os.path.exists(now):
        import filecmp
        return filecmp.cmp(os.path.join(old, "model.safetensors"), os.path.join(now, "model.safetensors"), shallow=False)
    return os.path.basename(os.path.normpath(old)) == os.path.basename(os.path.normpath(now))


def check_reusable(run_dir, cfg):
    """Stop when a run folder that `compare` would reuse or resume was made with settings other
    than `cfg` (this arm and seed), or by another version (its config.json lacks a field).
    --sft-init is compared as a model, not as a path (same_sft_init)."""
    old, _ = saved_config(run_dir, "compare: ")
    diff = [f"{f.name} {getattr(old, f.name)!r} (now {getattr(cfg, f.name)!r})" for f in dataclasses.fields(Config)
            if f.name not in NOT_COMPARED and getattr(old, f.name) != getattr(cfg, f.name)
            and not (f.name == "sft_init" and same_sft_init(old.sft_init, cfg.sft_init))]
    if diff:
        raise ConfigError(f"compare: {run_dir} was made with other settings: {', '.join(diff)}; "
                             "remove that folder or choose another --name")


def finished_summary(run_dir):
    """A run's summary.json (written last: the run is finished), or None when there is none or it
    does not parse (cut short by a kill: said, and the run is resumed or started again)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        warnings.warn(f"{path} does not parse ({e}): the run is treated as unfinished", RuntimeWarning)
        return None


def read_run(run_dir):
    """A finished run's step metrics (metrics.jsonl) and summary, as compare and sweep read them."""
    return {"metrics": [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))],
            "summary": finished_summary(run_dir)}


def check_at_least_one(**counts):
    """Stop on a count flag below 1 (--seeds, --window of compare and sweep)."""
    for flag, value in counts.items():
        if value < 1:
            raise ConfigError(f"--{flag}: must be >= 1, got {value}")


def compare_main(argv, run):
    """`python prime_mini.py compare --arms prime,outcome --seeds 3 [flags for every arm]`: runs
    every arm with every seed (same seed = same data order and the same SFT model), then writes
    compare.png, compare.md and compare.json into one folder. Finished runs are reused, an
    interrupted one resumes from its checkpoint, and one stopped before its first checkpoint
    starts again (it has nothing to resume from), so the command can be run again after a kill; a
    folder made with other settings stops the command, naming them. `run`: prime_mini.run, passed
    in so that this module does not import the loop that imports it."""
    import argparse
    ap = argparse.ArgumentParser(prog="prime_mini.py compare", description=compare_main.__doc__, allow_abbrev=False)
    ap.add_argument("--arms", default="prime,outcome", help=f"comma-separated arms: {', '.join(ARMS)}, or NAME:flag=value:...")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every arm")
    ap.add_argument("--ref", default="", help="arm whose final training reward is the target (default: outcome if present, else the first)")
    ap.add_argument("--name", default="", help="folder under --out-dir (default: compare-<time>)")
    ap.add_argument("--out-dir", default="runs", help="parent folder (also holds the cached SFT model)")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every this many steps")
    ap.add_argument("--window", type=int, default=10, help="steps in the trailing mean of the training reward")
    args, common = ap.parse_known_args(argv)
    check_at_least_one(seeds=args.seeds, window=args.window)
    taken = explicit_fields(common) & {"seed", "run_name", "resume"}
    if taken:
        raise ConfigError(f"compare sets {', '.join('--' + f.replace('_', '-') for f in sorted(taken))} for "
                             "each run itself (seeds 0..--seeds-1, folders under --name): leave it out")
    arms = [arm_flags(a) for a in args.arms.split(",")]
    names = [a[0] for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # one folder per arm and seed: the second would reuse the first's runs, counted twice
        raise ConfigError(f"--arms: {', '.join(twice)} given twice; name each arm once (NAME:flag=value for variants)")
    odd = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.+-]+", n) or n in (".", "..")]
    if odd:  # an arm's name is a folder name
        raise ConfigError(f"--arms: arm name {odd[0]!r} must be letters, digits and _ . + - only")
    ref = args.ref or ("outcome" if "outcome" in names else names[0])
    if ref not in names:
        raise ConfigError(f"--ref: {ref!r} is not one of the arms ({', '.join(names)})")
    name = args.name or time.strftime("compare-%Y%m%d-%H%M%S")
    folder = os.path.join(args.out_dir, name)
    plan = []  # check every arm's configuration before running anything
    for seed in range(args.seeds):
        for arm, flags in arms:
            run_dir = os.path.join(folder, f"{arm}-s{seed}")
            argv_ = common + flags + ["--seed", str(seed), "--out-dir", args.out_dir, "--run-name",
                                      f"{name}/{arm}-s{seed}", "--eval-every", str(args.eval_every)]
            cfg = parse_config(argv_, new_folder=False)  # its folder: reused, resumed or restarted below
            if cfg.steps < args.window:
                raise ConfigError(f"--steps {cfg.steps} is shorter than --window {args.window}")
            if in_use(run_dir):
                check_reusable(run_dir, cfg)  # a run to reuse, resume or restart must be the run asked for
            plan.append((arm, seed, run_dir, cfg))
    os.makedirs(folder, exist_ok=True)
    for arm, seed, run_dir, cfg in plan:
        if finished_summary(run_dir) is not None:
            print(f"{arm} seed {seed}: done already ({run_dir})")
            continue
        print(f"\n=== {arm}, seed {seed} ===")
        if latest_checkpoint(run_dir):  # with how this compare runs (threads, device, ...), not how the last one did
            cfg = parse_config(["--resume", run_dir, "--threads", str(cfg.threads), "--device", cfg.device,
                                "--save-every", str(cfg.save_every),
                                "--show-progress" if cfg.show_progress else "--no-show-progress"])
        elif in_use(run_dir):
            print(f"{run_dir} stopped before its first checkpoint (nothing to resume from): starting it again")
            shutil.rmtree(run_dir)
        run(cfg)
    results = {arm: [] for arm in names}
    for arm, seed, run_dir, cfg in plan:
        results[arm].append(read_run(run_dir))
    table, target = compare_table(results, ref, args.window)
    md = compare_markdown(table, ref, target, args.window)
    compare_plot(results, table, ref, target, args.window, os.path.join(folder, "compare.png"))
    open(os.path.join(folder, "compare.md"), "w").write(md + "\n")
    write_json(os.path.join(folder, "compare.json"), {"ref": ref, "target": target, "window": args.window,
                                                       "common_flags": common,
                                                       "arms": {a: {"flags": dict(arms)[a], **table[a]} for a in names}})
    print("\n" + md)
    print(f"\nplot and table in {folder}/ (compare.png, compare.md, compare.json)")
    return table


# ---------------------------------------------------------------------------------------------
# Chain length, the difficulty knob of the embedded task, and the sweep over it (README, "When do
# dense rewards pay off?"): the same arms compared at several chain lengths, one figure.
# ---------------------------------------------------------------------------------------------
def chain_tokens(n_ops):
    """--max-new-tokens for chains of `n_ops` steps: a step `abc+de=fgh;` is at most 12 characters
    (totals stay below 1000 for n_ops <= 40), the box 9, and room for a few characters more.
    Example: chain_tokens(4) -> 64 (the default), chain_tokens(16) -> 208."""
    return 12 * n_ops + 16


def chain_files(n_ops):
    """The data files of a chain length: the shipped ones for 4 steps, else data/arith<N>_*.jsonl."""
    name = "arith" if n_ops == 4 else f"arith{n_ops}"
    return {split: f"data/{name}_{split}.jsonl" for split in ("rl", "test", "sft", "val")}


def chain_flags(n_ops, sft_init=""):
    """The flags that make a run use chains of `n_ops` steps (its data, response length, and the SFT
    model it starts from). [] for the default's 4 steps."""
    if n_ops == 4:
        if sft_init:
            raise ConfigError("chains of 4 steps are the default task: its SFT model starts from scratch")
        return []
    f = chain_files(n_ops)
    flags = ["--data", f["rl"], "--test-data", f["test"], "--sft-data", f["sft"], "--sft-val-data", f["val"],
             "--max-new-tokens", str(chain_tokens(n_ops))]
    return flags + (["--sft-init", sft_init] if sft_init else [])


def chain_data(n_ops):
    """Write the data files of a chain length with data/generate.py unless they exist (the script
    is deterministic, so a file that exists is the one it would write). Returns chain_files."""
    import subprocess
    import sys
    from tasks import resolve
    files = chain_files(n_ops)
    if not all(os.path.exists(resolve(p)) for p in files.values()):
        script = resolve("data/generate.py")
        subprocess.run([sys.executable, script, "--n-ops", str(n_ops), "--name", f"arith{n_ops}",
                        "--out", os.path.dirname(script)], check=True)
    return files


def chain_sft(lengths, sft_seed, common, out_dir):
    """SFT models for chains of each length in `lengths`, as a curriculum: up to 4 steps from
    scratch (4 is the default's warm-up), each longer length starting from the model of the
    previous length in [4] + lengths (--sft-init) and trained on its own chains until the usual
    stopping rule (--sft-target on its own validation prompts). Returns {n_ops: (flags, sft
    folder)}: the flags a run of that length needs. Example: lengths [8, 16] trains 4, 4 -> 8,
    8 -> 16; lengths [16] trains 4 and 4 -> 16."""
    from sft import sft_warmup
    out, init = {}, ""
    keep_freed_memory()  # as run() does: reuse freed activations (models.keep_freed_memory)
    for n in sorted(set([4] + list(lengths))):
        if n <= 4:
            init = ""  # short chains start from scratch
        chain_data(n)
        flags = chain_flags(n, init) + ["--sft-seed", str(sft_seed), "--out-dir", out_dir]
        cfg = parse_config(common + flags)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        path = sft_warmup(cfg, run_device(cfg))  # seeds itself; every RL run after it does too
        out[n] = (chain_flags(n, init), path)
        init = path
    return {n: v for n, v in out.items() if n in lengths}


def chain_main(argv):
    """`python prime_mini.py chain --n-ops 16 --sft-seeds 0,1,2`: builds a chain length's data and
    its SFT model for each SFT seed (the curriculum of chain_sft: 4 steps, then each longer length
    in --via, then this one), evaluates each on the held-out prompts (sampled and greedy, as a run
    does before RL) and prints the band, and the flags that give a run this length."""
    import argparse
    from evaluation import evaluate
    from models import load_base
    ap = argparse.ArgumentParser(prog="prime_mini.py chain", description=chain_main.__doc__, allow_abbrev=False)
    ap.add_argument("--n-ops", type=int, required=True, help="steps per chain (4 = the default task)")
    ap.add_argument("--via", default="", help="shorter lengths the curriculum passes through, e.g. 8 for 16 (default: none)")
    ap.add_argument("--sft-seeds", default="0", help="comma-separated SFT seeds")
    ap.add_argument("--out-dir", default="runs", help="parent folder of the SFT cache (runs/sft/<hash>)")
    args, common = ap.parse_known_args(argv)
    via = [int(x) for x in args.via.split(",") if x]
    if args.n_ops < 1 or any(v < 1 or v >= args.n_ops for v in via):
        raise ConfigError(f"--n-ops must be >= 1 and every --via length shorter than it (got {args.n_ops}, via {via})")
    seeds = [int(s) for s in args.sft_seeds.split(",")]
    rows = []
    for seed in seeds:
        flags, path = chain_sft(via + [args.n_ops], seed, common, args.out_dir)[args.n_ops]
        cfg = parse_config(common + flags + ["--sft-seed", str(seed), "--out-dir", args.out_dir])
        device = run_device(cfg)
        base, tok = load_base(path, device, cfg)
        test = load_rows(cfg.test_data)[: cfg.eval_n or None]
        sampled = evaluate(base, tok, test, cfg, device, False, "eval (sampled)")
        greedy = evaluate(base, tok, test, cfg, device, True, "eval (greedy)")
        info = json.load(open(os.path.join(path, "done")))
        rows.append((seed, info.get("steps"), sampled, greedy, path, flags))
        print(f"SFT seed {seed}: {info.get('steps')} steps, held-out sampled {sampled:.3f} | greedy {greedy:.3f} ({path})")
    print(f"\nchains of {args.n_ops} steps ({len(test)} held-out prompts, {cfg.eval_samples} samples each)")
    print("| SFT seed | SFT steps | held-out sampled | held-out greedy |\n|---|---|---|---|")
    for seed, n, s, g, _, _ in rows:
        print(f"| {seed} | {n} | {s:.3f} | {g:.3f} |")
    lo, hi = min(r[2] for r in rows), max(r[2] for r in rows)
    print(f"band over {len(rows)} SFT seeds: sampled {lo:.3f}-{hi:.3f}, greedy "
          f"{min(r[3] for r in rows):.3f}-{max(r[3] for r in rows):.3f}")
    # The flags its SFT model was built with (--sft-init names the previous length's model), and where it is kept.
    run_flags = common + rows[0][5] + (["--out-dir", args.out_dir] if args.out_dir != "runs" else [])
    print(f"a run of this length (SFT seed {rows[0][0]}): python prime_mini.py " + (" ".join(run_flags) or "(no flags)"))
    return rows


def steps_to(curve, target):
    """First step (1-based) at which `curve` reaches `target`, None if it never does."""
    return next((i + 1 for i, v in enumerate(curve) if v >= target), None)


def sweep_table(results, ref, window):
    """Per chain length and arm, the gain over the `ref` arm, paired by seed (a seed fixes the data
    order and all arms of a length start from one SFT model): held-out Δ (sampled, greedy) of the
    arm minus the ref arm's; the steps each seed needs to reach the ref arm's seed-mean final
    training reward (trailing mean over `window` steps) and final held-out accuracy, and the ratio
    ref-steps / arm-steps (the paper's sample efficiency; > 1: the arm gets there sooner).
    `results`: {n_ops: {arm: [per seed {"metrics", "summary"}]}}. Returns {n_ops: {arm: row}}."""
    import statistics as st

    def ms(xs):
        xs = [x for x in xs if x is not None]
        return (st.mean(xs), st.stdev(xs) if len(xs) > 1 else 0.0, len(xs)) if xs else (None, None, 0)
    def deltas(seeds, before, after):
        return [r["summary"][after] - r["summary"][before] for r in seeds]

    def held_out(r):  # {step: held-out sampled accuracy}: every evaluation along the way and the final one
        e = {m["step"]: m["eval_acc"] for m in r["metrics"] if "eval_acc" in m}
        e[r["summary"]["steps"]] = r["summary"]["acc_after"]
        return e

    def ratios(ref_hits, hits):  # ref's steps / the arm's, per seed where both got there
        return [(a / b) if (a and b) else None for a, b in zip(ref_hits, hits)]
    table = {}
    for n, arms in results.items():
        smooth = {arm: [trailing_mean([m["acc"] for m in sorted(r["metrics"], key=lambda m: m["step"])], window)
                        for r in seeds] for arm, seeds in arms.items()}
        final_reward = sum(c[-1] for c in smooth[ref]) / len(smooth[ref])  # ref's seed-mean final reward
        final_acc = sum(r["summary"]["acc_after"] for r in arms[ref]) / len(arms[ref])
        hits_reward = {arm: [steps_to(c, final_reward) for c in curves] for arm, curves in smooth.items()}
        hits_acc = {arm: [next((k for k in sorted(e) if e[k] >= final_acc), None) for e in map(held_out, seeds)]
                    for arm, seeds in arms.items()}
        d_ref, g_ref = deltas(arms[ref], "acc_before", "acc_after"), deltas(arms[ref], "greedy_before", "greedy_after")
        rows = {}
        for arm, seeds in arms.items():
            d, g = deltas(seeds, "acc_before", "acc_after"), deltas(seeds, "greedy_before", "greedy_after")
            hit_r, hit_a = hits_reward[arm], hits_acc[arm]
            eff_r, eff_a = ratios(hits_reward[ref], hit_r), ratios(hits_acc[ref], hit_a)
            f1 = [r["summary"].get("eval_step_f1") for r in seeds]
            auc = [r["summary"].get("eval_step_auroc") for r in seeds]
            rows[arm] = {"seeds": len(seeds), "acc_before": ms([r["summary"]["acc_before"] for r in seeds]),
                         "acc_after": ms([r["summary"]["acc_after"] for r in seeds]),
                         "greedy_after": ms([r["summary"]["greedy_after"] for r in seeds]),
                         "delta": ms(d), "greedy_delta": ms(g),
                         "gain": ms([a - b for a, b in zip(d, d_ref)]), "greedy_gain": ms([a - b for a, b in zip(g, g_ref)]),
                         "steps_reward": hit_r, "steps_acc": hit_a, "eff_reward": ms(eff_r), "eff_acc": ms(eff_a),
                         "eval_step_f1": ms(f1), "eval_step_auroc": ms(auc),
                         "steps": seeds[0]["summary"]["steps"]}
        table[n] = {"ref_final_reward": final_reward, "ref_final_acc": final_acc, "arms": rows}
    return table


def sweep_markdown(table, ref, window):
    def pm_(x, f="{:+.3f}"):
        return "-" if x[0] is None else (f.format(x[0]) + " ± " + f.format(x[1]).lstrip("+") +
                                         (f" (n={x[2]})" if x[2] and x[2] < 3 else ""))

    def hits(xs, total):
        return ", ".join(str(x) if x else f">{total}" for x in xs)
    lines = [f"| steps per chain | arm | seeds | held-out sampled after (Δ) | Δ vs {ref} | greedy Δ | greedy Δ vs {ref} | "
             f"steps to {ref}'s final training reward (per seed) | efficiency | steps to {ref}'s final held-out acc. | "
             f"efficiency | PRM step F1 / AUROC (held-out) |", "|" + "---|" * 12]
    for n, t in table.items():
        for arm, r in t["arms"].items():
            prm_ = (f"{r['eval_step_f1'][0]:.2f} / {r['eval_step_auroc'][0]:.2f}" if r["eval_step_f1"][0] is not None
                    and r["eval_step_auroc"][0] is not None else "-")
            lines.append(f"| {n} | {arm} | {r['seeds']} | {r['acc_after'][0]:.3f} ({pm_(r['delta'])}) | "
                         f"{pm_(r['gain']) if arm != ref else '-'} | {pm_(r['greedy_delta'])} | "
                         f"{pm_(r['greedy_gain']) if arm != ref else '-'} | {hits(r['steps_reward'], r['steps'])} | "
                         f"{pm_(r['eff_reward'], '{:.2f}') + 'x' if arm != ref and r['eff_reward'][0] else '-'} | "
                         f"{hits(r['steps_acc'], r['steps'])} | "
                         f"{pm_(r['eff_acc'], '{:.2f}') + 'x' if arm != ref and r['eff_acc'][0] else '-'} | {prm_} |")
    return "\n".join(lines)


def sweep_plot(table, ref, path):
    """Two panels against chain length: each arm's held-out gain over `ref` (sampled Δ minus ref's,
    paired by seed) and its sample efficiency (ref's steps / the arm's to ref's final training
    reward); error bars ±1 sd over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = sorted(table)
    arms = [a for a in dict.fromkeys(a for t in table.values() for a in t["arms"]) if a != ref]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, arm in enumerate(arms):
        dx = (k - (len(arms) - 1) / 2) * 0.12 * (lengths[-1] - lengths[0] + 1) / max(1, len(lengths))
        at = [n for n in lengths if arm in table[n]["arms"]]  # the lengths where this arm has finished
        rows = [table[n]["arms"][arm] for n in at]
        ax1.errorbar([n + dx for n in at], [r["gain"][0] for r in rows], yerr=[r["gain"][1] for r in rows],
                     marker="o", capsize=4, label=arm)
        eff = [(n + dx, r["eff_reward"]) for n, r in zip(at, rows) if r["eff_reward"][0] is not None]
        if eff:
            line = ax2.errorbar([x for x, _ in eff], [e[0] for _, e in eff], yerr=[e[1] for _, e in eff], marker="o",
                                capsize=4, label=arm)
            for x, e in eff:  # the seeds in which both arms reached the target (the others have no ratio)
                ax2.annotate(f"n={e[2]}", (x, e[0]), textcoords="offset points", xytext=(6, 6),
                             color=line[0].get_color(), fontsize=8)
    ax1.axhline(0, color="gray", lw=1, ls="--")
    ax2.axhline(1, color="gray", lw=1, ls="--")
    ax1.set(xlabel="steps per chain (response length)", ylabel=f"held-out sampled Δ minus {ref}'s Δ",
            title=f"Held-out gain over {ref}", xticks=lengths)
    ax2.set(xlabel="steps per chain (response length)", ylabel=f"{ref}'s steps / arm's steps",
            title=f"Sample efficiency: steps to {ref}'s final training reward\n(n: seeds where both reach it)",
            xticks=lengths)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    n_seeds = min(r["seeds"] for t in table.values() for r in t["arms"].values())
    fig.suptitle(f"Dense rewards against chain length ({n_seeds} seeds per point; error bars ±1 sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merged_lengths(path, ref, window, have):
    """The table rows of an earlier sweep (its sweep.json) for the lengths not in `have`: a sweep
    can add a length to one whose runs are gone. The earlier sweep must share `ref` and `window`."""
    if not os.path.exists(path):
        raise ConfigError(f"--merge: {path} does not exist")
    try:
        old = json.load(open(path))
        lengths = {int(n): t for n, t in old["lengths"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"--merge: {path} is not a sweep.json ({type(e).__name__}: {e})") from None
    if (old.get("ref"), old.get("window")) != (ref, window):
        raise ConfigError(f"--merge: {path} measured against --ref {old.get('ref')} with --window {old.get('window')}, "
                          f"this sweep against --ref {ref} with --window {window}")
    taken = {n: t for n, t in lengths.items() if n not in have}
    if taken:
        print(f"from {path}: chains of {', '.join(map(str, sorted(taken)))} steps")
    return taken


def sweep_main(argv, run):
    """`python prime_mini.py sweep --lengths 4,8,16 --arms outcome,oracle,prime --seeds 3 [compare and
    run flags]`: the SFT model of every length (chain_sft: a curriculum from 4 steps; SFT seed
    --sft-seed), then one `compare` per length under --name/len<N>/ (finished runs reused,
    interrupted ones resumed), then sweep.png, sweep.md and sweep.json in --name: each arm's gain
    over --ref (held-out Δ and sample efficiency, paired by seed) against chain length."""
    import argparse
    ap = argparse.ArgumentParser(prog="prime_mini.py sweep", description=sweep_main.__doc__, allow_abbrev=False)
    ap.add_argument("--lengths", default="4,8,16", help="comma-separated steps per chain")
    ap.add_argument("--arms", default="outcome,oracle,prime", help="arms, as for compare")
    ap.add_argument("--seeds", type=int, default=3, help="RL seeds 0..N-1 for every arm and length")
    ap.add_argument("--ref", default="outcome", help="the arm the others are measured against")
    ap.add_argument("--name", default="sweep", help="folder under --out-dir")
    ap.add_argument("--out-dir", default="runs", help="parent folder (also holds the cached SFT models)")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every this many steps")
    ap.add_argument("--window", type=int, default=10, help="steps in the trailing mean of the training reward")
    ap.add_argument("--sft-seed", type=int, default=0, help="SFT seed of every length's starting model")
    ap.add_argument("--via", default="", help="lengths the SFT curriculum also passes through, without RL runs "
                                              "(e.g. --lengths 16 --via 8: the model of chain --n-ops 16 --via 8)")
    ap.add_argument("--report-only", action="store_true", help="only redraw the figure and table from finished lengths")
    ap.add_argument("--merge", default="", help="an earlier sweep.json whose lengths join the figure and table, "
                                                "where this folder has no finished runs of them (same --ref and --window)")
    args, common = ap.parse_known_args(argv)
    lengths = sorted({int(x) for x in args.lengths.split(",")})
    if not lengths or lengths[0] < 1:
        raise ConfigError(f"--lengths: steps per chain must be >= 1, got {args.lengths}")
    via = [int(x) for x in args.via.split(",") if x]
    if any(v < 1 for v in via):
        raise ConfigError(f"--via: steps per chain must be >= 1, got {args.via}")
    check_at_least_one(seeds=args.seeds, window=args.window)
    names = [arm_flags(a)[0] for a in args.arms.split(",")]
    if args.ref not in names:
        raise ConfigError(f"--ref: {args.ref!r} is not one of --arms {args.arms}")
    folder = os.path.join(args.out_dir, args.name)
    if not args.report_only:
        models_ = chain_sft(sorted(set(lengths + via)), args.sft_seed, common, args.out_dir)
        for n in lengths:
            print(f"\n##### chains of {n} steps #####")
            compare_main(common + models_[n][0] + ["--sft-seed", str(args.sft_seed), "--arms", args.arms,
                                                   "--seeds", str(args.seeds), "--ref", args.ref,
                                                   "--name", f"{args.name}/len{n}", "--out-dir", args.out_dir,
                                                   "--eval-every", str(args.eval_every), "--window", str(args.window)], run)
    results = {}  # per length, the arms whose every seed is finished (the reference's must be)
    for n in lengths:
        sub = os.path.join(folder, f"len{n}")
        done = [a for a in names if all(finished_summary(os.path.join(sub, f"{a}-s{s}")) is not None
                                        for s in range(args.seeds))]
        if args.ref in done:
            results[n] = {a: [read_run(os.path.join(sub, f"{a}-s{s}")) for s in range(args.seeds)] for a in done}
        missing = [a for a in names if a not in done]
        if missing:
            print(f"chains of {n} steps: {', '.join(missing)} not finished for every seed; left out of the figure")
    earlier = merged_lengths(args.merge, args.ref, args.window, set(results)) if args.merge else {}
    if not results and not earlier:
        raise ConfigError(f"sweep: no length in {folder} has all the seeds of --ref {args.ref} finished")
    table = dict(sorted({**earlier, **sweep_table(results, args.ref, args.window)}.items()))
    md = sweep_markdown(table, args.ref, args.window)
    sweep_plot(table, args.ref, os.path.join(folder, "sweep.png"))
    open(os.path.join(folder, "sweep.md"), "w").write(md + "\n")
    json.dump({"ref": args.ref, "window": args.window, "common_flags": common, "lengths": table,
               "merged": {str(n): args.merge for n in earlier}},
              open(os.path.join(folder, "sweep.json"), "w"), indent=1)
    print("\n" + md + f"\n\nfigure and table in {folder}/ (sweep.png, sweep.md, sweep.json)")
    return table
