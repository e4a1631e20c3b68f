"""Benchmark: where an RL step's time goes, PRIME's overhead, and the same work in TRL.

    python bench.py                      # the table for the default task (BENCHMARKS.md)
    python bench.py --steps 10 --threads 1 --no-trl
    python bench.py --steps 3 --warmup 1 -- --tiny-hidden 32 ...   # flags after -- go to prime_mini
    python bench.py rollout              # our decode loop against transformers' generate (rollout_main)

Each arm runs in its own subprocess (so each gets its own peak resident memory), runs `warmup`
RL steps that are not counted and then `steps` that are, and reports per-step medians:

    prime              the default PRIME step (`--reward-mode prime`)
    outcome            the outcome-only RLOO baseline (`--reward-mode outcome`)
    outcome, no filter outcome-only with the accuracy filter off (`--filter-low 0 --filter-high 1`),
                       so that it generates exactly P*K responses per step, as TRL does
    TRL RLOO           TRL's `RLOOTrainer` on the same work: the same SFT model, tokenizer, prompts,
                       P, K, max new tokens, sampling (T=1, no top-k/top-p), LoRA (rank, alpha,
                       targets), learning rate, one policy update per step, and our verifier as
                       its reward function. Needs `pip install -r requirements-bench.txt`; skipped
                       with a message when trl is not installed. Our arms run with the allocator
                       setting that run() makes (models.keep_freed_memory); TRL's with glibc's
                       default, as its users run it, unless --trl-keep-freed-memory.

Phases of our step come from the run's own metrics.jsonl (t_rollout, t_verify, t_prm, t_policy,
t_step; other = step - the four). "model calls" is the time inside generate, forwards
(`token_logprobs`), backward passes and optimizer steps, timed by wrapping those calls in the
worker process; the rest of a step (decoding, padding, advantages, grad clipping, Python) is
"outside model calls". TRL's phases are timed the same way, by wrapping its methods.

Load matters: this machine has 2 cores; run it on an idle machine (BENCHMARKS.md says under
what load each published number was taken). "CPU s" is the process's CPU time per step
(`time.process_time`): with `--threads 1` it is closer to the wall time of an idle machine and
less disturbed by other jobs than wall time (not undisturbed: the cores share caches).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("t_rollout", "t_verify", "t_prm", "t_policy")
PRM_PARTS = ("t_ref", "t_prm_recompute")  # inside t_prm: the π_ref forward, the double-forward recompute


# ---------------------------------------------------------------------------------------------
# Pure table logic (tested in tests/test_bench.py)
# ---------------------------------------------------------------------------------------------
def summarize(steps):
    """Medians over measured steps. `steps` are per-step dicts with t_step, the phase times (absent
    = 0), t_model (time inside model calls) and gen_tokens. Returns a dict of medians, with
    t_other = t_step - phases, per step, and model_share = t_model / t_step, per step."""
    assert steps, "no measured steps: raise --steps"
    col = lambda f: statistics.median(f(s) for s in steps)  # noqa: E731
    out = {"n": len(steps), "t_step": col(lambda s: s["t_step"]), "t_step_min": min(s["t_step"] for s in steps),
           "cpu_step": col(lambda s: s.get("cpu_step", float("nan")))}
    for k in PHASES + PRM_PARTS:
        out[k] = col(lambda s: s.get(k, 0.0))
    out["t_other"] = col(lambda s: s["t_step"] - sum(s.get(k, 0.0) for k in PHASES))
    out["outside_share"] = col(lambda s: 1.0 - s["t_model"] / s["t_step"])
    out["tok_per_s"] = col(lambda s: s["gen_tokens"] / s["t_rollout"])
    return out


def fmt_table(results):
    """A Markdown table of the arms' medians; `results` maps arm name -> summarize() + rss_mb."""
    head = ("| arm | step s | CPU s | rollout | verify | PRM fwd+update | policy fwd+update | other | "
            "gen tok/s | outside model calls | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['t_step']:.3f} | {r['cpu_step']:.3f} | {r['t_rollout']:.3f} | {r['t_verify']:.3f} | "
                     f"{r['t_prm']:.3f} | {r['t_policy']:.3f} | {r['t_other']:.3f} | {r['tok_per_s']:.0f} | "
                     f"{100 * r['outside_share']:.1f}% | {r['rss_mb']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Timing the model calls inside a worker: wrap them, accumulate per step
# ---------------------------------------------------------------------------------------------
class ModelClock:
    """Accumulates seconds spent in wrapped callables (model calls) and generated tokens."""

    def __init__(self):
        self.t, self.tokens, self.cpu0 = 0.0, 0, time.process_time()

    def reset(self):
        t, n = self.t, self.tokens
        self.t, self.tokens = 0.0, 0
        return t, n

    def wrap(self, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t += time.perf_counter() - t
        timed.__wrapped__ = fn
        return timed


def wrap_optimizer_and_backward(clock):
    import torch
    torch.Tensor.backward = clock.wrap(torch.Tensor.backward)
    torch.optim.AdamW.step = clock.wrap(torch.optim.AdamW.step)  # before any optimizer is built


def wrap_model_calls(clock):
    """Time `sampling.generate` (and count its valid tokens) and `sampling.token_logprobs` under
    every name they are known by: the loop and the evaluation call the names they imported
    (`from sampling import generate`), so wrapping the module's attribute alone times nothing.
    Returns the (module, name, original) replaced, to undo it."""
    import sampling
    gen, logp = sampling.generate, sampling.token_logprobs

    def generate(*a, **kw):  # count the valid generated tokens (through the first EOS)
        resp, mask = gen(*a, **kw)
        clock.tokens += int(mask.sum().item())
        return resp, mask
    wrapped = {gen: clock.wrap(generate), logp: clock.wrap(logp)}  # functions hash by identity
    replaced = []
    root = os.path.dirname(os.path.abspath(__file__))
    ours = [m for m in list(sys.modules.values())  # this project's modules, bench itself aside
            if os.path.dirname(os.path.abspath(getattr(m, "__file__", None) or "/")) == root and m.__name__ != __name__]
    for module in ours:
        for name in ("generate", "token_logprobs"):
            fn = getattr(module, name, None)
            if fn is gen or fn is logp:
                setattr(module, name, wrapped[fn])
                replaced.append((module, name, fn))
    return replaced


def worker_ours(args, pm_argv):
    """Run prime_mini.run() for warmup+steps RL steps; return the measured steps' metrics."""
    import config
    import prime_mini as pm
    import sampling
    clock = ModelClock()
    wrap_optimizer_and_backward(clock)
    wrap_model_calls(clock)
    collect, fmt = pm.collect, pm.fmt_step

    def collect_reset(*a, **kw):  # a step starts with collect(): start its clock afresh
        clock.reset()
        clock.cpu0 = time.process_time()
        return collect(*a, **kw)

    def fmt_record(step, cfg, m):  # called once per step, after t_step, before m is written
        m["t_model"], m["gen_tokens"] = clock.reset()
        m["cpu_step"] = time.process_time() - clock.cpu0
        return fmt(step, cfg, m)
    pm.collect, pm.fmt_step = collect_reset, fmt_record
    scratch = os.path.join(args.out_dir, f"bench-{args.arm}")  # this arm's timing run of the last bench
    if os.path.isdir(scratch):  # a new run refuses an existing folder: bench's own is replaced, and says so
        import shutil
        print(f"bench: removing the previous timing run {scratch}", file=sys.stderr)
        shutil.rmtree(scratch)
    cfg = config.parse_config(pm_argv + ["--steps", str(args.warmup + args.steps), "--eval-n", "1",
                                     "--eval-samples", "1", "--no-show-progress", "--out-dir", args.out_dir,
                                     "--run-name", f"bench-{args.arm}"] + (["--threads", str(args.threads)] if args.threads else []))
    _, run_dir = pm.run(cfg)
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [s for s in steps if s["step"] > args.warmup and "t_policy" in s]


def worker_trl(args, pm_argv):
    """TRL's RLOOTrainer on the same work as `outcome, no filter`; per-step times via a callback."""
    import torch
    import config
    import models
    import prime_mini as pm
    import sft
    import tasks
    import verifiers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer
    cfg = config.parse_config(pm_argv + ["--no-show-progress", "--out-dir", args.out_dir])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.trl_keep_freed_memory:  # the allocator setting our run() makes, for TRL's process too
        models.keep_freed_memory()
    torch.manual_seed(cfg.seed)
    path = cfg.model or sft.sft_warmup(cfg, "cpu")
    tok = models.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n_steps = args.warmup + args.steps
    all_rows = [r for p in cfg.data.split(",") for r in tasks.load_rows(p)]
    stream = pm.PromptStream(len(all_rows), cfg.seed)
    rows = [all_rows[stream.next()] for _ in range(cfg.P * n_steps)]  # the first prompts our loop would see
    ds = Dataset.from_list([{"prompt": tasks.prompt_text(tok, r["prompt"], r.get("ability")), "idx": i} for i, r in enumerate(rows)])

    clock = ModelClock()
    wrap_optimizer_and_backward(clock)
    phase = {"t_rollout": 0.0, "t_verify": 0.0, "t_policy": 0.0}

    def reward(prompts, completions, idx, **kw):  # our verifier, on the same rows
        t = time.perf_counter()
        out = [verifiers.outcome_reward(rows[i], c)[0] for i, c in zip(idx, completions)]
        phase["t_verify"] += time.perf_counter() - t
        return out

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=int(cfg.lora_alpha_ratio * cfg.lora_r), lora_dropout=0.0,
                      target_modules=cfg.lora_targets, bias="none", task_type="CAUSAL_LM")
    tcfg = RLOOConfig(
        output_dir=os.path.join(args.out_dir, "bench-trl"), per_device_train_batch_size=cfg.P * cfg.K,
        num_generations=cfg.K, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=0, top_p=1.0, beta=0.0, num_iterations=1, gradient_accumulation_steps=1,
        learning_rate=cfg.lr_policy, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.wd_policy,
        max_grad_norm=cfg.policy_grad_clip, epsilon=cfg.eps_clip, gradient_checkpointing=False, bf16=False,
        use_cpu=True, max_steps=n_steps, report_to="none", logging_steps=10 ** 6, save_strategy="no",
        disable_tqdm=True, shuffle_dataset=False, dataloader_num_workers=0, seed=cfg.seed)
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()
            clock.reset()
            for k in phase:
                phase[k] = 0.0

        def on_step_end(self, a, state, control, **kw):
            t_model, n_tok = clock.reset()
            times.append({"step": state.global_step, "t_step": time.perf_counter() - self.t0,
                          "cpu_step": time.process_time() - self.cpu0, **phase,
                          "t_model": t_model, "gen_tokens": n_tok})

    trainer = RLOOTrainer(model=model, reward_funcs=reward, args=tcfg, train_dataset=ds, processing_class=tok,
                          peft_config=lora, callbacks=[StepTimer()])
    inner_gen = trainer._generate_single_turn

    def gen_timed(*a, **kw):  # generate: rollout time and valid tokens
        t = time.perf_counter()
        ids = inner_gen(*a, **kw)
        phase["t_rollout"] += time.perf_counter() - t
        clock.tokens += sum(len(c) for c in ids)
        return ids
    trainer._generate_single_turn = clock.wrap(gen_timed)
    trainer._get_per_token_logps_and_entropies = clock.wrap(trainer._get_per_token_logps_and_entropies)
    # Everything after scoring (old-logp forward, loss forward, backward, optimizer) counts as policy.
    inner_train = trainer.training_step

    def train_timed(*a, **kw):
        t = time.perf_counter()
        r0, v0 = phase["t_rollout"], phase["t_verify"]
        out = inner_train(*a, **kw)
        total = time.perf_counter() - t
        phase["t_policy"] += total - (phase["t_rollout"] - r0) - (phase["t_verify"] - v0)
        return out
    trainer.training_step = train_timed
    opt_step = torch.optim.AdamW.step  # the optimizer step runs outside training_step: count it as policy

    def opt_timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return opt_step(self, *a, **kw)
        finally:
            phase["t_policy"] += time.perf_counter() - t
    torch.optim.AdamW.step = opt_timed
    trainer.train()
    return [s for s in times if s["step"] > args.warmup]


# ---------------------------------------------------------------------------------------------
# The parent: one subprocess per arm, then the tables
# ---------------------------------------------------------------------------------------------
ARMS = {
    "prime": ["--reward-mode", "prime"],
    "outcome": ["--reward-mode", "outcome"],
    "outcome, no filter": ["--reward-mode", "outcome", "--filter-low", "0", "--filter-high", "1"],
    "TRL RLOO": ["--reward-mode", "outcome", "--filter-low", "0", "--filter-high", "1"],
}


def run_arm(name, args, pm_argv):
    kind = "trl" if name.startswith("TRL") else "ours"
    argv = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--arm", name.replace(", ", "-").replace(" ", "-"),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--out-dir", args.out_dir] + (["--trl-keep-freed-memory"] if args.trl_keep_freed_memory else []) + [
            "--"] + pm_argv + ARMS[name]
    t = time.time()
    out = subprocess.run(argv, cwd=HERE, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"arm {name!r} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name}: {len(res['steps'])} measured steps, {time.time() - t:.0f}s", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="measured RL steps per arm")
    ap.add_argument("--warmup", type=int, default=3, help="RL steps run first and not counted")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per arm (0 = torch's default)")
    ap.add_argument("--out-dir", default="runs", help="run folder (the SFT cache under it is reused)")
    ap.add_argument("--arms", default="prime,outcome,outcome-nofilter,trl",
                    help="comma-separated subset of prime, outcome, outcome-nofilter, trl")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL arm")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every arm this many times, the arms alternating; the ratios are then "
                         "also given per repeat (median and range over the repeats)")
    ap.add_argument("--trl-keep-freed-memory", action="store_true",
                    help="give the TRL arm the allocator setting that prime_mini's run() makes for itself "
                         "(models.keep_freed_memory): separates the allocator's share of ours / TRL from the code's")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rollout"]:
        return rollout_main(argv[1:])
    pm_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    if args.worker:  # inside a subprocess: run one arm, print its steps and peak RSS as JSON
        steps = (worker_trl if args.worker == "trl" else worker_ours)(args, pm_argv)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"steps": steps, "rss_mb": rss_mb}))
        return

    key = {"prime": "prime", "outcome": "outcome", "outcome-nofilter": "outcome, no filter", "trl": "TRL RLOO"}
    unknown = [a for a in args.arms.split(",") if a not in key]
    if unknown:
        sys.exit(f"bench.py --arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(key)}")
    if args.repeats < 1:
        sys.exit(f"bench.py --repeats {args.repeats}: must be at least 1")
    names = [key[a] for a in args.arms.split(",")]
    if "TRL RLOO" in names and (args.no_trl or not _have_trl()):
        print("TRL arm skipped: " + ("--no-trl" if args.no_trl else
              "trl is not installed (pip install -r requirements-bench.txt)"))
        names.remove("TRL RLOO")
    print(f"bench: {args.warmup} warm-up + {args.steps} measured steps per arm"
          + (f", {args.repeats} repeats (arms alternate)" if args.repeats > 1 else "")
          + f", threads {args.threads or 'default'}, prime_mini flags {pm_argv or '(defaults)'}")
    runs = []  # per repeat: arm -> its worker's {"steps", "rss_mb"}
    for r in range(args.repeats):
        # Each repeat runs every arm once, back to back, the order rotated so that each arm goes
        # first as often as the others: a slow spell of the machine then falls on every arm's
        # share alike, and the ratio of two arms within a repeat is a paired measurement.
        order = names[r % len(names):] + names[:r % len(names)]
        if args.repeats > 1:
            print(f"repeat {r + 1}/{args.repeats}: {', '.join(order)}", flush=True)
        runs.append({n: run_arm(n, args, pm_argv) for n in order})
    raw = {n: {"steps": [s for run in runs for s in run[n]["steps"]], "rss_mb": max(run[n]["rss_mb"] for run in runs)}
           for n in names}  # every repeat's measured steps, pooled
    results = {n: {**summarize(r["steps"]), "rss_mb": r["rss_mb"]} for n, r in raw.items()}
    per_repeat = [{n: {**summarize(run[n]["steps"]), "rss_mb": run[n]["rss_mb"]} for n in names} for run in runs]
    print("\nMedian seconds per RL step and per phase" + (f" (the {args.repeats} repeats' steps pooled)" if args.repeats > 1 else "") + "\n")
    print(fmt_table(results))
    print()
    if "prime" in results and "outcome" in results:
        p, o = results["prime"], results["outcome"]
        print(f"PRIME / outcome step time: {p['t_step'] / o['t_step']:.2f}x median, "
              f"{p['t_step_min'] / o['t_step_min']:.2f}x fastest step, {p['cpu_step'] / o['cpu_step']:.2f}x CPU time "
              "(paper: 1.28x)")
    table = ratio_table(results, "smollm2-135m" in pm_argv, per_repeat)
    if table:
        print("\nThe ratios against their goals (BENCHMARKS.md)\n")
        print(table)
    if "TRL RLOO" in results and "outcome, no filter" in results:
        ours, trl = results["outcome, no filter"], results["TRL RLOO"]
        print("\nSame work, ours (outcome, no filter) vs TRL RLOOTrainer, median s per step\n")
        print("| phase | ours | TRL | ours / TRL |\n|---|---|---|---|")
        for k, label in (("t_step", "step"), ("t_rollout", "rollout (generate)"), ("t_verify", "verify"),
                         ("t_policy", "policy fwd+update"), ("t_other", "other")):
            ratio = ours[k] / trl[k] if trl[k] else float("nan")
            print(f"| {label} | {ours[k]:.3f} | {trl[k]:.3f} | {ratio:.2f} |")
        print(f"| CPU seconds per step (median) | {ours['cpu_step']:.3f} | {trl['cpu_step']:.3f} | "
              f"{ours['cpu_step'] / trl['cpu_step']:.2f} |")
        print(f"| fastest step (less sensitive to load) | {ours['t_step_min']:.3f} | {trl['t_step_min']:.3f} | "
              f"{ours['t_step_min'] / trl['t_step_min']:.2f} |")
    if args.json:
        json.dump({"results": results, "raw": raw, "per_repeat": per_repeat, "argv": argv}, open(args.json, "w"), indent=1)


