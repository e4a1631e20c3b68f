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
Loading real models (4-bit), the adapters and the memory planner live in models.py. The algorithm,
formula by formula with the paper's equations and where the paper's code differs, is written
down in docs/ALGORITHM.md (cited below as ALGORITHM.md §N).

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
       task [O]'s choices let the policy exploit an untrained PRM (README, "Ablations").
    3. One policy update per iteration (`policy_minibatches`; [O]: 4).
"""
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import statistics
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import prm
import rl
import sandbox
import verifiers
from models import (CHARS, ConfigError, add_adapters, adapter_params, build_char_tokenizer,  # noqa: F401
                    build_tiny_model, load_base, load_tokenizer, save_tokenizer)
import models

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Config: the one source of truth. Every field's trailing comment is its --help text.
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    # run
    seed: int = 0  # RL seed (sampling, data order); the SFT model has its own sft_seed
    out_dir: str = "runs"  # run directories are created under this folder
    run_name: str = ""  # run directory name; default: <time>-<reward_mode>-s<seed>
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    faithful: bool = False  # reset every algorithmic choice to the paper's code [O] (README table)
    # data (Eurus-2-RL-Data schema: prompt, ability, reward_model.ground_truth, data_source)
    data: str = "data/arith_rl.jsonl"  # RL prompts; several files separated by commas
    test_data: str = "data/arith_test.jsonl"  # held-out prompts for evaluation
    sft_data: str = "data/arith_sft.jsonl"  # worked solutions (`response` field) for the SFT warm-up
    verify_workers: int = 4  # code responses verified in parallel (sandboxed subprocesses; verifiers.py)
    sandbox: str = "bwrap"  # bwrap | rlimit: where code rows' programs run; with bwrap a code run stops if bubblewrap cannot run here, rlimit (a plain subprocess with resource limits) is only for code you would run unconfined (README, Verifiers)
    # model
    model: str = ""  # a Hugging Face model name or folder as the SFT model; empty = tiny default
    preset: str = "tiny"  # tiny | qwen2.5-0.5b | qwen2.5-math-7b: --model and run sizes that fit a 24 GB GPU (README); explicit flags win
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, double quantization), gradient checkpointing on
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward pass (always on with --load-in-4bit)
    max_prompt_len: int = 1024  # prompts longer than this many tokens are dropped and counted (ALGORITHM.md §8: 1024)
    plan_memory: bool = False  # print the estimated peak GPU memory by component for this config and exit (loads no weights)
    gpu_memory_gb: float = 24.0  # GPU memory the planner checks against; a preset that does not fit stops the run
    tiny_hidden: int = 128  # tiny Qwen2: hidden size (0.8M parameters in all: reaches the SFT target in 425-500 steps)
    tiny_layers: int = 3  # tiny Qwen2: decoder layers
    tiny_heads: int = 4  # tiny Qwen2: attention heads (and key/value heads)
    tiny_intermediate: int = 512  # tiny Qwen2: MLP width
    # SFT warm-up (tiny default only): trains the base from scratch, cached by these settings
    sft_steps: int = 1000  # most SFT optimizer steps; the warm-up usually stops earlier, at --sft-target
    sft_batch: int = 128  # sequences per SFT step
    sft_lr: float = 3e-3  # learning rate (AdamW, 50-step linear warm-up, then constant: the stopping step is not known in advance)
    sft_target: float = 0.6  # stop once greedy accuracy on the validation prompts reaches this (README, "The embedded default"); 0 = train all --sft-steps
    sft_check_every: int = 25  # check the validation accuracy every this many SFT steps
    sft_val_data: str = "data/arith_val.jsonl"  # validation prompts of the SFT stopping rule (not used by RL or evaluation)
    sft_seed: int = 0  # seed of the SFT run (shared by RL seeds, so they start from one model)
    retrain_sft: bool = False  # retrain the SFT model even if a cached one exists
    # RL: rollout and filter (paper §3.3, §4.1; ALGORITHM.md §6, §8)
    steps: int = 30  # RL steps (paper: 240 for Table 1, 592 for the release; 30 keeps the default run from nothing within 10 CPU minutes)
    P: int = 32  # prompts kept per step (paper: 256; 32 keeps a CPU step near 2 s)
    K: int = 4  # samples per prompt (paper §4.1: 4)
    temperature: float = 1.0  # sampling temperature of rollouts (ALGORITHM.md §8: 1.0, top_p 1, no top_k)
    max_new_tokens: int = 64  # longest response (paper: 3072)
    filter_low: float = 0.2  # keep a prompt iff filter_low <= its accuracy (paper §3.3: 0.2)
    filter_high: float = 0.8  # ... and its accuracy <= filter_high (paper §3.3: 0.8)
    max_rollout_rounds: int = 8  # rounds of generation per step to fill P kept prompts
    merged_rollout: bool = True  # sample from a copy of the base with the policy adapter merged in (same π_θ up to rounding, 21% faster generate() on the CPU; one more copy of the base in memory)
    gen_batch: int = 0  # sequences per generate() call (0 = all P*K at once): bounds the KV cache whatever P*K is
    # implicit PRM (paper §3.1, §4.1; ALGORITHM.md §2-3)
    reward_mode: str = "prime"  # prime | outcome (the paper's RLOO-with-outcome-only baseline)
    beta: float = 0.05  # β in r_φ = β log π_φ/π_ref (paper §4.1: 0.05)
    prm_update: str = "double"  # single | double | none = never updated (ALGORITHM.md §3.4; [O]/paper: single, [R]: double; README)
    prm_init: str = ""  # start π_φ from this PRM adapter (a finished run's RUN/adapters/prm) instead of zero; with --prm-update none it stays frozen: the paper's offline PRM (paper §5.1)
    ref_type: str = "freeze"  # freeze (π_ref = base) | policy (π_ref = rollout policy; ALGORITHM.md §7)
    prm_lora_r: int = 8  # LoRA rank of the PRM adapter
    lr_prm: float = 3e-3  # PRM learning rate (paper 1e-6 is full fine-tuning of 7B; LoRA needs more; README)
    prm_minibatches: int = 4  # PRM optimizer steps per iteration (paper: 4 mini-batches of 256); fewer when fewer groups are kept
    prm_grad_clip: float = 10.0  # PRM grad-norm clip (ALGORITHM.md §3.3: 10)
    prm_warmup: int = 10  # steps the PRM trains before its rewards enter the advantage ([O]: 0; README)
    prm_gate: float = 0.0  # use process rewards only while the PRM's fresh ranking accuracy (EMA) >= this ([O]: 0 = always)
    # advantages (paper Eq. 4-5; ALGORITHM.md §4)
    adv_estimator: str = "rloo"  # rloo | grpo | reinforce (paper Eq. 5, 7, 8)
    prime_norm: str = "batch_norm"  # batch_norm ([O]) | none (the policy sees process_coef·β·q, as veRL)
    process_coef: float = 0.5  # weight of process vs outcome returns ([O]: 1:1; README)
    gamma_process: float = 1.0  # discount of process returns (ALGORITHM.md §4.2: 1.0)
    gamma_outcome: float = 1.0  # discount of outcome returns (ALGORITHM.md §4.2: 1.0)
    # policy (paper §4.1; ALGORITHM.md §5)
    lora_r: int = 8  # LoRA rank of the policy adapter
    lora_alpha_ratio: float = 2.0  # LoRA alpha = ratio × rank, for both adapters
    lora_targets: str = "all-linear"  # modules that get LoRA: all-linear, or names such as q_proj,v_proj
    lora_dropout: float = 0.0  # dropout on the LoRA input of both adapters (0: logp_old equals logp exactly)
    lr_policy: float = 1e-3  # policy learning rate (paper 5e-7 is full fine-tuning; calibrated for LoRA)
    wd_policy: float = 0.01  # AdamW weight decay of the policy (veRL default 0.01)
    policy_grad_clip: float = 1.0  # policy grad-norm clip (ALGORITHM.md §5: 1.0)
    policy_minibatches: int = 1  # policy optimizer steps per iteration (paper: 4); fewer when fewer groups are kept
    eps_clip: float = 0.2  # ε of PPO-clip (ALGORITHM.md §5: 0.2)
    loss_agg: str = "seq-mean-token-mean"  # seq-mean-token-mean ([O]) | token-mean ([R])
    micro_batch: int = 128  # rows per forward/backward; gradient accumulation over micro-batches
    logprob_chunk: int = 8192  # response tokens per output-head chunk: bounds the fp32 (tokens, V) logits
    # evaluation
    eval_n: int = 500  # held-out prompts (0 = all)
    eval_samples: int = 8  # samples per held-out prompt at temperature 1 (accuracy = their mean)
    eval_seed: int = 1234  # sampling seed of every evaluation: before/after (and all runs) share random numbers
    eval_every: int = 0  # also evaluate every this many RL steps (0 = only before and after)
    reward_pages: int = 6  # prompts on the token-reward page written at the end (rewards.html; 0 = none)
    # checkpoints and logging
    save_every: int = 20  # checkpoint (adapters, optimizers, RNG, data position) every this many steps, and at the end; 0 = only at the end
    resume: str = ""  # a run directory: continue from its last complete checkpoint with its config.json (--steps may extend it)
    tensorboard: bool = True  # also write TensorBoard event files (only when tensorboard is installed)
    wandb_project: str = ""  # also log to Weights & Biases under this project (needs `pip install wandb`); empty = off
    show_progress: bool = True  # tqdm bars


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "reward_mode": ("prime", "outcome"),
    "prm_update": ("single", "double", "none"),
    "ref_type": ("freeze", "policy"),
    "adv_estimator": ("rloo", "grpo", "reinforce"),
    "prime_norm": ("batch_norm", "none"),
    "loss_agg": ("seq-mean-token-mean", "token-mean"),
    "preset": ("tiny", "qwen2.5-0.5b", "qwen2.5-math-7b"),
    "sandbox": ("bwrap", "rlimit"),
}

# The paper's code [O] (ALGORITHM.md §11), for the algorithmic fields the tiny default changes. Learning
# rates stay LoRA-sized; [O]'s PRM:policy ratio (1e-6 : 5e-7) is kept. [O] makes 4 PRM and 4
# policy optimizer steps per iteration (mini-batches of 256 out of 1024 responses).
FAITHFUL = {"prime_norm": "batch_norm", "process_coef": 1.0, "prm_warmup": 0, "prm_gate": 0.0,
            "prm_update": "single", "lr_prm": 2e-3, "lr_policy": 1e-3, "prm_minibatches": 4,
            "policy_minibatches": 4, "ref_type": "freeze", "adv_estimator": "rloo",
            "loss_agg": "seq-mean-token-mean", "beta": 0.05, "eps_clip": 0.2, "filter_low": 0.2,
            "filter_high": 0.8, "K": 4, "gamma_process": 1.0, "gamma_outcome": 1.0}


# Presets: a model and the run sizes that the memory planner fits into a 24 GB GPU (README, "Real
# models"), at the paper's lengths (prompts up to 1024 tokens, responses up to 3072; ALGORITHM.md §8).
# Learning rates are LoRA-sized starting points with [O]'s PRM:policy ratio of 2:1; they were not
# tuned on these models. Qwen2.5-Math-7B is the paper's base; PRIME's SFT model
# (--model PRIME-RL/Eurus-2-7B-SFT) has the same architecture and the same plan.
PRESETS = {
    "tiny": {},
    "qwen2.5-0.5b": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "load_in_4bit": True, "P": 32, "K": 4,
                     "max_prompt_len": 1024, "max_new_tokens": 3072, "gen_batch": 64, "micro_batch": 4,
                     "logprob_chunk": 1024, "lora_r": 32, "prm_lora_r": 32, "lr_policy": 2e-5, "lr_prm": 4e-5,
                     "eval_n": 200, "eval_samples": 4},
    "qwen2.5-math-7b": {"model": "Qwen/Qwen2.5-Math-7B", "load_in_4bit": True, "P": 16, "K": 4,
                        "max_prompt_len": 1024, "max_new_tokens": 3072, "gen_batch": 16, "micro_batch": 1,
                        "logprob_chunk": 1024, "lora_r": 16, "prm_lora_r": 16, "lr_policy": 1e-5, "lr_prm": 2e-5,
                        "eval_n": 100, "eval_samples": 4},
}


def _field_help():
    """The trailing comment of each Config field, read from this file's source."""
    helps = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2).replace("%", "%%")  # argparse formats help with %
    return helps


