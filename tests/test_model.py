"""Models, adapters, sampling helpers and the parts of the loop, on a tiny random Qwen2 (CPU)."""

import json
import math
import os
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch

import config
import evaluation
import models
import prime_mini as pm
import prm
import sampling
import sft
import tasks
import verifiers


def tiny_cfg(**kw):
    cfg = config.Config(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_intermediate=64, lora_r=4, prm_lora_r=4,
                    P=2, K=4, micro_batch=4, show_progress=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def tok():
    return models.build_char_tokenizer()


def make_model(tok, cfg, seed=0):
    torch.manual_seed(seed)
    base = models.build_tiny_model(cfg, tok).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    model = models.add_adapters(base, cfg)
    return model


def make_batch(model, tok, cfg, seed=0):
    """A real rollout batch: P prompts x K samples from the model, with made-up outcomes."""
    torch.manual_seed(seed)
    prompts = ["12+3-4=", "7+8="]
    texts = [tasks.prompt_text(tok, [{"role": "user", "content": p}]) for p in prompts for _ in range(cfg.K)]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    model.set_adapter("policy")
    resp, mask = sampling.generate(model, tok, ids, am, 12, 1.0)
    r_o = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1])
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
    return sampling.Rollout(ids, am, resp, mask, r_o, rows)


def test_char_tokenizer_round_trip_keeps_spaces_and_newlines(tok, tmp_path):
    text = "12 + 3 =\n15;\\boxed{15} Tab\tX"
    models.save_tokenizer(tok, str(tmp_path))
    again = models.load_tokenizer(str(tmp_path))
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text), "one token per character"
    assert again.decode(ids) == text
    assert ids == tok(text, add_special_tokens=False)["input_ids"], "same ids after reload"
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_response_mask_ends_at_first_eos_inclusive():
    eos, pad = 2, 0
    resp = torch.tensor([[5, 6, eos, pad, pad], [5, eos, 7, eos, pad], [5, 6, 7, 8, 9], [pad, 6, eos, 8, 9]])
    expect = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(sampling.response_mask(resp, eos), expect), "truncated rows are all valid; a sampled pad stays valid"
    # Several end tokens (a model's generation config can list more than one): the first of any.
    expect2 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(sampling.response_mask(resp, [eos, 7]), expect2)


