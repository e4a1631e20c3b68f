"""The loop's options and corners, in-process on a micro model (no subprocess, no SFT).

Each test checks a property of an option's effect, so that a swapped or dropped line fails it:
the filter on with partial batches (fewer kept groups than mini-batches), resume with a non-empty
prompt buffer, single- vs double-forward rewards, the PRM warm-up and gate, the reference choice,
several policy mini-batches, the loss aggregation, `--prime-norm`, `--process-coef`, a trained
PRM loaded and frozen (`--prm-init`), and every end token of the model's generation config.

Outcomes are scripted (`scripted_verify`): a micro model with random weights answers nothing
right, and a script says exactly which groups pass the [0.2, 0.8] filter at which step.
"""
import json
import math
import os
import types

import pytest
import torch

import checkpoints
import config
import models
import prime_mini as pm
import prm
import sampling
import steps
import tasks
from test_model import tiny_cfg


def micro_cfg(**kw):
    return tiny_cfg(**{"tiny_layers": 1, "K": 2, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models run fastest on one thread (and a loaded machine's cores are not fought over)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved micro base model (random weights, the character tokenizer) and small data files."""
    d = tmp_path_factory.mktemp("loop")
    tok = models.build_char_tokenizer()
    torch.manual_seed(0)
    base = os.path.join(d, "base")
    models.build_tiny_model(micro_cfg(), tok).save_pretrained(base)
    models.save_tokenizer(tok, base)

    def row(a, gt):
        return {"prompt": [{"role": "user", "content": a}], "ability": "math", "reward_model": {"ground_truth": gt}}
    train = [row(f"{i}+1=", str(i + 1)) for i in range(40)]
    test = [row(f"{i}-1=", str(1000 + i)) for i in range(4)] + [row("1+" * 30 + "1=", "31")]  # the last: too long
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return types.SimpleNamespace(dir=str(d), base=base, tok=tok, train=train,
                                 train_path=os.path.join(d, "train.jsonl"), test_path=os.path.join(d, "test.jsonl"))


def drawn_gts(world, seed, positions):
    """Ground truths of the prompts that the run's prompt stream draws at these positions."""
    stream = pm.PromptStream(len(world.train), seed)
    order = [stream.next() for _ in range(max(positions) + 1)]
    return {world.train[order[i]]["reward_model"]["ground_truth"] for i in positions}


def scripted_verify(pass_gts):
    """A verify_batch whose groups pass the filter iff their ground truth is in `pass_gts`: the
    first of the K samples scores 1, the others 0 (accuracy 1/K); every other group scores 0."""
    def verify(rows, texts, K, workers=4, mode="bwrap"):
        s = [float(k == 0 and r["reward_model"]["ground_truth"] in pass_gts) for r in rows for k in range(K)]
        return torch.tensor(s), {}
    return verify


def argv(world, name, *extra):
    return ["--model", world.base, "--data", world.train_path, "--test-data", world.test_path,
            "--out-dir", os.path.join(world.dir, "runs"), "--run-name", name, "--P", "2", "--K", "2",
            "--max-new-tokens", "8", "--micro-batch", "4", "--lora-r", "4", "--prm-lora-r", "4", "--lr-prm", "1e-2",
            "--max-prompt-len", "40", "--eval-n", "0", "--eval-samples", "1", "--reward-pages", "0",
            "--no-tensorboard", "--no-show-progress", "--save-every", "0", "--verify-workers", "1", *extra]


def metrics(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in m.items() if not k.startswith("t_")} for m in rows]  # timings differ


def adapter(run_dir, name):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "adapters", name, "adapter_model.safetensors"))


def count_optimizer_steps(monkeypatch):
    """Record the learning rate of every AdamW step (the PRM's and the policy's rates differ)."""
    lrs, step = [], torch.optim.AdamW.step

    def counted(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return lrs


# ---------------------------------------------------------------------------------------------
# Mini-batches of whole groups, never empty
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_groups, K, n, sizes", [
    (1, 2, 4, [1]),  # one kept group, 4 mini-batches asked for: one mini-batch (was: range() step 0)
    (3, 2, 4, [1, 1, 1]),
    (5, 2, 4, [2, 1, 1, 1]),  # does not divide: still 4 optimizer steps, not 5
    (8, 4, 4, [2, 2, 2, 2]),
    (7, 3, 2, [4, 3]),
])
def test_minibatches_are_whole_groups_as_even_as_possible_and_never_empty(n_groups, K, n, sizes):
    bounds = pm.minibatches(n_groups, K, n)
    assert [(b - a) // K for a, b in bounds] == sizes, bounds
    assert all((b - a) % K == 0 for a, b in bounds), "whole groups"
    starts = [0] + [b for _, b in bounds[:-1]]
    assert [a for a, _ in bounds] == starts and bounds[-1][1] == n_groups * K, "contiguous, every row once"


def random_batch(world, cfg, n_groups, seed=0, T=9):
    """A rollout batch of `n_groups` groups with rows of different lengths and mixed outcomes."""
    g = torch.Generator().manual_seed(seed)
    B = n_groups * cfg.K
    texts = [tasks.prompt_text(world.tok, world.train[i]["prompt"]) for i in range(n_groups) for _ in range(cfg.K)]
    ids, am = sampling.encode_prompts(world.tok, texts, "cpu")
    resp = torch.randint(4, len(world.tok), (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T).expand(B, T) < lengths[:, None]).float()  # (B, T)
    r_o = torch.tensor([float(i % cfg.K == 0) for i in range(B)])  # one right answer per group
    return sampling.Rollout(ids, am, resp, mask, r_o, world.train[:n_groups])


def adapted_model(world, cfg, seed=1):
    """The micro base with both adapters set to small random values (so π_θ, π_φ, π_ref differ)."""
    base, _ = models.load_base(world.base, "cpu", cfg)
    model = models.add_adapters(base, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    return model


def recorded_grads(monkeypatch, opt):
    """Clones of the gradients at each `opt.step()` (after clipping; tests switch clipping off)."""
    grads, step = [], opt.step

    def record(*a, **kw):
        grads.append([p.grad.clone() for p in opt.param_groups[0]["params"]])
        return step(*a, **kw)
    monkeypatch.setattr(opt, "step", record)
    return grads


def hand_grads(world, cfg, adapter, loss_of_logp, batch, rows):
    """Gradients of `loss_of_logp(log-probs of batch rows, rows)` for a fresh copy of the test model
    (the same random adapters), computed in one piece: what the first optimizer step must see."""
    model = adapted_model(world, cfg)
    model.set_adapter(adapter)
    logp = sampling.token_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows], batch.resp[rows], batch.mask[rows])
    loss_of_logp(logp, rows).backward()
    return [p.grad for p in models.adapter_params(model, adapter)]