def parse_config(argv=None):
    """Build the Config from command-line flags generated from the dataclass, then validate it."""
    import argparse
    # allow_abbrev=False: argparse would otherwise take `--process-co` for --process-coef, and a
    # preset or --faithful would then override a flag the user did give (it looks absent).
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(flag, type=typ, default=f.default, help=helps.get(f.name),
                            choices=CHOICES.get(f.name), dest=f.name)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    explicit = _explicit_fields(argv)
    if cfg.resume:
        cfg = resumed_config(cfg, explicit)
    else:  # a preset's sizes, then [O]'s choices; a flag given explicitly still wins
        for overrides in (PRESETS.get(cfg.preset, {}), FAITHFUL if cfg.faithful else {}):
            for k, v in overrides.items():
                if k not in explicit:
                    setattr(cfg, k, v)
    validate(cfg)
    if cfg.reward_mode == "prime" and cfg.prm_update == "none" and not cfg.prm_init:
        warnings.warn("--prm-update none without --prm-init: the PRM stays at zero, so every process reward is "
                      "exactly 0 (outcome-only RLOO plus unused PRM forwards); the paper's offline-PRM ablation "
                      "freezes a trained PRM: --prm-init RUN/adapters/prm", RuntimeWarning)
    if cfg.preset != "tiny" and not cfg.plan_memory:
        rows, total, info = models.plan_memory(arch_config(cfg), cfg)
        if not models.fits(total, cfg.gpu_memory_gb):
            raise ConfigError(f"--preset {cfg.preset}: the planner estimates a peak of {total / models.GB:.1f} GB, "
                              f"which does not fit --gpu-memory-gb {cfg.gpu_memory_gb:g} (less 10% headroom); "
                              "see --plan-memory, and lower --gen-batch, --micro-batch or --max-new-tokens")
    return cfg


def _explicit_fields(argv):
    """The Config fields named on the command line (`--no-x` names `x`). Names are whole: the
    parser refuses abbreviated flags."""
    names = {f.name for f in dataclasses.fields(Config)}
    out = set()
    for a in argv:
        if a.startswith("--"):
            n = a[2:].split("=")[0].replace("-", "_")
            out.add(n[3:] if n.startswith("no_") and n[3:] in names else n)
    return out


# What may change when a run is resumed: everything else comes from the run's config.json, so
# that the continued run is the run that was started.
RESUME_FIELDS = ("resume", "steps", "save_every", "threads", "device", "show_progress")


# Keys of config.json that are not Config fields: what `run` found (the SFT model's folder, the device).
RECORD_KEYS = ("base_path", "device_used")