def test_token_logprobs_match_an_unpadded_forward_per_row(tok):
    cfg = tiny_cfg()
    model = make_model(tok, cfg)
    batch = make_batch(model, tok, cfg)
    lp = sampling.logprobs_nograd(model, batch, 3)  # micro-batch of 3 does not align with rows: still equal
    for i in range(batch.B):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        n = int(batch.mask[i].sum())
        ids = torch.cat([p, batch.resp[i, :n]]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        ref = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(-1, batch.resp[i, :n, None]).squeeze(-1)
        assert torch.allclose(lp[i, :n], ref, atol=1e-5), f"row {i}: padded forward differs from unpadded"
        assert torch.all(lp[i, n:] == 0), "zero off the mask"


def test_prompt_groups_are_runs_of_consecutive_equal_prompts():
    a, b = [1, 2, 3], [0, 4, 5]
    ids = torch.tensor([a, a, b, b, a])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    first, run = sampling.prompt_groups(ids, mask)
    assert first.tolist() == [0, 2, 4] and run.tolist() == [0, 0, 1, 1, 2]
    mask[1, 0] = 0  # the same ids under another mask are another prompt
    assert sampling.prompt_groups(ids, mask)[0].tolist() == [0, 1, 2, 4]


@pytest.mark.parametrize("chunk", [8192, 7])  # the model's own head in one piece; the decoder and 7-token head chunks
def test_shared_prompt_forward_equals_each_row_whole(tok, chunk):
    """K rows of one prompt run the prompt once (its KV cache serves them all): the same log-probs
    and gradients as running every row whole, with left-padded prompts, right-padded responses and
    a micro-batch that cuts a group."""
    cfg = tiny_cfg()
    model = make_model(tok, cfg)
    batch = make_batch(model, tok, cfg)
    torch.manual_seed(3)
    for p in models.adapter_params(model, "policy"):  # nonzero LoRA: gradients reach A and B
        p.data.normal_(0, 0.1)
    assert len(sampling.prompt_groups(batch.prompt_ids, batch.prompt_mask)[0]) == 2 and batch.mask.sum(1).min() < batch.resp.shape[1]
    shared = sampling.predicting_outputs
    whole = lambda net, ids, am, resp, mask, key, per_row=False: shared(net, ids, am, resp, mask, key, True)  # noqa: E731
    results = []
    for share in (True, False):
        with mock.patch.object(sampling, "predicting_outputs", shared if share else whole):
            nograd = sampling.logprobs_nograd(model, batch, 3, chunk)  # 3 cuts the groups of 4
            model.zero_grad(set_to_none=True)
            lp = torch.cat([sampling.token_logprobs(model, *batch.slice(i, j), chunk=chunk) for i, j in ((0, 5), (5, 8))])
            (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
            grads = [p.grad.clone() for p in models.adapter_params(model, "policy")]
        results.append((nograd, lp.detach(), grads))
    (n1, l1, g1), (n2, l2, g2) = results
    torch.testing.assert_close(n1, n2, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    torch.testing.assert_close(n1, l1, rtol=0, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert torch.all(l1[batch.mask == 0] == 0)


@pytest.mark.parametrize("greedy", [True, False])
def test_shared_prefill_generates_what_each_row_whole_generates(tok, greedy):
    """generate() prefills each run of rows with the same prompt once and repeats its KV cache:
    the same tokens as prefilling every row (greedy, and sampled from the same seed), with
    left-padded prompts of three lengths and generation batches of 3 that cut the groups of 4."""
    cfg = tiny_cfg()
    model = make_model(tok, cfg)
    torch.manual_seed(3)
    for p in models.adapter_params(model, "policy"):  # a nonzero policy: the merged sampler is not the base
        p.data.normal_(0, 0.1)
    texts = [tasks.prompt_text(tok, [{"role": "user", "content": c}]) for c in ("12+3-4=", "7+8=", "1+22+333-4=")
             for _ in range(4)]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    assert len(set(am.sum(1).tolist())) == 3, "three prompt lengths: left padding differs between groups"
    cache = sampling.shared_prefill(model, ids, am)
    assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
    with torch.no_grad():  # the shared cache is each row's own prefill, row by row
        pos = (am.cumsum(1) - 1).clamp_min(0)
        own = model(input_ids=ids[:, :-1], attention_mask=am[:, :-1], position_ids=pos[:, :-1], use_cache=True).past_key_values
    for layer, ref in zip(cache.layers, own.layers):
        keep = am[:, :-1].bool()  # (B, Tp-1) positions that are not padding
        torch.testing.assert_close(layer.keys.transpose(1, 2)[keep], ref.keys.transpose(1, 2)[keep], rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.values.transpose(1, 2)[keep], ref.values.transpose(1, 2)[keep], rtol=0, atol=1e-5)
    assert sampling.shared_prefill(model, ids[::4], am[::4]) is None, "no two rows share a prompt: nothing to share"
    outs = []
    for share in (True, False):
        with mock.patch.object(sampling, "shared_prefill", sampling.shared_prefill if share else (lambda *a: None)):
            for batch_size in (0, 3):
                torch.manual_seed(7)
                outs.append(sampling.generate(model, tok, ids, am, 12, 1.0, greedy=greedy, batch_size=batch_size,
                                                decode="hf"))  # (our loop has its own prefill: test_decode.py)
    for (r1, m1), (r2, m2) in zip(outs[:2], outs[2:]):  # shared against whole, at each generation batch size
        assert torch.equal(r1, r2) and torch.equal(m1, m2)
    if greedy:  # (sampled rows in batches of 3 draw their random numbers in another order)
        assert torch.equal(outs[0][0], outs[1][0]), "greedy: the batch size changes nothing"
    else:
        assert len({tuple(r.tolist()) for r in outs[0][0][:4]}) > 1, "sampled: the K rows of a prompt differ"


def test_gradient_forwards_with_dropout_or_checkpointing_run_rows_whole(tok):
    cfg = tiny_cfg(lora_dropout=0.1)
    model = make_model(tok, cfg)
    assert models.set_train_mode(model, True), "LoRA dropout draws a mask per row"
    assert not models.set_train_mode(model, False)
    plain = make_model(tok, tiny_cfg())
    assert not models.set_train_mode(plain, True), "nothing per-row: prompts can be shared under gradient"
    plain.get_base_model().gradient_checkpointing_enable()
    assert models.set_train_mode(plain, True), "checkpointed layers drop the KV cache"
    models.set_train_mode(plain, False)


def test_three_roles_share_one_base_and_start_identical(tok):
    cfg = tiny_cfg()
    model = make_model(tok, cfg)
    batch = make_batch(model, tok, cfg)
    # One copy of the base: the peft model's non-LoRA tensors are the very tensors of the base module.
    base = model.get_base_model()
    base_ptrs = {p.data_ptr() for n, p in base.named_parameters() if "lora_" not in n}
    all_ptrs = {p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    assert base_ptrs == all_ptrs
    n_base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    n_fresh = sum(p.numel() for p in models.build_tiny_model(cfg, tok).parameters())
    assert n_base == n_fresh, "exactly one copy of the base weights"
    model.set_adapter("policy")
    lp_policy = sampling.logprobs_nograd(model, batch, 4)
    model.set_adapter("prm")
    lp_prm = sampling.logprobs_nograd(model, batch, 4)
    with model.disable_adapter():
        lp_ref = sampling.logprobs_nograd(model, batch, 4)
    assert torch.equal(lp_policy, lp_ref) and torch.equal(lp_prm, lp_ref), "zero-initialised LoRA: same model"
    q = prm.implicit_rewards(lp_prm, lp_ref, batch.mask)
    assert torch.count_nonzero(q) == 0, "every process reward is exactly 0 at initialisation"


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_prm_step_changes_only_the_prm_adapter(tok):
    cfg = tiny_cfg(lr_prm=1e-2, prm_minibatches=1, prm_update="single")
    model = make_model(tok, cfg)
    batch = make_batch(model, tok, cfg)
    opt_prm = torch.optim.AdamW(models.adapter_params(model, "prm"), lr=cfg.lr_prm, weight_decay=0.0)
    with model.disable_adapter():
        logp_ref = sampling.logprobs_nograd(model, batch, 4)
    before = snapshot(model)
    q, st = pm.prm_step(model, batch, logp_ref, cfg, opt_prm)
    # The zero PRM scores every response σ(0): the loss is exactly log 2 whatever the labels, and
    # every pair of a group with right and wrong answers is a tie, which counts as wrong.
    assert st["prm_loss"] == pytest.approx(math.log(2)) and st["prm_acc_fresh"] == 0.0
    assert torch.count_nonzero(q) == 0, "single-forward: the rewards of the PRM before its update"
    q, st = pm.prm_step(model, batch, logp_ref, cfg, opt_prm)  # the first step moved only lora_B
    diff = changed(before, model)
    assert diff and all(".prm." in n for n in diff), f"PRM step touched {sorted(diff)[:3]}"
    assert any("lora_A.prm" in n for n in diff) and any("lora_B.prm" in n for n in diff)
    with model.disable_adapter():
        assert torch.equal(sampling.logprobs_nograd(model, batch, 4), logp_ref), "π_ref unchanged"
    assert st["prm_loss"] < math.log(2), "after an update the PRM does better than chance on this batch"


def test_policy_step_changes_only_the_policy_adapter(tok):
    cfg = tiny_cfg(lr_policy=1e-2)
    model = make_model(tok, cfg)
    batch = make_batch(model, tok, cfg)
    opt = torch.optim.AdamW(models.adapter_params(model, "policy"), lr=cfg.lr_policy)
    with model.disable_adapter():
        logp_ref = sampling.logprobs_nograd(model, batch, 4)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        model.set_adapter("policy")
        logp_old = sampling.logprobs_nograd(model, batch, 4)
        A, _ = pm.advantages(None, batch, cfg, use_process=False)
        st = pm.policy_step(model, batch, logp_old, A, cfg, opt, gen)
        # One mini-batch whose π_old is the policy as it is: ρ = 1 on every token.
        assert st["clipfrac"] == 0.0 and abs(st["approx_kl"]) < 1e-6
    diff = changed(before, model)
    assert diff and all(".policy." in n for n in diff), f"policy step touched {sorted(diff)[:3]}"
    assert any("lora_A.policy" in n for n in diff)
    with model.disable_adapter():
        assert torch.equal(sampling.logprobs_nograd(model, batch, 4), logp_ref), "π_ref unchanged"
    model.set_adapter("prm")
    assert torch.equal(sampling.logprobs_nograd(model, batch, 4), logp_ref), "π_φ still equals π_ref"


def test_policy_step_raises_logprob_of_positive_advantage_samples(tok):
    cfg = tiny_cfg(lr_policy=5e-3)
    model = make_model(tok, cfg)
    batch = make_batch(model, tok, cfg)
    opt = torch.optim.AdamW(models.adapter_params(model, "policy"), lr=cfg.lr_policy, weight_decay=0.0)
    model.set_adapter("policy")
    logp_old = sampling.logprobs_nograd(model, batch, 4)
    A, _ = pm.advantages(None, batch, cfg, use_process=False)
    pm.policy_step(model, batch, logp_old, A, cfg, opt, torch.Generator().manual_seed(0))
    pm.policy_step(model, batch, logp_old, A, cfg, opt, torch.Generator().manual_seed(0))
    logp_new = sampling.logprobs_nograd(model, batch, 4)
    delta = (logp_new - logp_old).sum(1)  # (B,)
    adv = A[:, 0]
    assert delta[adv > 0].mean() > delta[adv < 0].mean(), "PPO moves probability toward positive advantages"


def test_prm_cross_entropy_update_raises_correct_samples_reward(tok):
    cfg = tiny_cfg(lr_prm=5e-3)
    model = make_model(tok, cfg)
    batch = make_batch(model, tok, cfg)
    opt = torch.optim.AdamW(models.adapter_params(model, "prm"), lr=cfg.lr_prm, weight_decay=0.0)
    with model.disable_adapter():
        logp_ref = sampling.logprobs_nograd(model, batch, 4)
    for _ in range(5):
        pm.prm_step(model, batch, logp_ref, cfg, opt)
    model.set_adapter("prm")
    q = prm.implicit_rewards(sampling.logprobs_nograd(model, batch, 4), logp_ref, batch.mask).sum(1)
    assert q[batch.r_o == 1].mean() > q[batch.r_o == 0].mean(), "PRM learns to score correct samples higher"


def test_filter_keeps_band_groups_and_returns_surplus_prompts_to_the_buffer(tok, monkeypatch):
    """collect(): generate P prompts per round until P groups pass; surplus passing prompts are
    pushed to the buffer and come back first at the next step (ALGORITHM.md §6)."""
    cfg = tiny_cfg(P=2, K=2, max_rollout_rounds=3, filter_low=0.2, filter_high=0.8)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+0="}], "ability": "math",
             "reward_model": {"ground_truth": str(i)}} for i in range(10)]
    # Scripted outcomes per round, by prompt: prompt i passes iff it gets one right and one wrong.
    passing = {1, 2, 3}
    monkeypatch.setattr(pm, "generate", lambda model, tok, ids, am, n, t, greedy=False, **kw: (
        torch.full((ids.shape[0], 3), tok.eos_token_id), torch.ones(ids.shape[0], 3)))

    def fake_verify(rws, texts, K, workers=4, mode="bwrap"):
        s = [float(k == 0) if int(r["reward_model"]["ground_truth"]) in passing else 0.0 for r in rws for k in range(K)]
        return torch.tensor(s), {"correct": int(sum(s)), "wrong": len(s) - int(sum(s))}
    monkeypatch.setattr(pm, "verify_batch", fake_verify)
    stream, buffer = pm.PromptStream(len(rows), seed=0), []
    stream.order, stream.pos = list(range(len(rows))), 0  # in file order, for the hand count
    batch, st = pm.collect(None, tok, cfg, rows, stream, buffer, "cpu")
    # Round 1 draws prompts 0, 1 (1 passes); round 2 draws 2, 3 (both pass): 3 kept, P = 2.
    assert [r["reward_model"]["ground_truth"] for r in batch.rows] == ["1", "2"]
    assert buffer == [3], "surplus prompt (its row index) goes back"
    assert st["kept"] == 2 and st["generated"] == 8 and st["acc"] == 3 / 8
    assert batch.B == 4 and torch.equal(batch.r_o, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    batch, st = pm.collect(None, tok, cfg, rows, stream, buffer, "cpu")
    assert batch.rows[0]["reward_model"]["ground_truth"] == "3", "buffered prompt is generated first"
    # Rounds 2-3 draw prompts 5-8, none passes: the step goes on with the 1 group it has.
    assert buffer == [] and st["kept"] == 1 and st["generated"] == 12 and batch.B == 2


def test_refill_round_draws_only_what_the_missing_groups_need(tok, monkeypatch):
    """collect(): after a first round of P prompts with 6 of 8 passing, the refill round draws
    ceil(1.25 * 2 missing * 8 / 6) = 4 prompts, not another P = 8."""
    cfg = tiny_cfg(P=8, K=2, max_rollout_rounds=3, filter_low=0.2, filter_high=0.8)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+0="}], "ability": "math",
             "reward_model": {"ground_truth": str(i)}} for i in range(40)]
    sizes = []

    def fake_generate(model, tok, ids, am, n, t, greedy=False, **kw):
        sizes.append(ids.shape[0] // cfg.K)
        return torch.full((ids.shape[0], 3), tok.eos_token_id), torch.ones(ids.shape[0], 3)
    monkeypatch.setattr(pm, "generate", fake_generate)
    passing = {0, 1, 2, 3, 4, 5} | set(range(8, 40))  # prompts 6 and 7 fail the filter

    def fake_verify(rws, texts, K, workers=4, mode="bwrap"):
        s = [float(k == 0) if int(r["reward_model"]["ground_truth"]) in passing else 0.0 for r in rws for k in range(K)]
        return torch.tensor(s), {}
    monkeypatch.setattr(pm, "verify_batch", fake_verify)
    stream, buffer = pm.PromptStream(len(rows), seed=0), []
    stream.order, stream.pos = list(range(len(rows))), 0  # in file order, for the hand count
    batch, st = pm.collect(None, tok, cfg, rows, stream, buffer, "cpu")
    assert sizes == [8, 4] and st["generated"] == 24 and st["kept"] == 8
    assert buffer == [10, 11], "2 surplus prompts (row indices) go back"


def test_evaluation_uses_its_own_seed_and_restores_the_training_rng(tok, monkeypatch):
    cfg = tiny_cfg(max_new_tokens=8, eval_samples=3)
    model = make_model(tok, cfg)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1="}], "ability": "math",
             "reward_model": {"ground_truth": str(i + 1)}} for i in range(4)]
    model.set_adapter("policy")
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    evaluation.evaluate(model, tok, rows, cfg, "cpu", False, "")
    assert torch.equal(torch.rand(3), expected_next), "training random numbers are unaffected by evaluation"
    # Same model, same eval seed: the very same samples, whatever the global RNG state was.
    texts, orig = [], tasks.verify_batch

    def spy(rws, outs, K, workers=4, mode="bwrap"):
        texts.append(list(outs))
        return orig(rws, outs, K, workers, mode)
    monkeypatch.setattr(evaluation, "verify_batch", spy)
    torch.manual_seed(1)
    evaluation.evaluate(model, tok, rows, cfg, "cpu", False, "")
    torch.manual_seed(2)
    why = {}
    evaluation.evaluate(model, tok, rows, cfg, "cpu", False, "", reasons=why)
    assert len(texts[0]) == 12 and texts[0] == texts[1]
    # The verifier's counts cover every sample; the format rate is a plain count over the texts.
    assert sum(why.values()) == 12
    readable = sum(verifiers.extract_answer(t) not in (None, "") for t in texts[1])
    assert evaluation.answered(why) == pytest.approx(readable / 12)


def test_answered_is_the_share_of_responses_with_a_readable_answer():
    assert evaluation.answered({"correct": 3, "wrong": 1, "no_answer": 4}) == 0.5
    assert evaluation.answered({"no_answer": 2}) == 0.0
    assert evaluation.answered({"correct": 1}) == 1.0


def test_merged_copy_gives_the_policys_logits_and_leaves_the_adapters_untouched(tok):
    """Rollouts sample from a plain copy with the policy adapter merged in: the same π_θ (up to
    float rounding), while the peft model, its adapters and π_ref stay exactly as they were."""
    cfg = tiny_cfg()
    model = make_model(tok, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so that merging matters
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ids = torch.randint(4, len(tok), (3, 9))
    for name in ("policy", "prm"):
        model.set_adapter(name)
        plain = sampling.merged_copy(model)
        assert not any("lora_" in n for n, _ in plain.named_parameters()), "the copy has no LoRA layers"
        with torch.no_grad():
            want, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5), f"{name}: merged logits differ by {(got - want).abs().max()}"
        with model.disable_adapter(), torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, want, atol=1e-3), "the adapter matters here"
    assert sampling.merged_copy(model) is plain, "built once per model, refreshed in place"
    with model.disable_adapter(), torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.allclose(sampling.merged_copy(model)(input_ids=ids).logits, ref, atol=1e-6), "disabled = π_ref"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before), "model unchanged"