def assert_grads_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_groups, minibatches, first_rows", [(1, 4, 2), (3, 2, 4)])
def test_prm_step_on_a_partial_batch_makes_one_step_per_minibatch_and_weights_micro_batches_by_share(
        world, monkeypatch, n_groups, minibatches, first_rows):
    """1 kept group with 4 PRM mini-batches once crashed; 3 groups in 2 mini-batches (2 + 1 groups)
    with micro-batches of 1 row must give each mini-batch's mean gradient, as one piece does."""
    runs = []
    for micro in (1, 64):
        cfg = micro_cfg(prm_minibatches=minibatches, micro_batch=micro, prm_grad_clip=1e9, prm_update="single")
        model = adapted_model(world, cfg)
        batch = random_batch(world, cfg, n_groups)
        with model.disable_adapter():
            logp_ref = sampling.logprobs_nograd(model, batch, 4)
        opt = torch.optim.AdamW(models.adapter_params(model, "prm"), lr=1e-2)
        grads = recorded_grads(monkeypatch, opt)
        q, st = pm.prm_step(model, batch, logp_ref, cfg, opt)
        runs.append((q, st, grads))
    assert len(runs[0][2]) == min(n_groups, minibatches), "one optimizer step per non-empty mini-batch"
    for g1, g2 in zip(runs[0][2], runs[1][2]):
        assert_grads_close(g1, g2)
    # The first mini-batch (rows in order) by hand: the mean cross-entropy over its rows.
    rows = torch.arange(first_rows)
    assert_grads_close(runs[0][2][0], hand_grads(world, cfg, "prm", lambda logp, r: prm.ce_loss(
        prm.implicit_rewards(logp, logp_ref[r], batch.mask[r]), batch.r_o[r], batch.mask[r], cfg.beta), batch, rows))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    assert runs[0][1]["prm_loss"] == pytest.approx(runs[1][1]["prm_loss"], rel=1e-5)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
def test_policy_step_micro_batches_add_up_to_each_minibatch_loss_in_one_piece(world, monkeypatch, loss_agg):
    """3 groups in 2 policy mini-batches (2 + 1 groups): micro-batches of 1 row, each weighted by its
    share of its own mini-batch (rows, or valid tokens with token-mean), give the gradient of the
    mini-batch's loss computed in one piece; and at most 2 optimizer steps are made. The first
    step's gradient is that of the loss of 2 of the 3 groups (which 2 the shuffle decides) by hand."""
    runs = []
    for micro in (1, 64):
        cfg = micro_cfg(policy_minibatches=2, micro_batch=micro, policy_grad_clip=1e9, loss_agg=loss_agg)
        model = adapted_model(world, cfg)
        batch = random_batch(world, cfg, 3)
        model.set_adapter("policy")
        logp_old = sampling.logprobs_nograd(model, batch, 4)
        A = torch.randn(batch.B, batch.resp.shape[1], generator=torch.Generator().manual_seed(3)) * batch.mask
        opt = torch.optim.AdamW(models.adapter_params(model, "policy"), lr=1e-2)
        grads = recorded_grads(monkeypatch, opt)
        st = pm.policy_step(model, batch, logp_old, A, cfg, opt, torch.Generator().manual_seed(0))
        runs.append((st, grads))
    assert len(runs[0][1]) == len(runs[1][1]) == 2
    for g1, g2 in zip(runs[0][1], runs[1][1]):
        assert_grads_close(g1, g2)

    def loss(logp, r):  # ρ = 1 before the first step: ℓ_t = −A_t ρ_t
        per_token = -A[r] * torch.exp(logp - logp.detach()) * batch.mask[r]
        if loss_agg == "token-mean":
            return per_token.sum() / batch.mask[r].sum()
        return (per_token.sum(1) / batch.mask[r].sum(1)).mean()
    candidates = [torch.tensor([2 * a, 2 * a + 1, 2 * b, 2 * b + 1]) for a, b in ((0, 1), (0, 2), (1, 2))]
    matches = []
    for rows in candidates:
        want = hand_grads(world, cfg, "policy", loss, batch, rows)
        matches.append(all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(runs[0][1][0], want)))
    assert sum(matches) == 1, "the first step's gradient is the mean loss of its own mini-batch"
    assert runs[0][0]["pg_loss"] == pytest.approx(runs[1][0]["pg_loss"], rel=1e-5, abs=1e-7)