def saved_config(run_dir, flag, strict=True):
    """(Config, the raw dict) from a run directory's config.json; `flag` names the option in errors.

    A config.json written by another version of this file can lack a field (today's default would
    silently stand in for the value the run used) or hold a key that is no longer a field (an
    option removed or renamed): `strict` refuses both, naming them; otherwise a warning names them.
    """
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{flag}{path} not found: not a run directory")
    saved = json.load(open(path))
    names = [f.name for f in dataclasses.fields(Config)]
    missing = [n for n in names if n not in saved]
    unknown = [k for k in saved if k not in names and k not in RECORD_KEYS]
    problems = []
    if missing:
        problems.append(f"it lacks {', '.join(missing)} (today's defaults would stand in for what the run used)")
    if unknown:
        problems.append(f"it has {', '.join(unknown)}, which this version does not know")
    if problems:
        msg = f"{flag}{path} was written by another version of prime_mini.py: {'; '.join(problems)}"
        if strict:
            raise ConfigError(msg + "; add or remove those keys by hand with the values the run used, or start a new run")
        warnings.warn(msg, RuntimeWarning)
    return Config(**{n: saved[n] for n in names if n in saved}), saved


def resumed_config(cfg, explicit):
    """The Config of the run in `cfg.resume` (its config.json), with the few resumable overrides."""
    other = sorted(explicit - set(RESUME_FIELDS))
    if other:
        raise ConfigError(f"--resume continues a run with its saved config.json; only "
                          f"{', '.join('--' + f.replace('_', '-') for f in RESUME_FIELDS[1:])} may be given, "
                          f"not --{other[0].replace('_', '-')}")
    new, _ = saved_config(cfg.resume, "--resume: ")
    for k in RESUME_FIELDS:
        if k in explicit or k == "resume":
            setattr(new, k, getattr(cfg, k))
    return new


def arch_config(cfg):
    """The transformers config of the base: --model's, or the tiny default's."""
    if cfg.model:
        return models.model_config(cfg.model)
    return build_tiny_model(cfg, build_char_tokenizer()).config


def print_memory_plan(cfg):
    """--plan-memory: the planner's table for this config, on a GPU (no weights are loaded)."""
    rows, total, info = models.plan_memory(arch_config(cfg), cfg)
    title = (f"memory plan: {cfg.model or 'tiny default'} ({'4-bit NF4' if cfg.load_in_4bit else 'bf16'}, "
             f"P={cfg.P} K={cfg.K}, prompt {cfg.max_prompt_len} + response {cfg.max_new_tokens} tokens, "
             f"gen batch {cfg.gen_batch or cfg.P * cfg.K}, micro-batch {cfg.micro_batch}, "
             f"LoRA r={cfg.lora_r}/{cfg.prm_lora_r}, log-prob chunk {cfg.logprob_chunk} tokens)")
    print(models.format_plan(rows, total, info, cfg.gpu_memory_gb, title))
    return total


