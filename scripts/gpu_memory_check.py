"""Measure the peak GPU memory of two PRIME steps of a preset, beside the planner's estimate.

The model has the preset's architecture (the configs embedded in models.py, KNOWN_ARCHS) with
random weights, made on the GPU in bf16 and saved to a temporary folder with a small byte-level
BPE chat tokenizer (models.build_chat_tokenizer): nothing is downloaded. Memory does not depend
on the weights' values. The run then goes through the real path, `prime_mini.run` with
`--model FOLDER` and the preset's flags (for the 7B preset: NF4 while loading, bf16 embeddings,
norms and head, gradient checkpointing, two LoRA adapters), so what is measured is what a real
run would hold, at the planner's worst case:

    prompts      every prompt is as close to --max-prompt-len tokens as the tokenizer allows (the
                 planner counts full-length prompts)
    responses    random weights almost never sample the end token, so responses run to
                 --max-new-tokens
    filter       --filter-low 0 --filter-high 1: every prompt is kept, so both steps train
    P            --gen-batch / K by default: one generation batch a step. The planner's peak
                 depends on the generation batch and the micro-batch, not on P (a larger P only
                 adds generation batches and micro-batches one after another); it says so below
    evaluation   skipped (evaluate() returns 0): it generates --gen-batch rows at a time like a
                 rollout, and at full length it would add minutes; --reward-pages 0

Printed: the planner's table for the same configuration first, then, each as soon as it is
measured (so that a run stopped by a time limit has printed what it reached), memory after loading
(planner: weights, adapters and their optimizer states) and the peak of each phase (generation:
rollouts; training: reference log-probs, PRM and policy updates) from
torch.cuda.max_memory_allocated, and a summary at the end. `--steps 1` measures both phases once.
A --max-prompt-len shorter than the shortest prompt (system prompt and task suffix, ~330 tokens
with this tokenizer) stops before the run with that number. scripts/gpu_checks.sh runs this for
the two Qwen presets within 10 minutes of a GPU.

Run:  python scripts/gpu_memory_check.py --preset qwen2.5-math-7b [--gpu-memory-gb 16] [prime_mini flags]
      (any prime_mini flag given after the preset wins, e.g. --max-new-tokens 512 for a quicker check;
       needs ~16 GB of free disk for the 7B preset's temporary bf16 checkpoint. Not yet run on a
       GPU: none was available where it was written, so how long it takes is not known; the
       docs/REAL_MODELS.md's "GPU memory check" section is where its first results go.)
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import config  # noqa: E402
import models  # noqa: E402
import prime_mini as pm  # noqa: E402
import tasks  # noqa: E402

GB = models.GB
NO_CUDA = ("gpu_memory_check.py: needs a CUDA GPU (torch.cuda.is_available() is False): it measures "
           "torch.cuda.max_memory_allocated. On the CPU, scripts/check_memory.py measures resident memory, "
           "and python prime_mini.py --preset NAME --plan-memory prints the plan alone.")


def parse_args(argv):
    """(the preset, the prime_mini flags that follow it). Only presets with a model whose
    architecture is embedded in models.py can be built without a download."""
    presets = [p for p, v in config.PRESETS.items() if v.get("model") in models.KNOWN_ARCHS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                 epilog="Any other flag is passed to prime_mini (see python prime_mini.py --help) and wins.")
    ap.add_argument("--preset", required=True, choices=presets, help="the preset whose plan is checked")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (model, data, run) and print its path")
    args, extra = ap.parse_known_args(argv)
    if any(a.split("=")[0] in ("--model", "--data", "--test-data") for a in extra):
        ap.error("--model, --data and --test-data are made by this script (a random-weight model of the "
                 "preset's architecture and full-length prompts)")
    return args.preset, args.keep, extra


def run_config(preset, model_dir, data, extra):
    """prime_mini's Config for the measured run: the preset, the script's choices, then `extra`
    (which wins). Unless --P is given, P = gen_batch / K: one generation batch a step."""
    argv = ["--preset", preset, "--model", model_dir, "--data", data, "--test-data", data, "--steps", "2",
            "--filter-low", "0", "--filter-high", "1", "--eval-n", "1", "--eval-samples", "1", "--reward-pages", "0",
            "--save-every", "0", "--run-name", "gpu-memory-check", "--out-dir", os.path.join(os.path.dirname(model_dir), "runs")]
    cfg = config.parse_config(argv + extra)
    if "P" not in config.explicit_fields(extra) and cfg.gen_batch:
        cfg.P = max(1, cfg.gen_batch // cfg.K)
    return cfg


def chat_tokenizer():
    """The small byte-level BPE chat tokenizer the random-weight model is saved with."""
    corpus = [tasks.SYSTEM_PROMPT, tasks.TASK_SUFFIX["math"]] + [f"{a}+{b}={a + b}" for a in range(60) for b in range(60)]
    return models.build_chat_tokenizer(corpus)


def build_model(preset, folder):
    """A random-weight model of the preset's architecture, made on the GPU in bf16 and saved with a
    small chat tokenizer; returns the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, arch = models.KNOWN_ARCHS[config.PRESETS[preset]["model"]]
    tok = chat_tokenizer()
    tok.save_pretrained(folder)
    mc = AutoConfig.for_model(model_type, **arch, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(mc, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return tok


def write_prompts(tok, path, max_len, n=64):
    """n math rows whose chat prompt is as long as fits in max_len tokens (a sum of many terms)."""
    rng = random.Random(0)
    rows = []

    def n_tokens(r):
        return len(tok(tasks.prompt_text(tok, r["prompt"], "math"), add_special_tokens=False)["input_ids"])
    for _ in range(n):
        terms = [str(rng.randint(10, 99)) for _ in range(4 * max_len)]

        def row(k):
            return {"data_source": "gpu_memory_check", "ability": "math", "prompt": [
                {"role": "user", "content": "+".join(terms[:k]) + "="}], "reward_model": {"ground_truth": "0", "style": "rule"}}

        def fits(k):
            return n_tokens(row(k)) <= max_len

        if not fits(1):
            sys.exit(f"gpu_memory_check.py: --max-prompt-len {max_len} is shorter than the shortest prompt "
                     f"({n_tokens(row(1))} tokens with the system prompt and task suffix): give at least that")
        lo, hi = 1, len(terms)  # the largest k whose prompt fits: binary search on the token count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        rows.append(row(lo))
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main(argv=None):
    preset, keep, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        sys.exit(2)
    work = tempfile.mkdtemp(prefix="prime-gpu-mem-")
    model_dir, data = os.path.join(work, "model"), os.path.join(work, "prompts.jsonl")
    t = time.time()
    tok = build_model(preset, model_dir)
    open(data, "w").close()  # parse_config checks that the data file exists; its rows need max_prompt_len
    cfg = run_config(preset, model_dir, data, extra)
    write_prompts(tok, data, cfg.max_prompt_len)
    print(f"random-weight {config.PRESETS[preset]['model']} architecture saved in {model_dir} ({time.time() - t:.0f}s)", flush=True)

    # the planner's figures first, so that a run stopped part-way (a time limit) has printed what it measured
    rows, total, info = models.plan_memory(models.model_config(model_dir), cfg, device="cuda")
    static = sum(v for k, v in rows.items() if not k.startswith("["))
    planned = {"generation": static + sum(v for k, v in rows.items() if k.startswith("[gen]")),
               "training": static + sum(v for k, v in rows.items() if k.startswith("[train]"))}
    title = (f"planner: {preset} as run here (P={cfg.P} K={cfg.K}, prompt {cfg.max_prompt_len} + response "
             f"{cfg.max_new_tokens} tokens, gen batch {cfg.gen_batch or cfg.P * cfg.K}, micro-batch {cfg.micro_batch})")
    print("\n" + models.format_plan(rows, total, info, cfg.gpu_memory_gb, title))
    full = models.plan_memory(models.model_config(model_dir), config.parse_config(["--preset", preset, "--plan-memory"]))[1]
    print(f"  (the preset's own P={config.PRESETS[preset].get('P')}: planner peak {full / GB:.2f} GB)")
    print(f"\nmeasured on {torch.cuda.get_device_name()} (torch.cuda.max_memory_allocated; {cfg.steps} step(s)), "
          f"each line as its phase ends:", flush=True)

    seen = {"generation": 0, "training": 0}
    load_base, add_adapters, collect = pm.load_base, pm.add_adapters, pm.collect
    t0 = time.time()

    def close_phase(phase):
        peak = torch.cuda.max_memory_allocated()
        seen[phase] = max(seen[phase], peak)
        torch.cuda.reset_peak_memory_stats()
        if peak:  # (nothing to print for the training phase before the first rollout)
            print(f"  peak, {phase + ' phase':<32} {peak / GB:7.2f} GB   planner: {planned[phase] / GB:7.2f} GB"
                  f"   (at {time.time() - t0:.0f}s)", flush=True)

    def load_base_measured(*a, **kw):
        torch.cuda.reset_peak_memory_stats()
        return load_base(*a, **kw)

    def add_adapters_measured(*a, **kw):
        model = add_adapters(*a, **kw)
        seen["loading peak"] = torch.cuda.max_memory_allocated()
        seen["loaded"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        print(f"  after loading (base + adapters)        {seen['loaded'] / GB:7.2f} GB   planner, lasting part: {static / GB:7.2f} GB"
              f"  (AdamW states appear at the first update; at {time.time() - t0:.0f}s)", flush=True)
        print(f"  peak while loading                     {seen['loading peak'] / GB:7.2f} GB", flush=True)
        return model

    def collect_measured(*a, **kw):
        if seen["generation"]:
            close_phase("training")  # since the last rollout: its reference log-probs, PRM and policy updates
        else:
            torch.cuda.reset_peak_memory_stats()  # the first rollout: nothing has trained yet
        out = collect(*a, **kw)
        close_phase("generation")
        return out

    pm.load_base, pm.add_adapters, pm.collect = load_base_measured, add_adapters_measured, collect_measured
    pm.evaluate = lambda *a, with_se=False, **kw: (0.0, 0.0) if with_se else 0.0
    pm.run(cfg)
    close_phase("training")
    run_s = time.time() - t0
    print(f"\nsummary ({cfg.steps} step(s), {run_s:.0f}s; the run's own step timings: {os.path.join(cfg.out_dir, cfg.run_name, 'metrics.jsonl')}):")
    print(f"  peak, generation phase                 {seen['generation'] / GB:7.2f} GB   planner: {planned['generation'] / GB:7.2f} GB")
    print(f"  peak, training phase                   {seen['training'] / GB:7.2f} GB   planner: {planned['training'] / GB:7.2f} GB")
    print(f"  peak of the run                        {max(seen['generation'], seen['training']) / GB:7.2f} GB   "
          f"planner: {total / GB:7.2f} GB")
    print(f"  reserved by the caching allocator      {torch.cuda.max_memory_reserved() / GB:7.2f} GB   (since the last reset)")
    if keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