def test_token_mean_gives_the_gradient_of_the_batch_token_mean_and_differs_from_seq_mean(world, monkeypatch):
    grads = {}
    for loss_agg in ("seq-mean-token-mean", "token-mean"):
        cfg = micro_cfg(micro_batch=1, policy_grad_clip=1e9, loss_agg=loss_agg)
        model = adapted_model(world, cfg)
        batch = random_batch(world, cfg, 2)
        model.set_adapter("policy")
        A = torch.randn(batch.B, batch.resp.shape[1], generator=torch.Generator().manual_seed(3)) * batch.mask
        opt = torch.optim.AdamW(models.adapter_params(model, "policy"), lr=1e-2)
        grads[loss_agg] = recorded_grads(monkeypatch, opt)
        pm.policy_step(model, batch, None, A, cfg, opt, torch.Generator().manual_seed(0))
    # By hand: Σ_tokens ℓ_t / Σ_tokens 1 over the whole batch, one piece (ρ = 1 at the first step).
    model = adapted_model(world, cfg)
    model.set_adapter("policy")
    logp = sampling.token_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.resp, batch.mask)
    ratio = torch.exp(logp - logp.detach())
    loss = (-A * ratio * batch.mask).sum() / batch.mask.sum()
    loss.backward()
    want = [p.grad for p in models.adapter_params(model, "policy")]
    for a, b in zip(grads["token-mean"][0], want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(grads["seq-mean-token-mean"][0], want)), \
        "rows of different lengths: the per-row mean weights tokens differently"