def validate(cfg):
    """Stop at once, before any model is built, on settings that cannot work."""
    def bad(flag, msg):
        raise ConfigError(f"--{flag.replace('_', '-')}: {msg}")
    if cfg.K < 2:
        bad("K", f"must be >= 2 for a leave-one-out baseline, got {cfg.K}")
    for name in ("filter_low", "filter_high"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            bad(name, f"must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.filter_low > cfg.filter_high:
        bad("filter_low", f"{cfg.filter_low} is above --filter-high {cfg.filter_high}")
    for name in ("steps", "P", "max_new_tokens", "micro_batch", "verify_workers", "prm_minibatches",
                 "policy_minibatches", "sft_batch", "sft_check_every", "max_rollout_rounds", "eval_samples", "lora_r", "prm_lora_r",
                 "max_prompt_len", "logprob_chunk"):
        if getattr(cfg, name) < 1:
            bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.steps and cfg.temperature <= 0:
        bad("temperature", f"must be > 0 for sampling, got {cfg.temperature}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            bad(name, f"must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if not 0.0 <= cfg.sft_target <= 1.0:
        bad("sft_target", f"must be in [0, 1] (0 = no stopping rule), got {cfg.sft_target}")
    if cfg.gen_batch < 0:
        bad("gen_batch", f"must be >= 0, got {cfg.gen_batch}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad("lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.gpu_memory_gb <= 0:
        bad("gpu_memory_gb", f"must be > 0, got {cfg.gpu_memory_gb}")
    if cfg.model:
        models.check_model_source(cfg.model)
    if cfg.load_in_4bit and not models.bitsandbytes_available():
        bad("load_in_4bit", "needs bitsandbytes (pip install bitsandbytes; version 0.45 or later also runs NF4 on the CPU)")
    if cfg.prm_init:
        check_prm_init(cfg)
    if cfg.plan_memory:
        return  # the planner reads no data
    sft_files = [] if cfg.model else [cfg.sft_data] + ([cfg.sft_val_data] if cfg.sft_target else [])
    for path in cfg.data.split(",") + [cfg.test_data] + sft_files:
        if is_local_data(path) and not os.path.exists(resolve(path)):
            raise ConfigError(f"data file not found: {path}")
    if cfg.resume and latest_checkpoint(cfg.resume) is None:
        bad("resume", f"{cfg.resume} has no complete checkpoint (checkpoint-NNNNNN folder) to resume from")
    if cfg.wandb_project:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            bad("wandb_project", "wandb is not installed (pip install wandb), or leave the flag out")


def check_prm_init(cfg):
    """--prm-init must be a PRM adapter that fits this run's PRM: peft's folder, same rank and alpha."""
    path = os.path.join(cfg.prm_init, "adapter_config.json")
    if cfg.reward_mode != "prime":
        raise ConfigError(f"--prm-init: --reward-mode {cfg.reward_mode} has no PRM to start from it")
    if not os.path.exists(path):
        raise ConfigError(f"--prm-init: {path} not found (give a saved adapter folder such as RUN/adapters/prm)")
    saved = json.load(open(path))
    want = {"r": cfg.prm_lora_r, "lora_alpha": int(cfg.lora_alpha_ratio * cfg.prm_lora_r)}
    for key, value in want.items():
        if saved.get(key) != value:
            raise ConfigError(f"--prm-init: the adapter has {key} = {saved.get(key)}, this run's PRM {value} "
                              "(set --prm-lora-r and --lora-alpha-ratio as the run that trained it)")


def resolve(path):
    """Paths in the config are relative to the working directory, or else to this file's folder."""
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(HERE, path)


# ---------------------------------------------------------------------------------------------
# Data: rows in the Eurus-2-RL-Data schema (prompt as chat messages, ability,
# reward_model.ground_truth, data_source), from JSONL, Parquet or a hub dataset; checked row by row.
# ---------------------------------------------------------------------------------------------
SCHEMA = ("prompt", "ability", "reward_model")


def is_local_data(path):
    """A data file (JSONL, JSON or Parquet) rather than a hub dataset name such as PRIME-RL/Eurus-2-RL-Data."""
    return path.endswith((".jsonl", ".json", ".parquet"))


def check_row(r, where, need_response=False):
    """Stop at the first row that does not follow the schema, naming where it is."""
    if not isinstance(r, dict):
        raise ConfigError(f"{where}: a row must be a JSON object")
    msgs = r.get("prompt")
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "content" in m for m in msgs)):
        raise ConfigError(f"{where}: 'prompt' must be a list of chat messages with 'content'")
    if not isinstance(r.get("reward_model"), dict) or "ground_truth" not in r["reward_model"]:
        raise ConfigError(f"{where}: missing 'reward_model.ground_truth'")
    if r.get("ability") not in ("math", "code"):
        raise ConfigError(f"{where}: 'ability' must be 'math' or 'code' (got {r.get('ability')!r})")
    try:  # code ground truth is a JSON string of test cases: check it now, not mid-run
        verifiers.check_sample(r)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if need_response and not isinstance(r.get("response"), str):
        raise ConfigError(f"{where}: SFT rows need a 'response' string")


def load_rows(path, need_response=False):
    """Read the rows of a JSONL file (our own reader: errors name file and line), or of a Parquet
    or JSON file or a hub dataset (`NAME` or `NAME:SPLIT`, default split train) through
    `datasets.load_dataset`."""
    if not path.endswith(".jsonl"):
        return load_dataset_rows(path, need_response)
    rows = []
    with open(resolve(path)) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            check_row(r, where, need_response)
            rows.append(r)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def load_dataset_rows(path, need_response=False):
    import datasets
    datasets.disable_progress_bars()
    try:
        if is_local_data(path):
            kind = "parquet" if path.endswith(".parquet") else "json"
            ds = datasets.load_dataset(kind, data_files=resolve(path), split="train")
        else:
            name, _, split = path.partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # no such dataset, hub unreachable, unreadable file: all stop here
        raise ConfigError(f"{path}: cannot load with datasets ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [c for c in SCHEMA + (("response",) if need_response else ()) if c not in ds.column_names]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}; the Eurus-2-RL-Data schema needs "
                          f"prompt (chat messages), ability and reward_model.ground_truth (has: {', '.join(ds.column_names)})")
    rows = ds.to_list()
    for i, r in enumerate(rows):
        check_row(r, f"{path} row {i}", need_response)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


# PRIME's RL system prompt (ALGORITHM.md §10): the seven actions by name and the format of a step, as
# in the Eurus-2-RL-Data prompts; and the task suffixes of its user turns.
SYSTEM_PROMPT = ("\nWhen tackling complex reasoning tasks, you have access to the following actions. Use them as "
                 "needed to progress through your thought process.\n\n[ASSESS]\n\n[ADVANCE]\n\n[VERIFY]\n\n"
                 "[SIMPLIFY]\n\n[SYNTHESIZE]\n\n[PIVOT]\n\n[OUTPUT]\n\nYou should strictly follow the format below:"
                 "\n\n[ACTION NAME]\n\n# Your action step 1\n\n# Your action step 2\n\n# Your action step 3\n\n"
                 "...\n\nNext action: [NEXT ACTION NAME]\n\n")
TASK_SUFFIX = {"math": "\n\nPresent the answer in LaTex format: \\boxed{Your answer}",
               "code": "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."}


def chat_messages(messages, ability=None):
    """The messages a chat model sees: PRIME's system prompt unless the data brings its own, and
    the task suffix on the last user turn unless it is already there (Eurus-2-RL-Data has both)."""
    msgs = [dict(m) for m in messages]
    if not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    suffix = TASK_SUFFIX.get(ability)
    users = [m for m in msgs if m.get("role", "user") == "user"]
    marker = "\\boxed" if ability == "math" else "```python"
    if suffix and users and marker not in users[-1]["content"]:
        users[-1]["content"] += suffix
    return msgs


def prompt_text(tok, messages, ability=None):
    """The chat template when the tokenizer has one, with PRIME's system prompt and task suffix
    (`chat_messages`). Without a template, the documented plain-text fallback: BOS + the user
    turn(s) as they are (the tiny default: its prompt is just `<bos>47+8-3+9-6=`)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(chat_messages(messages, ability), add_generation_prompt=True, tokenize=False)
    return (tok.bos_token or "") + "\n".join(m["content"] for m in messages if m.get("role", "user") != "system")


def drop_long_prompts(rows, tok, max_len, name):
    """Drop prompts longer than max_len tokens, as [O]'s dataset does (ALGORITHM.md §8), and say how many."""
    texts = [prompt_text(tok, r["prompt"], r.get("ability")) for r in rows]
    lens = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    kept = [r for r, n in zip(rows, lens) if n <= max_len]
    if len(kept) < len(rows):
        print(f"{name}: dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than --max-prompt-len {max_len} tokens")
    if not kept:
        raise ConfigError(f"--max-prompt-len: all {len(rows)} prompts of {name} are longer than {max_len} tokens")
    return kept


# ---------------------------------------------------------------------------------------------
# Sampling and log-probabilities
# ---------------------------------------------------------------------------------------------
def encode_prompts(tok, texts, device):
    """Left-padded prompt ids (B, Tp) and attention mask, so that generation continues each row."""
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def end_tokens(model, tok):
    """Every token id that ends a response: the tokenizer's EOS and each EOS of the model's
    generation config (Qwen2.5-Instruct ends a turn with <|im_end|> or <|endoftext|>)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return sorted({i for i in [tok.eos_token_id, *ids] if i is not None})


def response_mask(resp, eos_ids):
    """1 on valid response tokens: up to and including the first end token (ALGORITHM.md §8).

    `eos_ids`: one id or a list (`end_tokens`). Everything after the first end token is padding
    from `generate`, even when the pad token is itself an end token (SmolLM2, Qwen); a pad token
    sampled *before* it is a real (if odd) token and stays valid.
    """
    eos = torch.as_tensor(eos_ids, device=resp.device).flatten()  # (n_eos,)
    is_eos = torch.isin(resp, eos).int()  # (B, T)
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # (B, T) strictly after the first EOS
    return (~after_eos).to(torch.float32)  # (B, T)


_MERGED = weakref.WeakKeyDictionary()  # peft model -> its plain copy for sampling (merged_copy)


@torch.no_grad()
def merged_copy(model):
    """A plain copy of the base (no LoRA layers) whose linear weights are W + s·B·A of the active
    adapter: the same π_θ up to float rounding, built once per model and refreshed on each call
    (a copy of the weights, microseconds for the tiny model). Sampling with it skips peft's
    per-layer Python work and the two extra LoRA matmuls at every new token: 21% less time per
    `generate` call on the CPU (BENCHMARKS.md). The adapters, the base and π_ref are left untouched. Returns the
    model itself when there is nothing to merge or a base layer is not a plain nn.Linear (4-bit)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    if not isinstance(model, PeftModel):
        return model
    lora = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    if not all(type(m.base_layer) is torch.nn.Linear for m in lora.values()):
        return model
    plain = _MERGED.get(model)
    if plain is None:
        import copy
        plain = copy.deepcopy(model.get_base_model())
        for name in lora:  # swap each LoRA wrapper in the copy for its own base nn.Linear
            parent, _, child = name.rpartition(".")
            target = plain.get_submodule(parent) if parent else plain
            setattr(target, child, getattr(target, child).base_layer)
        plain.requires_grad_(False).eval()
        _MERGED[model] = plain
    for name, m in lora.items():
        w = m.base_layer.weight
        for adapter in ([] if m.disable_adapters else m.active_adapters):  # as peft's forward: a sum
            if adapter in m.lora_A:
                w = w + m.get_delta_weight(adapter)  # (out, in) the merged weight W + s·B·A
        plain.get_submodule(name).weight.copy_(w)
    return plain


@torch.no_grad()
def generate(model, tok, prompt_ids, prompt_mask, max_new_tokens, temperature, greedy=False, merged=True, batch_size=0):
    """Sample responses with the KV cache, `batch_size` rows at a time (0 = all at once), so the
    cache's size does not grow with the rollout. Returns response ids (B, T) and their mask (B, T).
    `merged`: sample from merged_copy(model), the same policy without LoRA's per-token overhead."""
    models.set_train_mode(model, False)  # no checkpointing while generating: it would drop the cache
    sampler = merged_copy(model) if merged else model
    eos = end_tokens(model, tok)  # all of them: one id alone would override the model's own list
    resps = []
    n = batch_size or prompt_ids.shape[0]
    for i in range(0, prompt_ids.shape[0], n):
        out = sampler.generate(input_ids=prompt_ids[i:i + n], attention_mask=prompt_mask[i:i + n],
                               max_new_tokens=max_new_tokens, do_sample=not greedy,
                               temperature=temperature if not greedy else None, top_k=0 if not greedy else None,
                               top_p=1.0 if not greedy else None, pad_token_id=tok.pad_token_id,
                               eos_token_id=eos, use_cache=True)
        resps.append(out[:, prompt_ids.shape[1]:])  # (n, T_i)
    resp = pad_cat(resps, left=False, value=tok.pad_token_id)  # (B, T)
    return resp, response_mask(resp, eos)


def decode_responses(tok, resp, mask):
    """Response texts for the verifier: valid tokens only (through the first EOS), no specials."""
    valid = resp * mask.long() + tok.pad_token_id * (1 - mask.long())  # (B, T) pads after EOS
    return tok.batch_decode(valid, skip_special_tokens=True)


def token_logprobs(model, prompt_ids, prompt_mask, resp, mask, chunk=8192):
    """log π(y_t | x, y_<t) of each response token (B, T), at temperature 1 (ALGORITHM.md §2.2).

    Logits are computed only for the response positions. When the batch has more than `chunk`
    response tokens, the output head runs on `chunk` tokens at a time and each chunk's fp32
    logits are recomputed in the backward pass instead of stored, so (B, T, V) never exists: a
    7B model's 152k-token vocabulary makes it gigabytes per sequence.
    """
    models.set_train_mode(model, torch.is_grad_enabled())  # checkpointing, LoRA dropout: gradient forwards only
    ids = torch.cat([prompt_ids, resp], 1)  # (B, Tp+T)
    attn = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)  # (B, Tp+T)
    pos = (attn.cumsum(1) - 1).clamp_min(0)  # (B, Tp+T) positions that skip left padding
    B, T = resp.shape
    parts = models.output_head(model) if B * T > chunk else None
    if parts is None:  # small enough: the model's own head, in one piece
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1).logits
        logits = logits[:, :-1]  # (B, T, V) the position before each response token predicts it
        return torch.cat([head_logprobs(None, logits[i:i + 64], resp[i:i + 64]) for i in range(0, B, 64)]) * mask
    decoder, head = parts
    h = decoder(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state[:, -T - 1:-1]  # (B, T, H)
    h, y = h.reshape(B * T, -1), resp.reshape(B * T)  # (B*T, H), (B*T,)
    out = []
    for i in range(0, B * T, chunk):
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(head_logprobs, head, h[i:i + chunk], y[i:i + chunk],
                                                         use_reentrant=False))  # (n,)
        else:
            out.append(head_logprobs(head, h[i:i + chunk], y[i:i + chunk]))  # (n,)
    return torch.cat(out).view(B, T) * mask  # (B, T)


