"""The SFT warm-up of the embedded default: trains the tiny base from scratch, and caches it.

PRIME starts RL from an SFT model (the paper's is Eurus-2-7B-SFT). The embedded default ships
its own: data/sft/<hash of the settings>/ is the model that this warm-up trained (seed 0), so
every machine starts RL from the same weights. Other settings (or --retrain-sft) train a
0.8M-parameter Qwen2 on the task's worked solutions until greedy accuracy on validation prompts
reaches `--sft-target` (docs/RESULTS.md, "The embedded default": why a stopping rule instead of a
fixed step count). The result is cached under OUT_DIR/sft/<hash of the settings>, so RL seeds and
arms share one starting model. Runs started together take turns (a file lock): the first trains
it, the others wait and reuse it. scripts/ship_sft.py regenerates the shipped model.

It must not touch: adapters or the RL loop; runs with `--model` never call it.
"""
import hashlib
import json
import os
import random
import tempfile

import torch
from tqdm.auto import tqdm

from checkpoints import replace_folder
from evaluation import evaluate
from models import CHARS, ConfigError, build_char_tokenizer, build_tiny_model, building, save_tokenizer
from tasks import HERE, load_rows, prompt_text, resolve

def sft_key(cfg):
    keys = ["tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate", "sft_steps", "sft_batch",
            "sft_lr", "sft_seed", "sft_target", "sft_check_every", "max_new_tokens"]
    blob = json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True) + CHARS + "constant-lr"
    if cfg.sft_init:  # the starting weights, by content (a folder's path says nothing about them)
        blob += "init" + hashlib.sha256(open(os.path.join(cfg.sft_init, "model.safetensors"), "rb").read()).hexdigest()
    for path in (cfg.sft_data, cfg.sft_val_data) if cfg.sft_target else (cfg.sft_data,):
        blob += hashlib.sha256(open(resolve(path), "rb").read()).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


SHIPPED_SFT = os.path.join(HERE, "data", "sft")  # the released SFT models, one folder per key (scripts/ship_sft.py)


def shipped_sft(cfg):
    """The shipped SFT model that these settings give (data/sft/<sft_key>), or None if none ships."""
    path = os.path.join(SHIPPED_SFT, sft_key(cfg))
    return path if os.path.exists(os.path.join(path, "done")) else None


def sft_path(cfg):
    """The folder of the SFT model that these settings give (OUT_DIR/sft/<sft_key>)."""
    return os.path.join(resolve(cfg.out_dir) if not os.path.isabs(cfg.out_dir) else cfg.out_dir, "sft", sft_key(cfg))


def sft_warmup(cfg, device):
    """Returns the folder of the SFT model (the frozen base and π_ref), training it if needed.

    The tiny model learns the task's carries in a sudden jump whose timing depends on the seed
    and on the machine's floating-point rounding: a fixed number of steps leaves one draw at 0.2
    held-out accuracy and the next at 0.9. So the warm-up trains at a constant learning rate
    and stops as soon as greedy accuracy on the validation prompts (`sft_val_data`, a split of
    their own) reaches `sft_target`, checked every `sft_check_every` steps: every draw then
    starts RL from the same accuracy band (docs/EXPERIMENTS.md, "The embedded default").

    One process at a time builds a given folder (a lock file next to it): a second run started
    meanwhile waits, then reuses the first's model. Each writes into a temporary folder of its
    own and renames it into place.

    Which model: OUT_DIR/sft/<key> when it exists (one this machine trained, for example with
    --retrain-sft), else the shipped data/sft/<key>, else one trained now. --retrain-sft always
    trains (into OUT_DIR/sft/<key>)."""
    path = sft_path(cfg)
    shipped = shipped_sft(cfg)
    if shipped and not cfg.retrain_sft and not os.path.exists(os.path.join(path, "done")):
        info = json.load(open(os.path.join(shipped, "done")))
        print(f"SFT model: the shipped one, {os.path.relpath(shipped)} (the warm-up of these settings, trained "
              f"{info.get('steps', '?')} steps; --retrain-sft to train your own)")
        return shipped
    return cached_or_trained(cfg, device, path)


def cached_or_trained(cfg, device, path):
    """The SFT model in `path` (OUT_DIR/sft/<key>), trained now if it is not there or --retrain-sft."""
    with building(path):  # waits while another run trains this model; removes what killed ones left
        if os.path.exists(os.path.join(path, "done")) and not cfg.retrain_sft:
            info = json.load(open(os.path.join(path, "done")))
            print(f"SFT model: reusing {path} (trained {info.get('steps', '?')} steps; --retrain-sft to train again)")
            return path
        return train_sft(cfg, device, path)


def train_sft(cfg, device, path):
    """Train the SFT model and save it to `path` (through a temporary folder and a rename)."""
    rows = load_rows(cfg.sft_data, need_response=True)
    val_rows = load_rows(cfg.sft_val_data) if cfg.sft_target else []
    torch.manual_seed(cfg.sft_seed)
    rng = random.Random(cfg.sft_seed)
    tok = build_char_tokenizer()
    model = build_tiny_model(cfg, tok).to(device)
    if cfg.sft_init:  # a curriculum: continue from a model that learned shorter chains
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(os.path.join(cfg.sft_init, "model.safetensors")), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embeddings, not saved
            raise ConfigError(f"--sft-init: {cfg.sft_init} does not fit the tiny model (missing {missing}, "
                              f"unexpected {unexpected})")
        model.tie_weights()
        print(f"SFT warm-up starts from {cfg.sft_init}")
    n_params = sum(p.numel() for p in model.parameters())
    stop = (f"until greedy accuracy on {len(val_rows)} validation prompts reaches {cfg.sft_target:g} "
            f"(checked every {cfg.sft_check_every} steps), at most {cfg.sft_steps} steps" if cfg.sft_target
            else f"{cfg.sft_steps} steps")
    print(f"SFT warm-up: tiny Qwen2 with {n_params / 1e6:.2f}M parameters, {len(rows)} worked solutions, "
          f"batches of {cfg.sft_batch}, {stop}")
    # Prompt ids and response ids (+ EOS), each row tokenised the first time it is drawn (a short
    # warm-up draws few of the 60k rows); the loss is on response tokens only.
    p_ids, r_ids = {}, {}

    def tokenise(idx):
        new = [i for i in dict.fromkeys(idx) if i not in p_ids]
        if new:
            p_new = tok([prompt_text(tok, rows[i]["prompt"]) for i in new], add_special_tokens=False)["input_ids"]
            r_new = tok([rows[i]["response"] for i in new], add_special_tokens=False)["input_ids"]
            p_ids.update(zip(new, p_new))
            r_ids.update(zip(new, r_new))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50

    order, val_acc, steps = [], None, cfg.sft_steps
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="SFT", disable=not cfg.show_progress, mininterval=1)
    for s in bar:
        if len(order) < cfg.sft_batch:
            order += rng.sample(range(len(rows)), len(rows))
        idx, order = order[:cfg.sft_batch], order[cfg.sft_batch:]
        tokenise(idx)
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
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp", dir=os.path.dirname(path))
    model.save_pretrained(tmp)
    save_tokenizer(tok, tmp)
    info = {"loss": loss.item(), "steps": steps, "val_greedy": val_acc, "threads": torch.get_num_threads()}
    open(os.path.join(tmp, "done"), "w").write(json.dumps(info))
    replace_folder(tmp, path)
    val = f", validation greedy accuracy {val_acc:.3f}" if val_acc is not None else ""
    print(f"SFT model saved to {path} after {steps} steps (last loss {loss.item():.3f}{val})")
    return path
