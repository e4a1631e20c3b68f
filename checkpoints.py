"""Checkpoints and logs: a run killed at any moment resumes from its last complete checkpoint.

A checkpoint holds both adapters (peft format), both optimizers, every RNG state and the data
position; it is written to a temporary folder and renamed, so a folder either is complete or
does not count. Metrics go to metrics.jsonl (one line per step), and to TensorBoard and
Weights & Biases when present.

It must not touch: the algorithm (it saves and restores state, it computes nothing).
"""
import dataclasses
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings

import torch

from models import ConfigError


def json_safe(obj):
    """`obj` with every NaN or infinity as None: JSON has no NaN,
    and most readers refuse Python's `NaN` token. Dicts, lists and tuples are walked."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_line(obj):
    """One line of JSON (metrics.jsonl), NaN written as null."""
    return json.dumps(json_safe(obj), allow_nan=False) + "\n"


def write_json(path, obj):
    """Write `obj` as JSON (NaN as null) to `path` through a temporary file in the same folder and
    a rename: a kill leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(json_safe(obj), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: the old file stays as it was
            os.remove(tmp)


def replace_folder(tmp, final):
    """Put the complete folder `tmp` in the place of `final` (an older `final` is removed first;
    the rename itself is atomic, so `final` is never a half-written folder)."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def latest_checkpoint(run_dir):
    """The newest complete checkpoint folder of a run, or None. A folder is complete once renamed
    from `checkpoint-NNNNNN.tmp` to `checkpoint-NNNNNN` (the rename is atomic)."""
    found = sorted(d for d in os.listdir(run_dir) if re.fullmatch(r"checkpoint-\d{6}", d)) if os.path.isdir(run_dir) else []
    return os.path.join(run_dir, found[-1]) if found else None


def save_checkpoint(run_dir, step, model, opt_policy, opt_prm, state):
    """Both adapters (peft format), both optimizers, RNG states and `state` (data position, ...),
    written to a temporary folder and renamed; older checkpoints are removed afterwards."""
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "adapters"))  # adapters/policy/, adapters/prm/
    torch.save({**state, "step": step, "opt_policy": opt_policy.state_dict(), "opt_prm": opt_prm.state_dict(),
                "rng_python": random.getstate(), "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, "state.pt"))
    replace_folder(tmp, final)
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
    trained with: a warning says when the adapter names another one.

    The adapter names its base as peft records it: the folder the base was loaded from, which for
    a hub name with a GGUF fallback (--preset smollm2-135m offline) or a .gguf file is the
    converted folder, not `base_path` (the --model given). So it is compared with what this
    run's own adapters record, the loaded base's `name_or_path`."""
    with open(os.path.join(cfg.prm_init, "adapter_config.json")) as f:
        trained_on = json.load(f).get("base_model_name_or_path")
    loaded = getattr(model.get_base_model(), "name_or_path", "") or base_path  # what peft saves for this run
    if trained_on and os.path.abspath(trained_on) != os.path.abspath(loaded):
        warnings.warn(f"--prm-init: {cfg.prm_init} was trained on {trained_on}, this run's base is {base_path}"
                      + (f" (loaded from {loaded})" if loaded != base_path else ""), RuntimeWarning)
    load_adapter(model, cfg.prm_init, "prm")
    print(f"PRM: starting from {cfg.prm_init}{' (frozen: --prm-update none)' if cfg.prm_update == 'none' else ''}")


def load_checkpoint(path, model, opt_policy, opt_prm):
    """Restore what `save_checkpoint` wrote; returns its `state` dict.

    state.pt holds only tensors, numbers, strings, lists, tuples and dicts, so it is read with
    `weights_only=True`: a checkpoint from someone else cannot run code through pickle."""
    load_adapters(model, os.path.join(path, "adapters"))
    try:
        st = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message ends with what it refused (e.g. GLOBAL posix.system)
        what = next((line for line in str(e).splitlines() if "GLOBAL" in line), "").strip()
        raise ConfigError(f"--resume: {os.path.join(path, 'state.pt')} holds objects other than tensors, numbers and "
                          f"containers, which this program never saves: refused, nothing in it was run ({what[:200]})") from None
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
                keep.append(json_line(m))
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
        metrics_f.write(json_line(m))
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