def head_logprobs(head, h, y):
    """log-softmax of the logits head(h) (or of h itself when head is None), in fp32, at the tokens y."""
    logits = (h if head is None else head(h)).float()  # (..., V)
    return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (...)


def logprobs_nograd(model, batch, micro, chunk=8192):
    """token_logprobs over micro-batches without gradients."""
    with torch.no_grad():
        return torch.cat([token_logprobs(model, *batch.slice(i, i + micro), chunk=chunk) for i in range(0, batch.B, micro)])


@dataclass
class Rollout:
    """One step's responses. Rows are grouped: the K samples of a prompt are consecutive."""
    prompt_ids: torch.Tensor  # (B, Tp) left-padded
    prompt_mask: torch.Tensor  # (B, Tp)
    resp: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) valid response tokens incl. first EOS
    r_o: torch.Tensor  # (B,) outcome scores
    rows: list  # the P data rows, one per group
    texts: list = field(default_factory=list)  # (B,) decoded responses

    @property
    def B(self):
        return self.resp.shape[0]

    def slice(self, i, j):
        return self.prompt_ids[i:j], self.prompt_mask[i:j], self.resp[i:j], self.mask[i:j]


def pad_cat(tensors, left, value):
    """Concatenate (b, t) tensors along rows, padding the time axis to the longest."""
    T = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = torch.full((t.shape[0], T - t.shape[1]), value, dtype=t.dtype, device=t.device)
        padded.append(torch.cat([pad, t] if left else [t, pad], 1))
    return torch.cat(padded)


def verify_batch(rows, texts, K, workers=4, mode="bwrap"):
    """Outcome score per response (row i // K is the prompt of response i); and failure counts.

    Math answers are checked in this (main) thread, where math-verify's time limit works; code
    responses run in sandboxed subprocesses (sandbox `mode`), `workers` at a time. A response whose
    verifier fails scores 0 with reason "verifier_error": one bad sample never stops the run."""
    results = verifiers.outcome_rewards([rows[i // K] for i in range(len(texts))], texts,
                                        sandbox.Limits(mode=mode), workers)
    reasons = {}
    for _, why in results:
        reasons[why] = reasons.get(why, 0) + 1
    return torch.tensor([s for s, _ in results]), reasons


def check_sandbox(mode, rows):
    """With code rows to verify, say which sandbox runs their programs; stop (before any model is
    built) if it is bubblewrap and bwrap cannot run here. The weaker mode runs only when named."""
    if not any(r.get("ability") == "code" for r in rows):
        return
    problem = sandbox.bwrap_problem() if mode == "bwrap" else None
    if problem:
        raise ConfigError(sandbox.bwrap_error(problem))
    print("code sandbox: " + ("bwrap (bubblewrap)" if mode == "bwrap" else
                              "rlimit, as asked (a plain subprocess with resource limits: programs can read and write "
                              "what this user can and reach the network)"))


# ---------------------------------------------------------------------------------------------
# SFT warm-up: train the tiny base from scratch on worked solutions, cache it.
# ---------------------------------------------------------------------------------------------
def sft_key(cfg):
    keys = ["tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate", "sft_steps", "sft_batch",
            "sft_lr", "sft_seed", "sft_target", "sft_check_every", "max_new_tokens"]
    blob = json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True) + CHARS + "constant-lr"
    for path in (cfg.sft_data, cfg.sft_val_data) if cfg.sft_target else (cfg.sft_data,):
        blob += hashlib.sha256(open(resolve(path), "rb").read()).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def sft_warmup(cfg, device):
    """Returns the folder of the SFT model (the frozen base and π_ref), training it if needed.

    The tiny model learns the task's carries in a sudden jump whose timing depends on the seed
    and on the machine's floating-point rounding: a fixed number of steps leaves one draw at 0.2
    held-out accuracy and the next at 0.9. So the warm-up trains at a constant learning rate
    and stops as soon as greedy accuracy on the validation prompts (`sft_val_data`, a split of
    their own) reaches `sft_target`, checked every `sft_check_every` steps: every draw then
    starts RL from the same accuracy band (README, "The embedded default")."""
    path = os.path.join(resolve(cfg.out_dir) if not os.path.isabs(cfg.out_dir) else cfg.out_dir,
                        "sft", sft_key(cfg))
    if os.path.exists(os.path.join(path, "done")) and not cfg.retrain_sft:
        info = json.load(open(os.path.join(path, "done")))
        print(f"SFT model: reusing {path} (trained {info.get('steps', '?')} steps; --retrain-sft to train again)")
        return path
    rows = load_rows(cfg.sft_data, need_response=True)
    val_rows = load_rows(cfg.sft_val_data) if cfg.sft_target else []
    torch.manual_seed(cfg.sft_seed)
    rng = random.Random(cfg.sft_seed)
    tok = build_char_tokenizer()
    model = build_tiny_model(cfg, tok).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    stop = (f"until greedy accuracy on {len(val_rows)} validation prompts reaches {cfg.sft_target:g} "
            f"(checked every {cfg.sft_check_every} steps), at most {cfg.sft_steps} steps" if cfg.sft_target
            else f"{cfg.sft_steps} steps")
    print(f"SFT warm-up: tiny Qwen2 with {n_params / 1e6:.2f}M parameters, {len(rows)} worked solutions, "
          f"batches of {cfg.sft_batch}, {stop}")
    # Pre-tokenise once: prompt ids and response ids (+ EOS); the loss is on response tokens only.
    p_ids = tok([prompt_text(tok, r["prompt"]) for r in rows], add_special_tokens=False)["input_ids"]
    r_ids = tok([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50

    order, val_acc, steps = [], None, cfg.sft_steps
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="SFT", disable=not cfg.show_progress, mininterval=1)
    for s in bar:
        if len(order) < cfg.sft_batch:
            order += rng.sample(range(len(rows)), len(rows))
        idx, order = order[:cfg.sft_batch], order[cfg.sft_batch:]
        seqs = [p_ids[i] + r_ids[i] + [tok.eos_token_id] for i in idx]
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), tok.pad_token_id)
        labels = torch.full((len(seqs), L), -100)
        for j, i in enumerate(idx):
            n, m = len(p_ids[i]), len(seqs[j])
            ids[j, :m] = torch.tensor(seqs[j])
            labels[j, n:m] = ids[j, n:m]  # response tokens and EOS only
        for g in opt.param_groups:
            g["lr"] = cfg.sft_lr * min(1.0, (s + 1) / warm)  # linear warm-up, then constant
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if cfg.sft_target and ((s + 1) % cfg.sft_check_every == 0 or s + 1 == cfg.sft_steps):
            val_acc = evaluate(model, tok, val_rows, cfg, device, True, "SFT validation")
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_acc:.3f}")
            if val_acc >= cfg.sft_target:
                steps = s + 1
                break
        elif s % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    if cfg.sft_target and val_acc < cfg.sft_target:
        print(f"warning: the SFT warm-up did not reach --sft-target {cfg.sft_target:g} in {cfg.sft_steps} steps "
              f"(validation greedy accuracy {val_acc:.3f}); RL starts from a weaker model than the defaults were "
              "tuned for (raise --sft-steps)")
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    save_tokenizer(tok, tmp)
    open(os.path.join(tmp, "done"), "w").write(json.dumps({"loss": loss.item(), "steps": steps, "val_greedy": val_acc}))
    if os.path.exists(path):
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)
    val = f", validation greedy accuracy {val_acc:.3f}" if val_acc is not None else ""
    print(f"SFT model saved to {path} after {steps} steps (last loss {loss.item():.3f}{val})")
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation: held-out accuracy, sampled at temperature 1 and greedy.
# ---------------------------------------------------------------------------------------------
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