@pytest.mark.parametrize("target, checks, steps", [(0.5, [0.1, 0.3, 0.49, 0.55, 0.9], 20), (0.0, [], 12)])
def test_sft_warmup_stops_at_the_first_validation_check_that_reaches_the_target(tmp_path, monkeypatch, target, checks, steps):
    """Checks every 5 steps: 0.1, 0.3, 0.49 are below 0.5, so the warm-up stops after the 4th
    check (step 20, 0.55); with no target it trains all --sft-steps and never evaluates."""
    cfg = tiny_cfg(tiny_layers=1, sft_steps=12 if not target else 40, sft_batch=4, sft_check_every=5, sft_target=target,
                   out_dir=str(tmp_path))
    values, seen = iter(checks), []

    def fake_evaluate(model, tok_, rows, cfg_, device, greedy, desc, with_se=False):
        assert greedy and rows[0]["extra_info"]["split"] == "val", "the stopping rule uses greedy accuracy on the val split"
        seen.append(model.training)
        return next(values)
    monkeypatch.setattr(sft, "evaluate", fake_evaluate)
    path = sft.sft_warmup(cfg, "cpu")
    info = json.load(open(os.path.join(path, "done")))
    assert info["steps"] == steps
    assert len(seen) == (4 if target else 0)
    assert info["val_greedy"] == (0.55 if target else None)