def spread(values, fmt):
    """'median (min-max)' of one figure over the repeats, e.g. spread([1.6, 1.7, 1.5], '{:.2f}x') ->
    '1.60x (1.50x-1.70x)'."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratio_table(results, smollm2=False, per_repeat=()):
    """One Markdown table of the figures with a goal: PRIME / outcome-only step time (goal 1.35x on
    the tiny default, 1.5x on the SmolLM2 preset; the paper measured 1.28x), ours / TRL on the same
    work (0.6x), and on the SmolLM2 preset PRIME's median step (25 s). Each as median, fastest step
    and CPU time where they apply; '' when no arm pair is there. With `per_repeat` (one results
    dict per repeat, more than one), a last column gives the figure per repeat, each from arms that
    ran back to back: the median of those paired figures and their range, the spread to read a
    gap to a goal against."""
    rows, repeats = [], len(per_repeat) > 1

    def row(cells, f, fmt):
        extra = f" {spread([f(r) for r in per_repeat], fmt)} |" if repeats else ""  # every repeat ran every arm
        rows.append("| " + " | ".join(cells[:-1]) + " |" + extra + f" {cells[-1]} |")

    def ratio(label, a, b, goal):
        x, y = results[a], results[b]
        row([label, f"{x['t_step'] / y['t_step']:.2f}x", f"{x['t_step_min'] / y['t_step_min']:.2f}x",
             f"{x['cpu_step'] / y['cpu_step']:.2f}x", f"<= {goal}x"], lambda r: r[a]["t_step"] / r[b]["t_step"], "{:.2f}x")

    def floor(r):
        # The floor: outcome-only's step plus the work PRIME's algorithm adds and nothing else: the
        # π_ref forward and the double-forward recompute as measured, and a PRM update costed at
        # outcome-only's own policy update (same shapes, same LoRA rank).
        p, o = r["prime"], r["outcome"]
        extra = p["t_ref"] + o["t_policy"] + p["t_prm_recompute"]
        return (o["t_step"] + extra) / o["t_step"], extra
    if "prime" in results and "outcome" in results:
        p, o = results["prime"], results["outcome"]
        ratio("PRIME / outcome-only step", "prime", "outcome", 1.5 if smollm2 else 1.35)
        value, extra = floor(results)
        row([f"PRIME / outcome-only floor: + π_ref forward ({p['t_ref']:.3f} s) + one more update "
             f"({o['t_policy']:.3f} s) + PRM recompute ({p['t_prm_recompute']:.3f} s)", f"{value:.2f}x", "-", "-",
             f"PRIME's PRM phase {p['t_prm']:.3f} s against {extra:.3f} s"], lambda r: floor(r)[0], "{:.2f}x")
    if "TRL RLOO" in results and "outcome, no filter" in results:
        ratio("ours / TRL RLOOTrainer, same work", "outcome, no filter", "TRL RLOO", 0.6)
    if smollm2 and "prime" in results:
        p = results["prime"]
        row(["PRIME step, seconds", f"{p['t_step']:.1f}", f"{p['t_step_min']:.1f}", f"{p['cpu_step']:.1f}", "<= 25"],
            lambda r: r["prime"]["t_step"], "{:.1f}")
    if not rows:
        return ""
    head = "| figure | median | fastest step | CPU time |" + (
        f" per repeat: median (range) of {len(per_repeat)} |" if repeats else "") + " goal |"
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1)] + rows)


# ---------------------------------------------------------------------------------------------
# `python bench.py rollout`: our decode loop against transformers' generate (decoding.py)
# ---------------------------------------------------------------------------------------------
def seed_sft_cache(out_dir):
    """Copy the SFT models kept in the repository (results/sft/<key>, the sweep's curriculum) into
    OUT_DIR/sft when they are not there, so that the chain lengths' models are found, not retrained
    (the 16-step one takes about an hour on one core)."""
    import shutil
    kept = os.path.join(HERE, "results", "sft")
    for key in sorted(os.listdir(kept)) if os.path.isdir(kept) else []:
        src, dst = os.path.join(kept, key), os.path.join(out_dir, "sft", key)
        if os.path.exists(os.path.join(src, "done")) and not os.path.exists(dst):
            shutil.copytree(src, dst)


def rollout_setting(n_ops, args):
    """(flags of a run of this chain length, its config, its SFT model's folder). The default task
    for 4 steps; longer chains as `sweep` runs them (P 16, 200 held-out prompts x 4 samples), their
    SFT models by the sweep's curriculum 4 -> --via -> n_ops (experiments.chain_sft)."""
    from config import parse_config
    from experiments import chain_sft
    from sft import sft_warmup
    if n_ops == 4:
        flags = []
        path = sft_warmup(parse_config(["--out-dir", args.out_dir]), "cpu")
    else:
        via = [v for v in args.via if v < n_ops]
        flags, path = chain_sft(via + [n_ops], 0, [], args.out_dir)[n_ops]
        flags = flags + ["--P", "16", "--eval-n", "200", "--eval-samples", "4"]
    cfg = parse_config(flags + ["--out-dir", args.out_dir, "--no-show-progress"])
    return flags, cfg, path


def time_rollouts(base, tok, cfg, threads, repeats, eval_rows):
    """Per repeat: seconds and valid tokens of one rollout's generate call (P·K rows of the first
    P training prompts) with --decode hf and static, in alternating order, from the same seed;
    whether the two gave the same tokens; and (eval_rows) the seconds of the evaluation's sampled
    pass with each."""
    import torch
    import sampling
    from evaluation import evaluate
    from tasks import load_rows, prompt_text
    torch.set_num_threads(threads)
    rows = load_rows(cfg.data)[:cfg.P]
    texts = [prompt_text(tok, r["prompt"], r.get("ability")) for r in rows for _ in range(cfg.K)]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    out = []
    sampling.generate(base, tok, ids[:4], am[:4], 4, 1.0, decode="hf")  # first-call costs out of the timings
    sampling.generate(base, tok, ids[:4], am[:4], 4, 1.0, decode="static")
    for r in range(repeats):
        rep = {}
        for decode in (("hf", "static") if r % 2 == 0 else ("static", "hf")):
            torch.manual_seed(r)
            t = time.perf_counter()
            resp, mask = sampling.generate(base, tok, ids, am, cfg.max_new_tokens, cfg.temperature, decode=decode)
            rep[decode] = {"s": time.perf_counter() - t, "tokens": int(mask.sum()), "resp": resp}
        rep["same"] = torch.equal(rep["hf"]["resp"], rep["static"]["resp"])
        for decode in ("hf", "static"):
            del rep[decode]["resp"]
        out.append(rep)
    evals = {}
    for decode in ("hf", "static") if eval_rows else ():
        cfg.decode = decode
        t = time.perf_counter()
        acc = evaluate(base, tok, eval_rows, cfg, "cpu", False, "eval (sampled)")
        evals[decode] = {"s": time.perf_counter() - t, "acc": acc}
    return out, evals


def rollout_tables(res):
    """Markdown tables of `rollout_main`'s results: rollout speed, the evaluation's sampled pass,
    and the share of an RL step spent in rollout with each sampler."""
    med = statistics.median
    lines = ["| chain steps | threads | rows x new tokens | generate tok/s | our loop tok/s | our loop / generate, "
             "median (range) of repeats | same tokens |", "|---|---|---|---|---|---|---|"]
    for r in res["rollout"]:
        reps = r["repeats"]
        ratio = [x["hf"]["s"] / x["static"]["s"] for x in reps]
        tok_s = lambda d: med(x[d]["tokens"] / x[d]["s"] for x in reps)  # noqa: E731
        lines.append(f"| {r['n_ops']} | {r['threads']} | {r['rows']} x {r['max_new']} | {tok_s('hf'):.0f} | "
                     f"{tok_s('static'):.0f} | {spread(ratio, '{:.2f}x')} | {sum(x['same'] for x in reps)}/{len(reps)} |")
    out = "\n".join(lines)
    if any(r["eval"] for r in res["rollout"]):
        lines = ["| chain steps | threads | prompts x samples | generate s | our loop s | our loop / generate | "
                 "accuracy (generate, ours) |", "|---|---|---|---|---|---|---|"]
        for r in res["rollout"]:
            e = r["eval"]
            if e:
                lines.append(f"| {r['n_ops']} | {r['threads']} | {r['eval_prompts']} x {r['eval_samples']} | "
                             f"{e['hf']['s']:.1f} | {e['static']['s']:.1f} | {e['hf']['s'] / e['static']['s']:.2f}x | "
                             f"{e['hf']['acc']:.3f}, {e['static']['acc']:.3f} |")
        out += "\n\nThe evaluation's sampled pass (one call of evaluate, verification included)\n\n" + "\n".join(lines)
    if res.get("steps"):
        lines = ["| chain steps | sampler | step s | rollout s | rollout share of the step |", "|---|---|---|---|---|"]
        for s in res["steps"]:
            lines.append(f"| {s['n_ops']} | {s['decode']} | {s['t_step']:.2f} | {s['t_rollout']:.2f} | "
                         f"{100 * s['t_rollout'] / s['t_step']:.0f}% |")
        out += ("\n\nAn RL step (outcome-only, median of the measured steps, threads "
                f"{res['step_threads']}) with each sampler\n\n" + "\n".join(lines))
    return out


def rollout_main(argv):
    """`python bench.py rollout`: per chain length and thread count, one rollout's generate call
    timed with transformers' generate and with our decode loop on the same prompts and seed
    (tok/s, the ratio per repeat, whether the tokens were the same), the evaluation's sampled
    pass with each, and the share of an outcome-only RL step spent in rollout with each."""
    ap = argparse.ArgumentParser(prog="bench.py rollout", description=rollout_main.__doc__)
    ap.add_argument("--lengths", default="4,16", help="chain lengths (steps per chain; 4 = the default task)")
    ap.add_argument("--via", default="8", help="the curriculum's lengths between 4 and a longer chain (as the sweep)")
    ap.add_argument("--threads", default="1,2", help="torch CPU thread counts")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per sampler, length and thread count")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation's sampled pass")
    ap.add_argument("--steps", type=int, default=3, help="measured RL steps per sampler and length (0: skip)")
    ap.add_argument("--warmup", type=int, default=1, help="RL steps run first and not counted")
    ap.add_argument("--step-threads", type=int, default=2, help="torch CPU threads of the RL steps")
    ap.add_argument("--out-dir", default="runs", help="run folder; the SFT models are found or trained under OUT_DIR/sft")
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        args.via = [int(x) for x in args.via.split(",") if x]
        threads = [int(x) for x in args.threads.split(",")]
    except ValueError as e:
        sys.exit(f"bench.py rollout: --lengths, --via and --threads take comma-separated integers ({e})")
    if min(lengths) < 1 or min(threads) < 1 or args.repeats < 1:
        sys.exit("bench.py rollout: lengths, thread counts and --repeats must be at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    seed_sft_cache(args.out_dir)
    from models import load_base
    from tasks import load_rows
    res = {"rollout": [], "steps": [], "step_threads": args.step_threads, "argv": argv}
    for n in lengths:
        flags, cfg, path = rollout_setting(n, args)
        base, tok = load_base(path, "cpu", cfg)
        eval_rows = [] if args.no_eval else load_rows(cfg.test_data)[:cfg.eval_n]
        for t in threads:
            print(f"rollout: {n}-step chains, {t} thread(s)", flush=True)
            reps, evals = time_rollouts(base, tok, cfg, t, args.repeats, eval_rows)
            res["rollout"].append({"n_ops": n, "threads": t, "rows": cfg.P * cfg.K, "max_new": cfg.max_new_tokens,
                                   "repeats": reps, "eval": evals, "eval_prompts": len(eval_rows),
                                   "eval_samples": cfg.eval_samples})
        for decode in ("hf", "static") if args.steps else ():
            step_args = argparse.Namespace(steps=args.steps, warmup=args.warmup, threads=args.step_threads,
                                           out_dir=args.out_dir, trl_keep_freed_memory=False)
            steps = run_arm("outcome", step_args, flags + ["--decode", decode])["steps"]
            res["steps"].append({"n_ops": n, "decode": decode, **{k: statistics.median(s[k] for s in steps)
                                                                  for k in ("t_step", "t_rollout")}})
    print("\nOne rollout's generate call (P·K rows), our decode loop against transformers' generate\n")
    print(rollout_tables(res))
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


def _have_trl():
    import importlib.util
    return importlib.util.find_spec("trl") is not None


if __name__ == "__main__":
    main()