def evaluate(model, tok, rows, cfg, device, greedy, desc, with_se=False):
    """Held-out accuracy: mean outcome score of `eval_samples` samples per prompt at T=1, or of
    one greedy response. Sampling uses its own fixed seed (common random numbers), so the
    before/after difference and the difference between runs are not blurred by sampling noise;
    the training RNG state is restored afterwards. `with_se`: also the standard error of the
    mean over prompts, (accuracy, se)."""
    n = 1 if greedy else cfg.eval_samples
    texts = [prompt_text(tok, r["prompt"], r.get("ability")) for r in rows]
    scores = []
    bs = max(1, 512 // n)
    with seeded(cfg.eval_seed):
        for i in tqdm(range(0, len(rows), bs), desc=desc, disable=not cfg.show_progress, leave=False):
            chunk = [t for t in texts[i:i + bs] for _ in range(n)]
            ids, am = encode_prompts(tok, chunk, device)
            resp, mask = generate(model, tok, ids, am, cfg.max_new_tokens, 1.0, greedy=greedy,
                                  merged=cfg.merged_rollout, batch_size=cfg.gen_batch)
            outs = decode_responses(tok, resp, mask)
            s, _ = verify_batch(rows[i:i + bs], outs, n, cfg.verify_workers, cfg.sandbox)
            scores.append(s)
    per_prompt = torch.cat(scores).view(-1, n).mean(1)  # (prompts,)
    if with_se:
        return per_prompt.mean().item(), (per_prompt.std() / len(per_prompt) ** 0.5).item() if len(per_prompt) > 1 else 0.0
    return per_prompt.mean().item()


# Where the embedded default's SFT model lands on the default held-out prompts: the range over the
# SFT models measured in README "The embedded default" (several seeds, 1 and 2 threads), widened
# by 0.03 (about two standard errors of a 500-prompt evaluation). RL was measured from inside it.
SFT_BAND = {"acc_before": (0.43, 0.59), "greedy_before": (0.58, 0.85)}


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
        t = time.time()
        resp, mask = generate(model, tok, p_ids, p_mask, cfg.max_new_tokens, cfg.temperature, merged=cfg.merged_rollout,
                              batch_size=cfg.gen_batch)
        t_gen += time.time() - t
        t = time.time()
        outs = decode_responses(tok, resp, mask)
        r_o, why = verify_batch(rows, outs, K, cfg.verify_workers, cfg.sandbox)
        t_ver += time.time() - t
        for k, v in why.items():
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


def prm_step(model, batch, logp_ref, cfg, opt_prm):
    """Blocks 4-5: implicit rewards q from the PRM, then its cross-entropy update (ALGORITHM.md §3).

    Single-forward (default): q is recorded from the same forward that the update uses, so the
    rewards come from the PRM before it saw this batch (mini-batch by mini-batch, as [O]).
    Double-forward: after the update, q is recomputed with the updated PRM. `none`: no update.
    Returns q (B, T) and stats, including the pairwise accuracy on this fresh batch before the
    update (does the PRM generalise?) and after it.
    """
    model.set_adapter("prm")  # the PRM adapter is active and trainable, the policy's is frozen
    B, K, micro = batch.B, cfg.K, cfg.micro_batch
    qs, losses = [], []
    for m0, m1 in minibatches(B // K, K, cfg.prm_minibatches):  # in order, not shuffled ([O])
        if cfg.prm_update != "none":
            opt_prm.zero_grad(set_to_none=True)
        for i in range(m0, m1, micro):
            j = min(i + micro, m1)
            with torch.set_grad_enabled(cfg.prm_update != "none"):
                logp_phi = token_logprobs(model, *batch.slice(i, j), chunk=cfg.logprob_chunk)  # (b, T)
                q = prm.implicit_rewards(logp_phi, logp_ref[i:j], batch.mask[i:j])  # (b, T)
                loss = prm.ce_loss(q, batch.r_o[i:j], batch.mask[i:j], cfg.beta)
            if cfg.prm_update != "none":
                (loss * (j - i) / (m1 - m0)).backward()  # by its share of the mini-batch: the mini-batch's mean
            qs.append(q.detach())
            losses.append(loss.item() * (j - i) / B)
        if cfg.prm_update != "none":
            torch.nn.utils.clip_grad_norm_(opt_prm.param_groups[0]["params"], cfg.prm_grad_clip)
            opt_prm.step()
    q = torch.cat(qs)  # (B, T)
    stats = {"prm_loss": sum(losses), "prm_acc_fresh": prm.pairwise_accuracy(q, batch.r_o, batch.mask, K)}
    if cfg.prm_update != "none":
        logp_phi = logprobs_nograd(model, batch, micro, cfg.logprob_chunk)  # (B, T) the updated PRM
        q_after = prm.implicit_rewards(logp_phi, logp_ref, batch.mask)  # (B, T)
        stats["prm_acc_after"] = prm.pairwise_accuracy(q_after, batch.r_o, batch.mask, K)
        if cfg.prm_update == "double":
            q = q_after
    return q, stats


def advantages(q, batch, cfg, use_process):
    """Block 6: process rewards p from q, RLOO (or GRPO/REINFORCE) returns, whitening (ALGORITHM.md §4)."""
    K, mask = cfg.K, batch.mask
    p = None
    if use_process:
        p = rl.batch_norm(q, mask) if cfg.prime_norm == "batch_norm" else cfg.beta * q  # (B, T)
        p = cfg.process_coef * p
    if cfg.adv_estimator == "rloo":
        returns = rl.rloo_returns(p, batch.r_o, mask, K, cfg.gamma_process, cfg.gamma_outcome)
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
        for i in range(0, len(idx), micro):
            sub = idx[i:i + micro]
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
        torch.nn.utils.clip_grad_norm_(opt_policy.param_groups[0]["params"], cfg.policy_grad_clip)
        opt_policy.step()
    stats["entropy"] = nll / batch.mask.sum().item()  # nats per response token (each row is in one mini-batch)
    return stats


def fmt_step(step, cfg, m):
    s = (f"step {step}/{cfg.steps} | acc {m['acc']:.3f} | kept {m['kept']}/{cfg.P} | ")
    if "prm_loss" in m:
        s += (f"prm_loss {m['prm_loss']:.3f} | prm_acc {m['prm_acc_fresh']:.2f}->{m.get('prm_acc_after', float('nan')):.2f} | "
              f"|ret| p {m['ret_process']:.3f}{'' if m['process_on'] else ' (off)'} o {m['ret_outcome']:.3f} | ")
    s += (f"pg {m.get('pg_loss', 0):+.3f} | clip {m.get('clipfrac', 0):.3f} | ent {m.get('entropy', 0):.3f} | len {m['len']:.1f} | "
          f"{m['t_step']:.2f}s (roll {m['t_rollout']:.2f} ver {m['t_verify']:.2f} prm {m.get('t_prm', 0):.2f} pol {m.get('t_policy', 0):.2f})")
    fails = [f"{k[2:]} {v}" for k, v in sorted(m.items()) if k.startswith("n_") and k != "n_correct"]
    return s + (" | " + ", ".join(fails) if fails else "")  # why responses scored below 1 (verifiers.REASONS)


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs: a run killed at any moment resumes from its last complete checkpoint.
# ---------------------------------------------------------------------------------------------
def latest_checkpoint(run_dir):
    """The newest complete checkpoint folder of a run, or None. A folder is complete once renamed
    from `checkpoint-NNNNNN.tmp` to `checkpoint-NNNNNN` (the rename is atomic)."""
    found = sorted(d for d in os.listdir(run_dir) if re.fullmatch(r"checkpoint-\d{6}", d)) if os.path.isdir(run_dir) else []
    return os.path.join(run_dir, found[-1]) if found else None


def save_checkpoint(run_dir, step, model, opt_policy, opt_prm, state):
    """Both adapters (peft format), both optimizers, RNG states and `state` (data position, ...),
    written to a temporary folder and renamed; older checkpoints are removed afterwards."""
    import shutil
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapters"))  # adapters/policy/, adapters/prm/
    torch.save({**state, "step": step, "opt_policy": opt_policy.state_dict(), "opt_prm": opt_prm.state_dict(),
                "rng_python": random.getstate(), "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for d in os.listdir(run_dir):
        if re.fullmatch(r"checkpoint-\d{6}(\.tmp)?", d) and os.path.join(run_dir, d) != final:
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)


def load_adapter(model, folder, name):
    """Load adapter weights saved by `save_pretrained` (`folder` holds adapter_model.safetensors)
    into `model`'s adapter `name`. Every LoRA tensor of that adapter must be in the file and every
    tensor of the file must find its place: peft alone loads a partial match without a word."""
    from peft import load_peft_weights, set_peft_model_state_dict
    try:
        result = set_peft_model_state_dict(model, load_peft_weights(folder), adapter_name=name)
    except RuntimeError as e:  # a shape mismatch: another rank, or another base
        raise ConfigError(f"{folder}: does not fit the {name} adapter ({str(e).splitlines()[-1].strip()[:300]})") from None
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{folder}: does not fit the {name} adapter: {len(missing)} of its tensors are not in the "
                          f"file (e.g. {missing[:1]}), {len(result.unexpected_keys)} of the file's have no place "
                          f"(e.g. {result.unexpected_keys[:1]}): other LoRA targets, or another base")


def load_adapters(model, folder):
    """Load the `policy` and `prm` adapters saved by `model.save_pretrained(folder)`."""
    for name in ("policy", "prm"):
        load_adapter(model, os.path.join(folder, name), name)


def load_prm_init(model, cfg, base_path):
    """--prm-init: π_φ starts from a PRM adapter trained by another run (the paper's offline PRM
    when --prm-update none keeps it frozen). Its scores mean something only on the base it was
    trained with: a warning says when the adapter names another one."""
    trained_on = json.load(open(os.path.join(cfg.prm_init, "adapter_config.json"))).get("base_model_name_or_path")
    if trained_on and os.path.abspath(trained_on) != os.path.abspath(base_path):
        warnings.warn(f"--prm-init: {cfg.prm_init} was trained on {trained_on}, this run's base is {base_path}",
                      RuntimeWarning)
    load_adapter(model, cfg.prm_init, "prm")
    print(f"PRM: starting from {cfg.prm_init}{' (frozen: --prm-update none)' if cfg.prm_update == 'none' else ''}")


def load_checkpoint(path, model, opt_policy, opt_prm):
    """Restore what `save_checkpoint` wrote; returns its `state` dict."""
    load_adapters(model, os.path.join(path, "adapters"))
    st = torch.load(os.path.join(path, "state.pt"), weights_only=False)  # our own file: RNG tuples inside
    opt_policy.load_state_dict(st["opt_policy"])
    opt_prm.load_state_dict(st["opt_prm"])
    random.setstate(st["rng_python"])
    torch.set_rng_state(st["rng_torch"])
    if st["rng_cuda"] is not None:
        torch.cuda.set_rng_state_all(st["rng_cuda"])
    return st


def open_metrics(run_dir, last_step):
    """metrics.jsonl for appending, cut back to `last_step` (a resumed run re-does later steps)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    keep, unreadable = [], 0
    if last_step and os.path.exists(path):
        for line in open(path):
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1  # a line cut short by the kill: skip it, and only it
                continue
            if m["step"] <= last_step:
                keep.append(json.dumps(m) + "\n")
    if unreadable:
        warnings.warn(f"{path}: skipped {unreadable} unreadable line(s) (a kill leaves its last line half-written)",
                      RuntimeWarning)
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def make_logger(cfg, run_dir, last_step):
    """A `log(m)` function writing one step's metrics to metrics.jsonl, and to TensorBoard (when
    installed) and wandb (when asked for) under the same names; and a `close()`."""
    metrics_f = open_metrics(run_dir, last_step)
    tb = wb = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(run_dir, purge_step=last_step + 1)  # drop events of re-done steps
        except ImportError:
            warnings.warn("--tensorboard: tensorboard is not installed, so no event files are written "
                          "(pip install tensorboard, or --no-tensorboard)", RuntimeWarning)
    if cfg.wandb_project:
        import wandb
        wb = wandb.init(project=cfg.wandb_project, name=os.path.basename(run_dir), id=os.path.basename(run_dir),
                        dir=run_dir, config=dataclasses.asdict(cfg), resume="allow")

    def log(m):
        metrics_f.write(json.dumps(m) + "\n")
        metrics_f.flush()
        scalars = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and k != "step"}
        if tb:
            for k, v in scalars.items():
                tb.add_scalar(k, v, m["step"])
        if wb:
            wb.log(scalars, step=m["step"])

    def close():
        metrics_f.close()
        if tb:
            tb.close()
        if wb:
            wb.finish()
    return log, close


def run(cfg):
    t_start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    # Read and check all data before building anything expensive.
    train_rows = [r for path in cfg.data.split(",") for r in load_rows(path)]
    test_rows = load_rows(cfg.test_data)
    check_sandbox(cfg.sandbox, train_rows + test_rows)

    rng = torch.get_rng_state()  # SFT seeds its own RNG: a cold run must draw what a cached one does
    base_path = cfg.model if cfg.model else sft_warmup(cfg, device)
    torch.set_rng_state(rng)
    base, tok = load_base(base_path, device, cfg)
    train_rows = drop_long_prompts(train_rows, tok, cfg.max_prompt_len, cfg.data)
    test_rows = drop_long_prompts(test_rows, tok, cfg.max_prompt_len, cfg.test_data)[: cfg.eval_n or None]
    model = add_adapters(base, cfg)
    if cfg.prm_init and not cfg.resume:  # a trained π_φ (a resumed run loads its checkpoint's)
        load_prm_init(model, cfg, base_path)
    opt_policy = torch.optim.AdamW(adapter_params(model, "policy"), lr=cfg.lr_policy, weight_decay=cfg.wd_policy)
    opt_prm = torch.optim.AdamW(adapter_params(model, "prm"), lr=cfg.lr_prm, weight_decay=0.0)  # ALGORITHM.md §3.3

    if cfg.resume:
        run_dir = cfg.resume
    else:
        name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.reward_mode}-s{cfg.seed}"
        run_dir = os.path.join(cfg.out_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        json.dump({**dataclasses.asdict(cfg), "base_path": base_path, "device_used": device},
                  open(os.path.join(run_dir, "config.json"), "w"), indent=2)
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
        print(f"resuming from {ckpt} (step {start}); metrics after step {start} are re-done")
    else:
        start = 0
        acc, se = evaluate(model, tok, test_rows, cfg, device, False, "eval (sampled) before RL", with_se=True)
        ev = {"acc_before": acc, "acc_before_se": se,
              "greedy_before": evaluate(model, tok, test_rows, cfg, device, True, "eval (greedy) before RL")}
    print(f"before RL: held-out accuracy sampled {ev['acc_before']:.3f} | greedy {ev['greedy_before']:.3f}")
    report = start_report(cfg, ev)
    if report:
        print(report)
    history = []  # this process's step metrics, for drop_warning
    log, close_log = make_logger(cfg, run_dir, start)

    use_prm = cfg.reward_mode == "prime"
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="RL", disable=not cfg.show_progress, mininterval=1,
               initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.time()
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
                logp_old = logprobs_nograd(model, batch, cfg.micro_batch, cfg.logprob_chunk)  # (B, T)
            m["t_policy"] = time.time() - t

            # 4-5. Implicit process rewards and the PRM's cross-entropy update.
            q = None
            if use_prm:
                t = time.time()
                if cfg.ref_type == "freeze":
                    with model.disable_adapter():  # π_ref: the same base, adapters off
                        logp_ref = logprobs_nograd(model, batch, cfg.micro_batch, cfg.logprob_chunk)
                else:
                    logp_ref = logp_old
                q, st = prm_step(model, batch, logp_ref, cfg, opt_prm)
                m.update(st)
                m["t_prm"] = time.time() - t

            # 6. Advantages: RLOO on process and outcome rewards, summed, whitened. Optional guards
            # (off in [O]): a PRM warm-up, and a gate on the PRM's ranking of fresh samples.
            if use_prm:
                if step > 1:  # step 1 scores (part of) the batch with the zero PRM: ties count as 0
                    acc_ema = 0.9 * acc_ema + 0.1 * m["prm_acc_fresh"]
                m["prm_acc_ema"] = acc_ema
            m["process_on"] = use_prm and step > cfg.prm_warmup and acc_ema >= cfg.prm_gate
            A, st = advantages(q, batch, cfg, use_process=m["process_on"])
            m.update(st)

            # 7. PPO-clip policy update.
            t = time.time()
            m.update(policy_step(model, batch, logp_old, A, cfg, opt_policy, gen))
            m["t_policy"] += time.time() - t
            model.set_adapter("policy")

            # 8. Log, evaluate, checkpoint.
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                m["eval_acc"] = evaluate(model, tok, test_rows, cfg, device, False, f"eval step {step}")
            m["t_step"] = time.time() - t0
            tqdm.write(fmt_step(step, cfg, m))
        history.append(m)
        warning = drop_warning(step, m["eval_acc"], ev, history, cfg) if "eval_acc" in m else None
        if warning:
            tqdm.write(warning)
        log(m)
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(run_dir, step, model, opt_policy, opt_prm,
                            {"stream": stream.state(), "buffer": list(buffer), "acc_ema": acc_ema,
                             "rng_gen": gen.get_state(), "eval_before": ev, "wall_time_s": time.time() - t_start})
    close_log()

    # Evaluation after RL, the token-reward page, both adapters (peft format) and the summary.
    model.set_adapter("policy")
    acc_after = evaluate(model, tok, test_rows, cfg, device, False, "eval (sampled) after RL")
    greedy_after = evaluate(model, tok, test_rows, cfg, device, True, "eval (greedy) after RL")
    if cfg.reward_pages and use_prm:
        import experiments  # the token-reward page (experiments.py)
        experiments.write_reward_page(model, tok, test_rows, cfg, device, os.path.join(run_dir, "rewards.html"), run_dir)
    model.save_pretrained(os.path.join(run_dir, "adapters"))  # adapters/policy/ and adapters/prm/
    summary = {**ev, "acc_after": acc_after, "greedy_after": greedy_after, "seed": cfg.seed,
               "reward_mode": cfg.reward_mode, "steps": cfg.steps, "eval_prompts": len(test_rows),
               "eval_samples": cfg.eval_samples, "wall_time_s": time.time() - t_start}
    json.dump(summary, open(os.path.join(run_dir, "summary.json"), "w"), indent=2)
    acc_before, greedy_before = ev["acc_before"], ev["greedy_before"]
    print("\nheld-out accuracy (%d prompts)   sampled T=1 (%d/prompt)   greedy" % (len(test_rows), cfg.eval_samples))
    print(f"  before RL (SFT model)        {acc_before:.3f}                    {greedy_before:.3f}")
    print(f"  after RL ({cfg.reward_mode}, {cfg.steps} steps)   {acc_after:.3f}                    {greedy_after:.3f}")
    print(f"  change                       {acc_after - acc_before:+.3f}                   {greedy_after - greedy_before:+.3f}")
    warning = drop_warning(cfg.steps, acc_after, ev, history, cfg)
    if warning:
        print(warning)
    print(f"wall time {summary['wall_time_s']:.0f}s; outputs in {run_dir}")
    return summary, run_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in ("compare", "show-rewards"):
            import experiments  # imported here: it imports this module
            {"compare": experiments.compare_main, "show-rewards": experiments.show_rewards_main}[argv[0]](argv[1:])
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