SFT_RACE = """
import hashlib, os, sys, time
sys.path.insert(0, {root!r})
import config, sft
cfg = config.Config(**{cfg!r})
open(os.path.join({ready!r}, str(os.getpid())), "w").close()
while not os.path.exists({go!r}):  # both processes start training at once
    time.sleep(0.01)
path = sft.sft_warmup(cfg, "cpu")
print("SFT AT", path, hashlib.sha256(open(os.path.join(path, "model.safetensors"), "rb").read()).hexdigest())
"""


def test_two_runs_started_together_share_one_sft_model_and_neither_removes_what_the_other_reads(tmp_path):
    """Both see no cached model; one trains it (the lock), the other waits and reuses it, and both
    read the same weights. A temporary folder left by a killed run is removed, not reused."""
    data = tmp_path / "sft.jsonl"  # 16 worked solutions: quick to tokenise
    data.write_text("".join(open(os.path.join(os.path.dirname(tasks.__file__), "data", "arith_sft.jsonl")).readlines()[:16]))
    fields = dict(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_intermediate=64, sft_steps=30, sft_batch=4,
                  sft_target=0.0, sft_data=str(data), out_dir=str(tmp_path), show_progress=False)
    cfg = config.Config(**fields)
    stale = tmp_path / "sft" / (sft.sft_key(cfg) + ".tmp")  # what a run killed while saving left behind
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / "ready").mkdir()
    code = SFT_RACE.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), cfg=fields,
                           go=str(tmp_path / "go"), ready=str(tmp_path / "ready"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    while len(os.listdir(tmp_path / "ready")) < 2 and all(p.poll() is None for p in procs):  # both imported
        time.sleep(0.05)
    (tmp_path / "go").write_text("")
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    found = [line.split()[2:] for out, _ in outs for line in out.splitlines() if line.startswith("SFT AT")]
    assert len(found) == 2 and found[0] == found[1], f"one model, the same weights read by both: {found}"
    said = "".join(out for out, _ in outs)
    assert said.count("SFT model saved to") == 1 and said.count("SFT model: reusing") == 1, said
    assert sorted(os.listdir(tmp_path / "sft")) == [sft.sft_key(cfg), sft.sft_key(cfg) + ".lock"], "no temporary folder left"


def test_the_shipped_sft_model_is_the_warm_up_of_the_default_settings():
    """data/sft/ holds one model, under the key the default settings give today: a change to the
    warm-up's settings, its data or its tokenizer changes the key and fails this test until
    scripts/ship_sft.py has trained and shipped the model of the new settings."""
    cfg = config.parse_config([])
    key, shipped = sft.sft_key(cfg), sorted(os.listdir(sft.SHIPPED_SFT))
    assert shipped == [key], (f"data/sft/ holds {shipped}, but the default settings' SFT key is {key}: "
                              "regenerate it with python scripts/ship_sft.py (docs/EXPERIMENTS.md, The embedded default)")
    path = sft.shipped_sft(cfg)
    info = json.load(open(os.path.join(path, "done")))
    assert info["val_greedy"] >= cfg.sft_target, "the shipped warm-up reached its stopping rule"
    base, tok_ = models.load_base(path, "cpu", cfg)
    c = base.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        cfg.tiny_hidden, cfg.tiny_layers, cfg.tiny_heads, cfg.tiny_intermediate)
    assert tok_.get_vocab() == models.build_char_tokenizer().get_vocab(), "the tokenizer the warm-up builds"