# ---------------------------------------------------------------------------------------------
# Single- and double-forward rewards; a PRM that never updates
# ---------------------------------------------------------------------------------------------
def test_single_forward_returns_the_prm_scores_before_its_update_and_double_after(world):
    results = {}
    for mode in ("single", "double", "none"):
        cfg = micro_cfg(prm_update=mode, prm_minibatches=2, micro_batch=2)
        model = adapted_model(world, cfg)
        batch = random_batch(world, cfg, 2)
        model.set_adapter("prm")
        with model.disable_adapter():
            logp_ref = sampling.logprobs_nograd(model, batch, 4)
        q_before = prm.implicit_rewards(sampling.logprobs_nograd(model, batch, 4), logp_ref, batch.mask)
        q, st = pm.prm_step(model, batch, logp_ref, cfg, torch.optim.AdamW(models.adapter_params(model, "prm"), lr=1e-1))
        model.set_adapter("prm")
        q_after = prm.implicit_rewards(sampling.logprobs_nograd(model, batch, 4), logp_ref, batch.mask)
        results[mode] = (q, q_before, q_after, st)
    q, q_before, q_after, st = results["single"]
    # Mini-batch 1 (rows 0-1) is scored by the PRM before any update; mini-batch 2 by the PRM
    # after mini-batch 1's update ([O]'s single forward), so not by the PRM of before.
    torch.testing.assert_close(q[:2], q_before[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(q[2:], q_before[2:], atol=1e-4) and not torch.allclose(q, q_after, atol=1e-4)
    assert st["prm_acc_fresh"] == prm.pairwise_accuracy(q, batch.r_o, batch.mask, 2)
    q, q_before, q_after, st = results["double"]
    torch.testing.assert_close(q, q_after, rtol=0, atol=1e-6)
    assert not torch.allclose(q, q_before, atol=1e-4), "the update moved the PRM"
    q, q_before, q_after, st = results["none"]
    assert torch.equal(q_before, q_after) and "prm_acc_after" not in st, "none: the PRM never moves"
    torch.testing.assert_close(q, q_before, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Advantages: --prime-norm and --process-coef, checked on the size of the process return
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prime_norm", ["batch_norm", "none"])
@pytest.mark.parametrize("coef", [0.5, 1.0])
def test_process_return_is_coef_times_normalised_q_through_the_leave_one_out(prime_norm, coef):
    K, T = 2, 4
    q = torch.tensor([[0.5, -1.0, 2.0, 9.0], [1.0, 1.0, 0.0, 0.0], [-2.0, 0.5, 0.5, 0.5], [3.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    batch = sampling.Rollout(None, None, torch.zeros(4, T, dtype=torch.long), mask, torch.tensor([1.0, 0, 0, 1]), [])
    cfg = micro_cfg(K=K, prime_norm=prime_norm, process_coef=coef, beta=0.05)
    A, st = pm.advantages(q, batch, cfg, use_process=True)
    # By hand (plain loops): the scale, then G_i = Σ_t s̃_t^i with s̃ = (K p_t − Σ_j m_j)/(K − 1).
    rows = [[q[i, t].item() for t in range(T) if mask[i, t]] for i in range(4)]
    if prime_norm == "batch_norm":
        scale = max(abs(sum(r[t:])) for r in rows for t in range(len(r))) + 1e-6
    else:
        scale = 1 / 0.05  # the policy sees β·q
    p = [[coef * x / scale for x in r] for r in rows]
    m = [sum(r) / len(r) for r in p]
    G = [sum((K * x - (m[2 * (i // 2)] + m[2 * (i // 2) + 1])) / (K - 1) for x in p[i]) for i in range(4)]
    assert st["ret_process"] == pytest.approx(sum(abs(g) for g in G) / 4, rel=1e-5)
    A0, _ = pm.advantages(q, batch, cfg, use_process=False)
    assert not torch.allclose(A, A0, atol=1e-4), "process rewards change the advantage"


# ---------------------------------------------------------------------------------------------
# Whole runs (run() in-process): filter on, partial batches, resume with a buffer, options
# ---------------------------------------------------------------------------------------------
def test_filter_on_partial_batches_and_resume_with_a_prompt_buffer_equal_a_straight_run(world, monkeypatch, capsys):
    """P=4, K=2, 4 PRM and 2 policy mini-batches, 2 rollout rounds a step, outcomes scripted by
    the order the prompt stream draws prompts in (positions 0-3 in round 1 of step 1, ...):
      step 1: round 1 keeps 1 of 4, round 2 none of 4: one group (B = 2 < 4 mini-batches)
      step 2: round 1 keeps 2 of 4, round 2 (4 prompts) 3 of 4: 4 kept, 1 surplus to the buffer
      step 3: the buffered prompt and 2 of 3 new ones, then 1 of 2: 4 kept, buffer empty
      step 4: 2 of 4, then 1 of 4: 3 kept (3 groups in 2 policy mini-batches: 2 + 1)
    A run of 2 steps resumed to 4 (its checkpoint holds the buffer) equals 4 steps straight."""
    monkeypatch.setattr(pm, "verify_batch", scripted_verify(drawn_gts(world, 0, [0, 8, 9, 12, 13, 14, 16, 18, 20,
                                                                                  22, 24, 26])))
    lrs = count_optimizer_steps(monkeypatch)
    flags = ["--P", "4", "--prm-minibatches", "4", "--policy-minibatches", "2", "--max-rollout-rounds", "2",
             "--filter-low", "0.2", "--filter-high", "0.8", "--prm-warmup", "0", "--lr-policy", "1e-3"]
    summary, straight = pm.run(config.parse_config(argv(world, "straight", "--steps", "4", *flags)))
    out = capsys.readouterr().out
    m = metrics(straight)
    assert [x["kept"] for x in m] == [1, 4, 4, 3] and [x["generated"] for x in m] == [16, 16, 12, 16]
    assert lrs.count(1e-2) == 1 + 4 + 4 + 3, "PRM: one step per mini-batch, at most one per group"
    assert lrs.count(1e-3) == 1 + 2 + 2 + 2, "policy: min(2, kept groups) steps"
    assert all(x["prm_loss"] == x["prm_loss"] and x["pg_loss"] == x["pg_loss"] for x in m), "finite"
    # Held-out prompts longer than --max-prompt-len are dropped too (1 of 5), and counted.
    assert f"{world.test_path}: dropped 1 of 5 prompts longer than --max-prompt-len 40" in out
    assert summary["eval_prompts"] == 4

    part_argv = argv(world, "part", "--steps", "2", "--save-every", "1", *flags)
    _, part = pm.run(config.parse_config(part_argv))
    assert sorted(d for d in os.listdir(part) if d.startswith("checkpoint")) == ["checkpoint-000002"], \
        "only the newest checkpoint is kept"
    state = torch.load(os.path.join(part, "checkpoint-000002", "state.pt"), weights_only=True)  # tensors and lists only
    assert [world.train[i]["reward_model"]["ground_truth"] for i in state["buffer"]] == \
        list(drawn_gts(world, 0, [14])), "the surplus prompt of step 2 is in the checkpoint"
    # What `kill -9` during step 3 can leave: a half-written checkpoint and a half-written line.
    os.makedirs(os.path.join(part, "checkpoint-000003.tmp", "adapters"))
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "acc": 0.2')
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable line"):
        pm.run(config.parse_config(["--resume", part, "--steps", "4", "--no-show-progress"]))
    assert "resuming from" in capsys.readouterr().out
    assert metrics(part) == m, "the resumed run takes exactly the steps the straight run took"
    for name in ("policy", "prm"):
        a, b = adapter(straight, name), adapter(part, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} adapter differs"
    assert not os.path.exists(os.path.join(part, "checkpoint-000003.tmp")), "the stale partial checkpoint is gone"


def test_open_metrics_keeps_the_readable_lines_around_a_damaged_one(tmp_path):
    lines = ['{"step": 1}', '{"step": 2, "acc": 0.', '{"step": 2}', '{"step": 3}', '{"step": 4, "a']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match="skipped 2 unreadable line"):
        checkpoints.open_metrics(str(tmp_path), 3).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def every_step_passes(world, seed=0, n=40):
    """With P=2 and 2 rounds a step, every even draw passes: each round keeps one group."""
    return scripted_verify(drawn_gts(world, seed, list(range(0, n, 2))))


def test_a_cut_summary_is_written_again_on_resume_and_a_failed_save_leaves_the_adapters_whole(world, monkeypatch):
    """A kill while summary.json or adapters/ is written: the run resumes from its last checkpoint
    (at the last step: only the evaluation after RL is done again), and a save that fails half-way
    leaves the adapters that were there whole."""
    from peft import PeftModel
    monkeypatch.setattr(pm, "verify_batch", every_step_passes(world))
    summary, run_dir = pm.run(config.parse_config(argv(world, "cut", "--steps", "2")))
    before = adapter(run_dir, "policy")
    path = os.path.join(run_dir, "summary.json")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    save = PeftModel.save_pretrained

    def fails_half_way(self, folder, **kw):
        os.makedirs(os.path.join(folder, "policy"), exist_ok=True)
        open(os.path.join(folder, "policy", "adapter_model.safetensors"), "wb").write(b"half")
        raise OSError("No space left on device")
    monkeypatch.setattr(PeftModel, "save_pretrained", fails_half_way)
    resume = ["--resume", run_dir, "--no-show-progress"]
    with pytest.raises(OSError, match="No space left"):
        pm.run(config.parse_config(resume))
    after = adapter(run_dir, "policy")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), "adapters/ whole"
    monkeypatch.setattr(PeftModel, "save_pretrained", save)
    again, _ = pm.run(config.parse_config(resume))
    assert json.load(open(path))["acc_after"] == again["acc_after"], "summary.json is whole again"
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == {k: v for k, v in summary.items() if k != "wall_time_s"}
    assert not os.path.exists(os.path.join(run_dir, "adapters.tmp"))


def test_prm_warmup_keeps_the_process_return_exactly_zero_for_its_steps(world, monkeypatch):
    monkeypatch.setattr(pm, "verify_batch", every_step_passes(world))
    _, run_dir = pm.run(config.parse_config(argv(world, "warmup", "--steps", "4", "--prm-warmup", "3")))
    m = metrics(run_dir)
    assert [x["process_on"] for x in m] == [False, False, False, True]
    assert [x["ret_process"] for x in m[:3]] == [0.0, 0.0, 0.0] and m[3]["ret_process"] > 0
    # The PRM trains during its warm-up: an untrained (zero) PRM would score log 2 exactly.
    assert all(abs(x["prm_loss"] - math.log(2)) > 1e-5 for x in m[1:3])


def test_prm_gate_follows_the_ema_of_fresh_ranking_accuracy(world, monkeypatch):
    """Fresh accuracies scripted as 0, 1, 1, 0: the EMA (from 0.5, not updated at step 1) is 0.5,
    0.55, 0.595, 0.5355, so a gate of 0.54 lets process rewards in at steps 2 and 3 only."""
    monkeypatch.setattr(pm, "verify_batch", every_step_passes(world))
    fresh, orig = iter([0.0, 1.0, 1.0, 0.0]), pm.prm_step

    def scripted_prm_step(*a, **kw):
        q, st = orig(*a, **kw)
        return q, {**st, "prm_acc_fresh": next(fresh)}
    monkeypatch.setattr(pm, "prm_step", scripted_prm_step)
    _, run_dir = pm.run(config.parse_config(argv(world, "gate", "--steps", "4", "--prm-warmup", "0", "--prm-gate", "0.54")))
    m = metrics(run_dir)
    assert [x["prm_acc_ema"] for x in m] == pytest.approx([0.5, 0.55, 0.595, 0.5355])
    assert [x["process_on"] for x in m] == [False, True, True, False]
    assert [x["ret_process"] > 0 for x in m] == [False, True, True, False]


@pytest.mark.parametrize("ref_type", ["policy", "freeze"])
def test_reference_log_probs_are_the_rollout_policys_or_the_frozen_bases(world, monkeypatch, ref_type):
    monkeypatch.setattr(pm, "verify_batch", every_step_passes(world))
    seen, orig = [], pm.prm_step

    def spy(model, batch, logp_ref, cfg, opt_prm, labelled=None):
        model.set_adapter("policy")
        policy = sampling.logprobs_nograd(model, batch, cfg.micro_batch)
        with model.disable_adapter():
            base = sampling.logprobs_nograd(model, batch, cfg.micro_batch)
        seen.append((logp_ref.clone(), policy, base))
        return orig(model, batch, logp_ref, cfg, opt_prm, labelled)
    monkeypatch.setattr(pm, "prm_step", spy)
    pm.run(config.parse_config(argv(world, f"ref-{ref_type}", "--steps", "2", "--ref-type", ref_type)))
    assert len(seen) == 2
    for ref, policy, base in seen:
        torch.testing.assert_close(ref, policy if ref_type == "policy" else base, rtol=0, atol=1e-6)
    ref, policy, base = seen[1]
    assert not torch.allclose(policy, base, atol=1e-6), "after one update the policy is not the base"


def test_faithful_policy_minibatches_use_the_rollout_policys_log_probs_as_old(world, monkeypatch):
    """--faithful: 4 policy mini-batches. π_old is the policy at rollout (before any of this step's
    updates): ρ = 1 in the first mini-batch, and later ones see the policy the first moved."""
    monkeypatch.setattr(pm, "verify_batch", every_step_passes(world))
    seen, orig = [], pm.policy_step

    def spy(model, batch, logp_old, A, cfg, opt_policy, gen):
        model.set_adapter("policy")
        seen.append((logp_old.clone(), sampling.logprobs_nograd(model, batch, cfg.micro_batch)))
        st = orig(model, batch, logp_old, A, cfg, opt_policy, gen)
        seen[-1] += (st,)
        return st
    monkeypatch.setattr(pm, "policy_step", spy)
    lrs = count_optimizer_steps(monkeypatch)
    cfg = config.parse_config(argv(world, "faithful", "--steps", "2", "--faithful", "--P", "3", "--lr-policy", "5e-3"))
    assert cfg.policy_minibatches == 4 and cfg.prm_update == "single"
    pm.run(cfg)
    assert lrs.count(5e-3) == 3 + 3, "3 kept groups: min(4, 3) = 3 policy steps a step"
    for logp_old, before, st in seen:
        torch.testing.assert_close(logp_old, before, rtol=0, atol=1e-6)
        assert st["approx_kl"] > 0, "mini-batches after the first see an updated policy (ρ ≠ 1)"


def test_prm_init_loads_a_trained_prm_that_prm_update_none_keeps_frozen(world, monkeypatch, tmp_path):
    """The paper's offline-PRM ablation: π_φ from a finished run's adapter, never updated, and its
    process rewards (unlike the zero PRM's) reach the advantage."""
    monkeypatch.setattr(pm, "verify_batch", every_step_passes(world))
    cfg = micro_cfg()
    trained = adapted_model(world, cfg, seed=4)  # stands in for a finished run's adapters
    trained.save_pretrained(str(tmp_path / "adapters"))
    prm_dir = str(tmp_path / "adapters" / "prm")
    with pytest.warns(RuntimeWarning, match="every process reward is exactly 0"):
        config.parse_config(argv(world, "zero", "--prm-update", "none"))
    lrs = count_optimizer_steps(monkeypatch)
    _, run_dir = pm.run(config.parse_config(argv(world, "offline", "--steps", "2", "--prm-init", prm_dir,
                                             "--prm-update", "none", "--prm-warmup", "0", "--lr-policy", "1e-3")))
    saved, after = adapter(str(tmp_path), "prm"), adapter(run_dir, "prm")
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved), "frozen"
    assert lrs == [1e-3, 1e-3], "only the policy made optimizer steps"
    assert all(x["ret_process"] > 0 for x in metrics(run_dir)), "a trained PRM gives process rewards"


def test_prm_init_refuses_an_adapter_that_does_not_fit(world, tmp_path):
    cfg = micro_cfg()
    adapted_model(world, cfg).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(models.ConfigError, match="the adapter has r = 4, this run's PRM 8"):
        config.parse_config(argv(world, "x", "--prm-init", str(tmp_path / "a" / "prm"), "--prm-lora-r", "8"))
    # A file with one tensor less (a partial match that peft alone would load without a word).
    from safetensors.torch import load_file, save_file
    path = tmp_path / "a" / "prm" / "adapter_model.safetensors"
    weights = load_file(str(path))
    save_file({k: v for k, v in list(weights.items())[1:]}, str(path))
    model = adapted_model(world, cfg)
    with pytest.raises(models.ConfigError, match="1 of its tensors are not in the file"):
        checkpoints.load_adapter(model, str(tmp_path / "a" / "prm"), "prm")


# ---------------------------------------------------------------------------------------------
# End tokens: every EOS of the generation config; pad == EOS
# ---------------------------------------------------------------------------------------------
def test_generation_and_mask_stop_at_every_end_token_of_the_generation_config(world):
    cfg = micro_cfg()
    model = adapted_model(world, cfg)
    tok = world.tok
    texts = [tasks.prompt_text(tok, r["prompt"]) for r in world.train[:6]]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    torch.manual_seed(0)
    resp, mask = sampling.generate(model, tok, ids, am, 10, 1.0)
    assert mask.sum(1).min() >= 3, "no row ends early by chance here"
    j = next(t for t in range(1, 10) if resp[0, t] not in resp[0, :t])
    second = resp[0, j].item()  # a token row 0 samples only at position j: declare it an end token too
    model.generation_config.eos_token_id = [tok.eos_token_id, second]
    assert sampling.end_tokens(model, tok) == sorted({tok.eos_token_id, second})
    torch.manual_seed(0)
    resp2, mask2 = sampling.generate(model, tok, ids, am, 10, 1.0)
    for i in range(len(texts)):
        ends = [t for t in range(resp2.shape[1]) if resp2[i, t].item() in (tok.eos_token_id, second)]
        n = ends[0] + 1 if ends else resp2.shape[1]
        assert mask2[i].tolist() == [1.0] * n + [0.0] * (resp2.shape[1] - n), f"row {i}: valid up to its first end"
        assert torch.equal(resp2[i, :n], resp[i, :n]), "same seed: the same tokens up to there"
        assert torch.all(resp2[i, n:] == tok.pad_token_id), f"row {i}: generation stopped there (padding after)"
    assert mask2[0].sum() == j + 1, "row 0 stops at the declared token, which the mask keeps"


def test_pad_equal_to_eos_masks_and_decodes_up_to_the_first_eos(world):
    """SmolLM2 and Qwen pad with their EOS: everything after the first one is padding."""
    tok = models.build_char_tokenizer()
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    resp = torch.tensor([[5, 6, eos, eos, eos], [7, eos, eos, eos, eos], [5, 6, 7, 8, 9]])
    mask = sampling.response_mask(resp, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert sampling.decode_responses(tok, resp, mask) == [tok.decode([5, 6]), tok.decode([7]), tok.decode([5, 6, 7, 8, 9])]
    cfg = micro_cfg()
    model = adapted_model(world, cfg)
    texts = [tasks.prompt_text(tok, r["prompt"]) for r in world.train[:8]]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    torch.manual_seed(0)
    resp, mask = sampling.generate(model, tok, ids, am, 12, 1.0)
    for i in range(resp.shape[0]):
        ends = (resp[i] == eos).nonzero().flatten().tolist()
        n = ends[0] + 1 if ends else resp.shape[1]
        assert mask[i].sum().item() == n and torch.all(resp[i, n:] == eos)


def test_one_step_produces_the_shapes_the_readme_names(world, monkeypatch):
    """README "Read the code" walks through one RL step naming each tensor with its shape: run
    the step's functions as run() does and check every `name` (shape) pair of that table."""
    import re
    cfg = micro_cfg(P=3, K=2, policy_minibatches=2, prm_minibatches=2, max_new_tokens=8)
    monkeypatch.setattr(pm, "verify_batch", scripted_verify({r["reward_model"]["ground_truth"] for r in world.train}))
    model = adapted_model(world, cfg)
    model.set_adapter("policy")
    stream = pm.PromptStream(len(world.train), cfg.seed)
    batch, _ = pm.collect(model, world.tok, cfg, world.train, stream, [], "cpu")
    logp_old = pm.shared_logprobs(model, batch, cfg)
    with model.disable_adapter():
        logp_ref = pm.shared_logprobs(model, batch, cfg)
    opt = torch.optim.AdamW(models.adapter_params(model, "prm"), lr=1e-3)
    q, _ = pm.prm_step(model, batch, logp_ref, cfg, opt)
    A, _ = pm.advantages(q, batch, cfg, use_process=True)
    stats = pm.policy_step(model, batch, logp_old, A, cfg, torch.optim.AdamW(models.adapter_params(model, "policy")),
                           torch.Generator().manual_seed(0))
    assert math.isfinite(stats["pg_loss"]), "the step ran through"
    got = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "resp": batch.resp, "mask": batch.mask,
           "r_o": batch.r_o, "logp_old": logp_old, "logp_ref": logp_ref, "q": q, "A": A}
    size = {"B": cfg.P * cfg.K, "T": batch.resp.shape[1], "Tp": batch.prompt_ids.shape[1]}
    assert batch.resp.shape[1] <= cfg.max_new_tokens and size["Tp"] > 1
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    table = readme.split("**One RL step, block by block**")[1].split("\n\n")[1]
    named = re.findall(r"`(\w+)` \(([\w, ]*)\)", table)
    assert {n for n, _ in named} == set(got), f"the table names {sorted({n for n, _ in named})}, the test checks {sorted(got)}"
    for name, shape in named:
        want = tuple(size[d.strip()] for d in shape.split(",") if d.strip())
        assert tuple(got[name].shape) == want, f"README: `{name}` ({shape}), the code gives {tuple(got[name].shape)}"


# --- process ground truth: the PRM scored against the step labels, and the oracle arm ---------
def arith_rows(prompts):
    return [{"data_source": "arith_chain", "prompt": [{"role": "user", "content": p}], "ability": "math",
             "reward_model": {"ground_truth": str(eval(p[:-1]))}} for p in prompts]


def labelled_batch(world, cfg, texts_per_group):
    """A Rollout of hand-written responses to arithmetic prompts (character tokenizer), and its labels."""
    rows = arith_rows([p for p, _ in texts_per_group])
    texts = [t for _, ts in texts_per_group for t in ts]
    prompts = [tasks.prompt_text(world.tok, r["prompt"]) for r in rows for _ in range(cfg.K)]
    ids, am = sampling.encode_prompts(world.tok, prompts, "cpu")
    seqs = [world.tok(t, add_special_tokens=False)["input_ids"] + [world.tok.eos_token_id] for t in texts]
    T = max(map(len, seqs))
    resp = torch.tensor([s + [world.tok.pad_token_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1.0] * len(s) + [0.0] * (T - len(s)) for s in seqs])
    r_o = torch.tensor([float(t.endswith("{%s}" % rows[i // cfg.K]["reward_model"]["ground_truth"]))
                        for i, t in enumerate(texts)])  # (B,) the boxed answer is the total
    batch = sampling.Rollout(ids, am, resp, mask, r_o, rows, texts)
    return batch, tasks.label_batch(rows, resp, mask, world.tok, cfg.K)


GROUPS = [("47+8-3=", ["47+8=55;55-3=52;\\boxed{52}", "47+8=55;55-3=51;\\boxed{51}"]),
          ("20-4+9=", ["20-4=16;16+9=25;\\boxed{25}", "20-4=15;15+9=24;\\boxed{24}"])]


def test_step_metrics_score_the_prms_rewards_before_its_update(world):
    """prm_step with the batch's labels logs step_truth of β·q from the PRM *before* it trains on
    the batch (one mini-batch: every row fresh), while double-forward returns the updated q."""
    import evaluation
    cfg = micro_cfg(K=2, prm_minibatches=1, prm_update="double", lr_prm=5e-2)
    model = adapted_model(world, cfg)
    batch, labelled = labelled_batch(world, cfg, GROUPS)
    assert [x[0].first_wrong for x in labelled] == [None, 1, None, 0], "hand labels of the four responses"
    with model.disable_adapter():
        logp_ref = sampling.logprobs_nograd(model, batch, 4)
    model.set_adapter("prm")
    q_before = prm.implicit_rewards(sampling.logprobs_nograd(model, batch, 4), logp_ref, batch.mask)  # (B, T)
    want = evaluation.step_truth(labelled, cfg.beta * q_before)
    opt = torch.optim.AdamW(models.adapter_params(model, "prm"), lr=cfg.lr_prm)
    q, st = pm.prm_step(model, batch, logp_ref, cfg, opt, labelled)
    assert not torch.allclose(q, q_before), "double-forward returns the updated PRM's rewards"
    assert want and {k: st[k] for k in want} == want
    assert st["step_n_err"] == 2 and st["step_n_ok"] == 2


def test_oracle_rewards_are_minus_one_on_the_first_wrong_steps_tokens(world):
    cfg = micro_cfg(K=2)
    batch, labelled = labelled_batch(world, cfg, GROUPS)
    q = tasks.oracle_process_rewards(labelled, batch.resp.shape[1], "first")
    blamed = ["".join(world.tok.decode([t]) for t, v in zip(batch.resp[i].tolist(), q[i].tolist()) if v == -1.0)
              for i in range(batch.B)]
    assert blamed == ["", "55-3=51;", "", "20-4=15;"]
    assert (q * (1 - batch.mask)).abs().sum() == 0, "nothing beyond the valid tokens"


def test_oracle_run_uses_the_labels_from_step_one_and_never_builds_prm_rewards(world, monkeypatch, tmp_path):
    rows = arith_rows([f"{i}+1=" for i in range(40)])
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(pm, "verify_batch", scripted_verify({r["reward_model"]["ground_truth"] for r in rows}))
    spy, seen, orig = [], [], pm.advantages
    monkeypatch.setattr(pm, "prm_step", lambda *a, **kw: spy.append(1))

    def advantages(q, batch, cfg, use_process):
        seen.append((q, tasks.oracle_process_rewards(tasks.label_batch(batch.rows, batch.resp, batch.mask, world.tok,
                                                                         cfg.K), batch.resp.shape[1]), use_process))
        return orig(q, batch, cfg, use_process)
    monkeypatch.setattr(pm, "advantages", advantages)
    args = argv(world, "oracle", "--steps", "2", "--reward-mode", "oracle") + ["--data", str(path)]
    _, run_dir = pm.run(config.parse_config(args))
    m = metrics(run_dir)
    assert not spy and all("prm_loss" not in x for x in m), "no PRM in the oracle arm"
    assert [x["process_on"] for x in m] == [True, True], "the labels need no warm-up"
    for q, want, on in seen:  # the micro model's responses are wrong: each gets a -1 somewhere
        assert on and torch.equal(q, want) and (q == -1).any(dim=1).all()


def test_oracle_refuses_data_without_step_labels_before_building_a_model(world):
    cfg = config.parse_config(argv(world, "oracle-bad", "--reward-mode", "oracle"))
    with pytest.raises(models.ConfigError, match="--reward-mode oracle: .* has other rows"):
        pm.run(cfg)


def test_after_rl_the_step_metrics_and_the_reward_page_share_one_draw_of_samples(world, monkeypatch, tmp_path):
    """The step metrics after RL (first truth_prompts prompts) and the token-reward page (first
    4·reward_pages) sample and score the held-out prompts once, and each equals what a separate
    draw of its own prompts would give when the page's prompts are among the metrics' ones."""
    import evaluation
    import experiments
    rows = arith_rows([f"{i}+{i % 7}-2=" for i in range(12)])
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(pm, "verify_batch", scripted_verify({r["reward_model"]["ground_truth"] for r in rows}))
    calls, real = [], evaluation.prm_scored_samples

    def counted(model, tok, rs, cfg, device):
        calls.append(len(rs))
        return real(model, tok, rs, cfg, device)
    monkeypatch.setattr(evaluation, "prm_scored_samples", counted)
    monkeypatch.setattr(experiments, "prm_scored_samples", counted)
    pages = []
    monkeypatch.setattr(experiments, "reward_page_html", lambda groups, beta, title: pages.append(groups) or "")
    args = argv(world, "shared-draw", "--steps", "1", "--truth-prompts", "8", "--reward-pages", "1") + [
        "--data", str(path), "--test-data", str(path)]
    cfg = config.parse_config(args)
    summary, run_dir = pm.run(cfg)
    assert calls == [8], "one draw after RL, of the truth prompts (8 >= 4 page candidates)"
    model = pm.add_adapters(models.load_base(world.base, "cpu", cfg)[0], cfg)
    checkpoints.load_adapters(model, os.path.join(run_dir, "adapters"))
    alone = evaluation.held_out_step_truth(model, world.tok, rows, cfg, "cpu")  # a draw of its own
    assert alone and {k: summary[k] for k in alone} == pytest.approx(alone)
    batch, _ = real(model, world.tok, rows[:8], cfg, "cpu")
    shown = [r["tokens"] for g in pages[0] for r in g["responses"]]
    drawn = [experiments.token_pieces(world.tok, batch.resp[i, :int(batch.mask[i].sum())].tolist())
             for i in range(4 * cfg.K)]
    assert all(s in drawn for s in shown), "the page shows samples of that same draw"


def test_label_batch_labels_each_response_as_a_plain_loop_decoding_every_token_would(world):
    K = 2
    rows = arith_rows([p for p, _ in GROUPS])
    texts = [t for _, ts in GROUPS for t in ts]
    seqs = [world.tok(t, add_special_tokens=False)["input_ids"] + [world.tok.eos_token_id] for t in texts]
    T = max(map(len, seqs)) + 2
    resp = torch.tensor([s + [world.tok.pad_token_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1.0] * len(s) + [0.0] * (T - len(s)) for s in seqs])
    tasks._PIECES.pop(world.tok, None)  # a tokenizer seen for the first time, then again (remembered pieces)
    for _ in range(2):
        got = tasks.label_batch(rows, resp, mask, world.tok, K)
        for i, (labels, spans, box, n) in enumerate(got):  # the plain loop: every token decoded alone
            tokens = [world.tok.decode([t], skip_special_tokens=True) for t in resp[i, :int(mask[i].sum())].tolist()]
            text = "".join(tokens)
            want = steps.label_steps(rows[i // K]["prompt"][-1]["content"], text)
            assert n == len(tokens) and labels == want, i
            assert spans == steps.token_spans([s.span for s in want.steps], tokens, text), i
            assert box == steps.token_spans([want.box_span], tokens, text)[0], i
    assert got[1][0].first_wrong is not None and got[0][0].first_wrong is None, "the hand-written wrong step is found"
