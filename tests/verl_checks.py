"""Run by tests/test_verl_real.py with a Python that has veRL 0.6.1 installed (not this project's
venv): veRL's own code on an export-verl folder. Prints one JSON object of what it found.

Usage: python verl_checks.py OUT_DIR MODEL_DIR EXPECTED.json
  - MODEL_DIR as run_prime.sh loads it: OUT_DIR/model when the export wrote that copy; the
    tokenizer through AutoTokenizer and the config through AutoConfig, as veRL loads them;
  - veRL's RLHFDataset loads OUT_DIR/train.parquet with the model's tokenizer and its chat
    template; the prompt ids it makes are returned, decoded, for the test to compare with the
    text this project's run feeds the model (tasks.prompt_text);
  - veRL's get_custom_reward_fn loads OUT_DIR/prime_mini_reward.py's compute_score as the launch
    script names it, and veRL's PrimeRewardManager scores right, wrong and malformed responses.
"""
import json
import sys

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from verl import DataProto
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.reward_manager.prime import PrimeRewardManager

import os

out, model, expected = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
model = os.path.join(out, "model") if os.path.isdir(os.path.join(out, "model")) else model  # run_prime.sh's rule
try:  # what veRL's hf_tokenizer does
    tok, auto = AutoTokenizer.from_pretrained(model), "ok"
except ValueError as e:  # a folder written by transformers 5 names TokenizersBackend, which 4.x lacks
    tok, auto = PreTrainedTokenizerFast.from_pretrained(model), str(e).splitlines()[0]
cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 1024, "filter_overlong_prompts": True,
                        "truncation": "error", "return_raw_chat": False, "cache_dir": out + "/.cache",
                        "filter_overlong_prompts_workers": 1})
ds = RLHFDataset(data_files=out + "/train.parquet", tokenizer=tok, config=cfg)
items = [ds[i] for i in range(len(ds))]
prompts = [tok.decode(it["input_ids"][it["attention_mask"].bool()], skip_special_tokens=False) for it in items]

fn = get_custom_reward_fn(OmegaConf.create({"custom_reward_function": {"path": out + "/prime_mini_reward.py",
                                                                      "name": "compute_score"}}))
cases = expected["responses"]  # [(response text, row index)]
rows = [items[i] for _, i in cases]
resp = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in cases]
T = max(map(len, resp))
responses = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in resp])  # (n, T) right-padded
P = max(len(r["input_ids"]) for r in rows)
prompt_ids = torch.stack([torch.nn.functional.pad(r["input_ids"], (P - len(r["input_ids"]), 0), value=tok.pad_token_id)
                          for r in rows])  # (n, P) left-padded
attn = torch.cat([torch.stack([torch.nn.functional.pad(r["attention_mask"], (P - len(r["attention_mask"]), 0)) for r in rows]),
                  torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in resp])], 1)
data = DataProto.from_dict(tensors={"prompts": prompt_ids, "responses": responses, "attention_mask": attn},
                           non_tensors={"data_source": np.array([r["data_source"] for r in rows], dtype=object),
                                        "reward_model": np.array([r["reward_model"] for r in rows], dtype=object),
                                        "extra_info": np.array([r.get("extra_info") for r in rows], dtype=object)})
reward = PrimeRewardManager(tokenizer=tok, num_examine=0, compute_score=fn)(data)  # (n, T): the score at the last token
print(json.dumps({"auto_tokenizer": auto, "rope_theta": AutoConfig.from_pretrained(model).rope_theta,
                  "loaded_from": model, "n_rows": len(ds), "prompts": prompts, "scores": reward.sum(1).tolist(),
                  "at_last_token": [int(reward[i].nonzero().flatten().tolist()[-1]) if reward[i].any() else -1
                                    for i in range(len(resp))], "lengths": [len(r) for r in resp]}))