def test_a_run_starts_from_the_shipped_model_unless_its_own_exists_or_retrain_sft(tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(sft, "train_sft", lambda cfg, device, path: trained.append(path) or path)
    cfg = config.parse_config(["--out-dir", str(tmp_path)])
    assert sft.sft_warmup(cfg, "cpu") == sft.shipped_sft(cfg) and not trained
    assert "SFT model: the shipped one" in capsys.readouterr().out
    cfg.retrain_sft = True
    assert sft.sft_warmup(cfg, "cpu") == sft.sft_path(cfg) and trained == [sft.sft_path(cfg)]
    cfg.retrain_sft = False  # a model of its own under --out-dir, for example a --retrain-sft one, comes first
    os.makedirs(sft.sft_path(cfg))
    open(os.path.join(sft.sft_path(cfg), "done"), "w").write("{}")
    assert sft.sft_warmup(cfg, "cpu") == sft.sft_path(cfg) and len(trained) == 1
    assert sft.shipped_sft(tiny_cfg()) is None, "other settings: nothing ships, the warm-up trains"


def test_sft_cache_key_changes_with_the_stopping_rule():
    keys = {sft.sft_key(tiny_cfg(sft_target=t, sft_check_every=c)) for t, c in [(0.6, 25), (0.5, 25), (0.6, 10), (0.0, 25)]}
    assert len(keys) == 4


def test_drop_warning_only_beyond_the_noise_and_names_the_causes_the_metrics_show():
    cfg = tiny_cfg(P=32)
    ev = {"acc_before": 0.50, "acc_before_se": 0.01, "greedy_before": 0.65}  # noise = 2 se = 0.02
    calm = [{"step": i, "entropy": 0.10, "kept": 32, "process_on": True, "prm_acc_fresh": 0.55} for i in range(20)]
    assert evaluation.drop_warning(20, 0.481, ev, calm, cfg) is None  # 0.019 below: inside the noise
    w = evaluation.drop_warning(20, 0.47, ev, calm, cfg)
    assert "0.030 below the start" in w and "noise ±0.020" in w and "No logged metric points at a cause" in w
    collapsed = [dict(m, entropy=0.10 if i < 5 else 0.04) for i, m in enumerate(calm)]
    assert "entropy went from 0.100 to 0.040" in evaluation.drop_warning(20, 0.40, ev, collapsed, cfg)
    hacked = [dict(m, prm_acc_fresh=0.35) for m in calm]
    w = evaluation.drop_warning(20, 0.40, ev, hacked, cfg)
    assert "PRM ranks fresh samples below chance (0.35)" in w and "entropy" not in w
    starved = [dict(m, kept=10) for m in calm]
    assert "only 10 of 32 prompts per step pass the filter" in evaluation.drop_warning(20, 0.40, ev, starved, cfg)


def test_start_report_says_inside_or_warns_outside_the_band_of_the_embedded_default():
    lo, hi = evaluation.SFT_BAND["acc_before"]
    glo, ghi = evaluation.SFT_BAND["greedy_before"]
    inside = {"acc_before": (lo + hi) / 2, "greedy_before": (glo + ghi) / 2}
    assert evaluation.start_report(config.Config(), inside).startswith("the SFT model is inside the band")
    assert evaluation.start_report(config.Config(), dict(inside, acc_before=lo - 0.01)).startswith("warning: the SFT model")
    assert evaluation.start_report(config.Config(), dict(inside, greedy_before=ghi + 0.01)).startswith("warning: the SFT model")
    assert evaluation.start_report(config.Config(model="some/model"), inside) is None  # the band belongs to the tiny default


ALLOCATOR_PROBE = """
import ctypes, sys, torch
sys.path.insert(0, {root!r})
import models
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = models.keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
x = torch.ones(4 * 1024 * 1024)  # 16 MB: one block of a tiny-default forward's size
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(kept, during.hblkhd - before.hblkhd, after.arena)  # bytes in new mappings; bytes the heap keeps
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keep_freed_memory_serves_a_forward_sized_block_from_the_heap_and_keeps_it_after_free():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE.format(root=root), mode], capture_output=True,
                           text=True, timeout=120)
        if "mallinfo2" in r.stderr:
            pytest.skip("glibc older than 2.33 (no mallinfo2)")
        assert r.returncode == 0, r.stderr[-2000:]
        kept, mapped, heap = r.stdout.split()
        out[mode] = (kept, int(mapped), int(heap))
    mb = 1024 * 1024
    # glibc's default maps a 16 MB block on its own (and unmaps it when freed: its pages are
    # faulted in again by the next forward) ...
    assert out["default"][1] >= 16 * mb, f"default: {out['default']}"
    # ... keep_freed_memory serves it from the heap, which keeps it after the free, for reuse
    assert out["keep"][0] == "True", "mallopt did not take both settings"
    assert out["keep"][1] == 0 and out["keep"][2] >= 16 * mb, f"keep: {out['keep']}"
