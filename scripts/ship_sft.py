"""Regenerate the SFT model that ships with the project (data/sft/<key>/, docs/EXPERIMENTS.md "The embedded default").

    python scripts/ship_sft.py [--threads 1] [run flags]

Trains the embedded default's SFT warm-up for these settings (seed 0 unless --sft-seed says
otherwise) into OUT_DIR/sft/<key>, or reuses the one there, then copies it to data/sft/<key>,
where every run with these settings starts from it. Shipped models of other keys (stale: the
warm-up's settings changed) are listed and removed; git keeps the old ones. tests/test_model.py
fails while the shipped key differs from the default settings' key.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from config import parse_config  # noqa: E402
from models import run_device  # noqa: E402
from sft import SHIPPED_SFT, cached_or_trained, sft_key, sft_path  # noqa: E402


def main(argv):
    cfg = parse_config(argv)
    if cfg.model:
        raise SystemExit("error: --model: only the embedded default's SFT model ships (data/sft/)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    key, path = sft_key(cfg), sft_path(cfg)
    dest = os.path.join(SHIPPED_SFT, key)
    if os.path.realpath(path) == os.path.realpath(dest):
        raise SystemExit(f"error: --out-dir: {cfg.out_dir} keeps its SFT models in {SHIPPED_SFT}, the shipped "
                         "folder itself: choose another --out-dir (default runs)")
    cached_or_trained(cfg, run_device(cfg), path)
    os.makedirs(SHIPPED_SFT, exist_ok=True)
    for old in sorted(os.listdir(SHIPPED_SFT)):
        if old != key:
            print(f"removing the shipped model of other settings: {os.path.join(SHIPPED_SFT, old)}")
            shutil.rmtree(os.path.join(SHIPPED_SFT, old))
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    for name in sorted(os.listdir(path)):  # the model, its tokenizer and `done` (steps, loss, threads)
        shutil.copy2(os.path.join(path, name), dest)
    info = json.load(open(os.path.join(dest, "done")))
    print(f"shipped: {dest} ({info.get('steps')} SFT steps at {info.get('threads', '?')} thread(s), validation "
          f"greedy {info.get('val_greedy')}); commit data/sft/")


if __name__ == "__main__":
    main(sys.argv[1:])
