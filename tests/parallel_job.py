"""What tests/test_parallel.py runs on each rank of a 2-process gloo job, and in one process for the
reference: one PRM and one policy update on a fixed batch, and `collect` with a deterministic
stand-in for sampling. `python tests/parallel_job.py BASE_DIR OUT_FILE` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set writes this rank's results to OUT_FILE (torch.save)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import config  # noqa: E402
import models  # noqa: E402
import parallel  # noqa: E402
import prime_mini as pm  # noqa: E402
import sampling  # noqa: E402
import tasks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_cfg(**kw):
    """A micro model; mini-batches of two micro-batches each, so that two ranks do one each."""
    cfg = config.Config(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_intermediate=64, lora_r=4, prm_lora_r=4,
                        P=4, K=4, micro_batch=4, prm_minibatches=2, policy_minibatches=2, lr_policy=1e-2, lr_prm=1e-2,
                        max_new_tokens=40, show_progress=False, verify_workers=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def make_base(d):
    """A saved micro base (random weights, the character tokenizer) in folder d."""
    tok = models.build_char_tokenizer()
    torch.manual_seed(0)
    models.build_tiny_model(job_cfg(), tok).save_pretrained(d)
    models.save_tokenizer(tok, d)


def rows():
    """The embedded task's first 40 RL prompts."""
    with open(os.path.join(ROOT, "data", "arith_rl.jsonl")) as f:
        return [json.loads(line) for _, line in zip(range(40), f)]


def adapted_model(base_dir, cfg):
    """The micro base with both adapters at small random values (the same on every rank)."""
    base, tok = models.load_base(base_dir, "cpu", cfg)
    model = models.add_adapters(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, tok


def fixed_batch(tok, cfg, T=11):
    """16 rows (4 groups of K=4) of different lengths and mixed outcomes."""
    g = torch.Generator().manual_seed(0)
    B = cfg.P * cfg.K
    data = rows()
    texts = [tasks.prompt_text(tok, data[i]["prompt"]) for i in range(cfg.P) for _ in range(cfg.K)]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    resp = torch.randint(4, len(tok), (B, T), generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = (torch.arange(T).expand(B, T) < lengths[:, None]).float()  # (B, T)
    r_o = torch.tensor([float(i % cfg.K in (0, 3)) for i in range(B)])
    return sampling.Rollout(ids, am, resp, mask, r_o, data[:cfg.P])


def updates(base_dir):
    """One PRM step (rewards from the batch) and one policy step (PPO on the advantages): the
    adapters, both optimizers' states and the PRM's rewards after them."""
    cfg = job_cfg()
    model, tok = adapted_model(base_dir, cfg)
    batch = fixed_batch(tok, cfg)
    opt_policy = torch.optim.AdamW(models.adapter_params(model, "policy"), lr=cfg.lr_policy)
    opt_prm = torch.optim.AdamW(models.adapter_params(model, "prm"), lr=cfg.lr_prm)
    with model.disable_adapter():
        logp_ref = pm.shared_logprobs(model, batch, cfg)
    model.set_adapter("policy")
    logp_old = pm.shared_logprobs(model, batch, cfg)
    q, prm_stats = pm.prm_step(model, batch, logp_ref, cfg, opt_prm)
    A, _ = pm.advantages(q, batch, cfg, use_process=True)
    pol_stats = pm.policy_step(model, batch, logp_old, A, cfg, opt_policy, torch.Generator().manual_seed(0))
    return {"adapters": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
            "opt_policy": opt_policy.state_dict(), "opt_prm": opt_prm.state_dict(), "q": q, "A": A,
            "logp_ref": logp_ref, "logp_old": logp_old, "prm_loss": prm_stats["prm_loss"], "pg_loss": pol_stats["pg_loss"]}


def scripted_generate(model, tok, prompt_ids, prompt_mask, max_new_tokens, temperature, **kw):
    """A deterministic stand-in for sampling: each row's response depends only on its prompt and on
    its place in its group (row % K, the same on any rank: a rank's share is whole groups), and
    is right for some places and wrong for others, so that some groups pass the filter."""
    K = job_cfg().K
    texts = []
    for j, ids in enumerate(prompt_ids.tolist()):
        prompt = tok.decode([i for i in ids if i != tok.pad_token_id], skip_special_tokens=True)
        expr = prompt.strip().rstrip("=")
        value = eval(expr, {"__builtins__": {}})  # a chain of digits, + and -: the test's own data
        h = sum(ids) + j % K
        texts.append(f"{expr}\\boxed{{{value + (0 if h % 3 else 1)}}}")
    eos = sampling.end_tokens(model, tok)
    enc = [tok(t, add_special_tokens=False)["input_ids"] + [eos[0]] for t in texts]
    T = max(len(e) for e in enc)
    resp = torch.tensor([e + [tok.pad_token_id] * (T - len(e)) for e in enc])
    return resp, sampling.response_mask(resp, eos)


def collected(base_dir, steps=3):
    """`collect` for a few steps, as the loop calls it (with `prime_mini.generate` replaced by
    scripted_generate): the kept batches, the buffer and the stream."""
    cfg = job_cfg(max_rollout_rounds=3, sandbox="rlimit")
    model, tok = adapted_model(base_dir, cfg)
    data = rows()
    stream, buffer = pm.PromptStream(len(data), 0), []
    out = []
    for _ in range(steps):
        batch, st = pm.collect(model, tok, cfg, data, stream, buffer, "cpu")
        out.append({"resp": batch.resp, "mask": batch.mask, "r_o": batch.r_o, "prompt_ids": batch.prompt_ids,
                    "rows": [r["extra_info"]["index"] for r in batch.rows], "texts": batch.texts,
                    "buffer": list(buffer), "stream": stream.state()["pos"], "order": list(stream.state()["order"]),
                    "acc": st["acc"], "generated": st["generated"], "kept": st["kept"]})
    return out


def main(base_dir, out_file):
    torch.set_num_threads(1)
    parallel.setup("cpu")
    pm.generate = scripted_generate  # this process is the job's: nothing else runs in it
    result = {"rank": parallel.rank(), "world": parallel.world(), "updates": updates(base_dir),
              "collect": collected(base_dir)}
    torch.save(result, out_file)
    parallel.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
