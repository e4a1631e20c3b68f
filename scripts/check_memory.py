"""Measure the peak memory of real PRIME steps on the CPU and compare it with the planner.

The model has Qwen2.5-0.5B's exact architecture (models.QWEN25_05B: 0.49B parameters, a
151,936-token vocabulary) with random weights, since the hub is out of reach here; memory does
not depend on the weights' values. It is saved to a temporary folder and goes through the real
path: `prime_mini.run` with `--model DIR --load-in-4bit` (NF4, double quantization, gradient
checkpointing, two LoRA adapters), two RL steps (rollout, PRM update, policy update) and the
before/after evaluations, on the embedded arithmetic data with PRIME's chat prompt.

What is measured: the process's resident memory (Linux VmRSS / VmHWM), which holds everything a
GPU run would put in GPU memory plus Python's and the libraries' own, and the allocator's unused
pages. The planner is asked for the same configuration in CPU mode (fp32 compute).

    baseline   RSS when load_base is called: interpreter, torch, transformers, peft, the data
    model      RSS after loading and wrapping the model, less the baseline
    peak       highest RSS from then until the run ends (VmHWM, reset after loading), less the baseline

glibc's malloc by default raises its mmap threshold as large blocks are freed, after which freed
tensors stay in the heap and in RSS: the peak then measures the allocator's retention as much as
live tensors. So the script re-runs itself with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB (large
tensors are returned to the OS when freed, as the CUDA caching allocator's max_memory_allocated
would not count them either); --glibc-default measures with glibc's default behaviour instead.

Run:  python scripts/check_memory.py [--steps N] [--glibc-default]
      (2 CPU cores shared with other jobs: about 15 minutes a step; 4-bit matmuls on the CPU are slow)
"""
import ctypes
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import models  # noqa: E402
import prime_mini as pm  # noqa: E402
import tasks  # noqa: E402

MB = 1024 ** 2


def status_kb(field):
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: the peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def release_and_reset_peak():
    """Return freed heap pages to the OS, then restart the peak (VmHWM) from the current RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_checkpoint(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    rows = pm.load_rows("data/arith_rl.jsonl")[:200]
    corpus = [tasks.SYSTEM_PROMPT, tasks.TASK_SUFFIX["math"]] + [r["prompt"][-1]["content"] for r in rows]
    tok = models.build_chat_tokenizer(corpus)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    mc = Qwen2Config(**models.QWEN25_05B, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(mc).to(torch.bfloat16).save_pretrained(path)  # bf16 on disk, as the hub's
    return tok


def main():
    steps = sys.argv[sys.argv.index("--steps") + 1] if "--steps" in sys.argv else "2"
    if "--glibc-default" not in sys.argv and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    allocator = ("glibc default" if "MALLOC_MMAP_THRESHOLD_" not in os.environ
                 else f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}")
    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="prime-mem-")
    ckpt = os.path.join(work, "qwen2.5-0.5b-arch")
    tok = build_checkpoint(ckpt)
    rows = pm.load_rows("data/arith_rl.jsonl")
    longest = max(len(tok(pm.prompt_text(tok, r["prompt"], "math"), add_special_tokens=False)["input_ids"])
                  for r in rows[:2000])
    argv = ["--model", ckpt, "--load-in-4bit", "--device", "cpu", "--threads", "2",
            "--out-dir", os.path.join(work, "runs"), "--run-name", "mem",
            "--steps", steps, "--P", "2", "--K", "2", "--max-new-tokens", "16", "--max-prompt-len", str(longest),
            "--filter-low", "0", "--filter-high", "1", "--micro-batch", "2", "--prm-minibatches", "2",
            "--gen-batch", "4", "--logprob-chunk", "16", "--lora-r", "8", "--prm-lora-r", "8",
            "--eval-n", "1", "--eval-samples", "1", "--no-show-progress"]
    cfg = pm.parse_config(argv)
    seen = {}
    load_base, add_adapters = pm.load_base, pm.add_adapters

    def load_base_measured(*a, **kw):
        release_and_reset_peak()
        seen["baseline"] = status_kb("VmRSS")
        return load_base(*a, **kw)

    def add_adapters_measured(*a, **kw):
        model = add_adapters(*a, **kw)
        release_and_reset_peak()  # drops what loading needed only (the fp32 copy before quantizing)
        seen["loaded"] = status_kb("VmRSS")
        seen["t"] = time.time()
        return model

    pm.load_base, pm.add_adapters = load_base_measured, add_adapters_measured
    pm.run(cfg)
    peak = status_kb("VmHWM")
    steps_s = time.time() - seen["t"]

    rows_cpu, total_cpu, info = models.plan_memory(models.model_config(ckpt), cfg, device="cpu")
    weights = sum(v for k, v in rows_cpu.items() if not k.startswith("[") and "AdamW" not in k)
    table = models.format_plan(rows_cpu, total_cpu, info, 1e9, f"planner, CPU mode (fp32 compute), "
                               f"prompt {longest} + response {cfg.max_new_tokens} tokens")
    print("\n" + table.rsplit("\n", 1)[0])  # without the GPU verdict line
    print(f"\nmeasured on this CPU (Qwen2.5-0.5B architecture, random weights, 4-bit NF4, {steps} RL steps + evals, "
          f"{steps_s:.0f}s; allocator: {allocator}):")
    print(f"  baseline RSS (Python, torch, transformers, peft, data)  {seen['baseline'] / MB:8.0f} MB")
    print(f"  model resident after loading, less baseline           {(seen['loaded'] - seen['baseline']) / MB:8.0f} MB"
          f"   planner (base + LoRA weights): {weights / MB:.0f} MB")
    print(f"  peak during the steps, less baseline                  {(peak - seen['baseline']) / MB:8.0f} MB"
          f"   planner peak: {total_cpu / MB:.0f} MB")


if __name__ == "__main__":
    main()
