"""--reward-mode mc-value (VinePPO's Monte-Carlo step values): the advantage formula, the states and
the continuation rows built for them, the estimate, the configuration checks, and micro runs of the
loop (in-process, the micro model of test_loop.py; rollouts scripted so that responses have steps).
"""
import json
import math
import os

import pytest
import torch

import config
import experiments
import mc_values
import models
import prime_mini as pm
import rl
import sampling
import tasks
from test_loop import argv, arith_rows, metrics, one_thread, world  # noqa: F401 (fixtures)


def plain_advantages(v0, values, ends, n_steps, r_o, mask):
    """rl.step_value_advantages written as a loop over rows and tokens."""
    B, T = mask.shape
    A = torch.zeros(B, T)
    for i in range(B):
        V = [float(v0[i])] + [float(values[i, k]) for k in range(int(n_steps[i]))] + [float(r_o[i])]
        bounds = [0] + [int(ends[i, k]) for k in range(int(n_steps[i]))]
        for t in range(T):
            if mask[i, t]:
                k = sum(1 for e in bounds[1:] if e <= t)  # the steps finished before token t
                A[i, t] = V[k + 1] - V[k]
    return A


# ---------------------------------------------------------------------------------------------
# The advantage formula
# ---------------------------------------------------------------------------------------------
def test_step_value_advantages_by_hand():
    # row 0: steps end at 2 and 4, then the box and EOS (tokens 4-5); V = 0.5 -> 1.0 -> 0.25, r_o 0
    # row 1: one step (tokens 0-2), cut at the length limit right after it (no tail), padding after
    # row 2: no step at all: every token gets r_o - V(s_0), outcome-only's advantage
    v0 = torch.tensor([0.5, 0.25, 0.75])
    values = torch.tensor([[1.0, 0.25], [1.0, 9.0], [9.0, 9.0]])  # columns past a row's steps are ignored
    ends = torch.tensor([[2, 4], [3, 0], [0, 0]])
    n_steps = torch.tensor([2, 1, 0])
    r_o = torch.tensor([0.0, 1.0, 1.0])
    mask = torch.tensor([[1.0] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    A = rl.step_value_advantages(v0, values, ends, n_steps, r_o, mask)
    want = torch.tensor([[0.5, 0.5, -0.75, -0.75, -0.25, -0.25],
                         [0.75, 0.75, 0.75, 0, 0, 0],
                         [0.25, 0.25, 0.25, 0.25, 0, 0]])
    torch.testing.assert_close(A, want)


def test_step_value_advantages_equal_a_plain_loop_and_telescope_to_rloos_outcome_advantage():
    g = torch.Generator().manual_seed(0)
    B, K, S, T = 12, 4, 5, 20
    n_steps = torch.randint(0, S + 1, (B,), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ends = torch.zeros(B, S, dtype=torch.long)
    for i in range(B):  # non-decreasing ends within the valid length, some steps of zero tokens
        ends[i, :n_steps[i]] = torch.sort(torch.randint(1, int(lengths[i]) + 1, (int(n_steps[i]),), generator=g)).values
    mask = (torch.arange(T) < lengths.view(B, 1)).float()  # (B, T)
    r_o = torch.randint(0, 2, (B,), generator=g).float()
    values = torch.rand(B, S, generator=g)
    for i in range(B):  # a step of zero tokens ends at the same state as the step before it: the same value
        for k in range(1, int(n_steps[i])):
            if ends[i, k] == ends[i, k - 1]:
                values[i, k] = values[i, k - 1]
        for k in range(int(n_steps[i])):  # a state that is the whole response is terminal: V = r_o
            if ends[i, k] == lengths[i]:
                values[i, k] = r_o[i]
    v0 = rl.leave_one_out_mean(r_o, K)
    A = rl.step_value_advantages(v0, values, ends, n_steps, r_o, mask)
    torch.testing.assert_close(A, plain_advantages(v0, values, ends, n_steps, r_o, mask))
    # One value per step (at its first token, or 0 for a step of no tokens): their sum is r_o - V(s_0),
    # RLOO's outcome advantage, which outcome-only gives every token (rl.rloo_returns, γ = 1).
    rloo = rl.rloo_returns(None, r_o, mask, K)[:, 0]
    for i in range(B):
        bounds = [0] + ends[i, :n_steps[i]].tolist() + [int(lengths[i])]
        per_step = [float(A[i, a]) if b > a else 0.0 for a, b in zip(bounds, bounds[1:])]
        assert sum(per_step) == pytest.approx(float(r_o[i] - v0[i]), abs=1e-6), i
        assert float(rloo[i]) == pytest.approx(float(r_o[i] - v0[i]), abs=1e-6), i


def test_leave_one_out_mean_is_the_mean_of_the_other_samples_of_the_group():
    torch.testing.assert_close(rl.leave_one_out_mean(torch.tensor([1.0, 0, 0, 1, 1, 1]), 3),
                               torch.tensor([0.0, 0.5, 0.5, 1, 1, 1]))


# ---------------------------------------------------------------------------------------------
# States and continuation rows (no model)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return models.build_char_tokenizer()


def hand_batch(tok, groups, K, eos=True, T=None):
    """A Rollout of hand-written responses (character tokens, an EOS after each unless eos=False)
    and its step labels. groups: [(prompt, [K responses])]."""
    rows = arith_rows([p for p, _ in groups])
    texts = [t for _, ts in groups for t in ts]
    ids, am = sampling.encode_prompts(tok, [tasks.prompt_text(tok, r["prompt"]) for r in rows for _ in range(K)], "cpu")
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []) for t in texts]
    T = T or max(map(len, seqs))
    resp = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1.0] * len(s) + [0.0] * (T - len(s)) for s in seqs])
    r_o = torch.tensor([float(t.endswith("{%s}" % rows[i // K]["reward_model"]["ground_truth"]))
                        for i, t in enumerate(texts)])
    batch = sampling.Rollout(ids, am, resp, mask, r_o, rows, texts)
    return batch, tasks.label_batch(rows, resp, mask, tok, K)


GROUPS = [("47+8-3=", ["47+8=55;55-3=52;\\boxed{52}", "47+8=55;55-3=51;\\boxed{51}"]),
          ("9+1=", ["9+1=10;\\boxed{10}", "9+1=10;\\boxed{10}"])]  # two identical responses


def test_identical_prefixes_of_a_prompt_are_one_state():
    batch, labelled = hand_batch(models.build_char_tokenizer(), GROUPS, K=2)
    states, ends, n_steps, index = mc_values.step_states(batch, labelled)
    assert n_steps.tolist() == [2, 2, 1, 1]
    assert ends.tolist() == [[8, 16], [8, 16], [7, 0], [7, 0]], "each step ends after its ';'"
    # "47+8=55;" is shared by rows 0 and 1; "9+1=10;" by rows 2 and 3 (identical responses): 4 states, not 6
    assert states == [(0, 8), (0, 16), (1, 16), (2, 7)]
    assert index == [[0, 1], [0, 2], [3], [3]]


def test_a_state_that_is_the_whole_response_is_terminal_and_not_sampled(tok):
    # cut at the length limit right after the second step: no EOS, no box
    batch, labelled = hand_batch(tok, [("47+8-3=", ["47+8=55;55-3=52;", "47+8=55;55-3=52;\\boxed{52}"])], K=2,
                                 eos=False)
    states, ends, n_steps, index = mc_values.step_states(batch, labelled)
    assert index[0] == [0, -1] and index[1] == [0, 1] and states == [(0, 8), (1, 16)]


def test_continuation_rows_are_left_padded_prefixes_in_consecutive_copies_with_the_remaining_budget(tok):
    batch, labelled = hand_batch(tok, GROUPS, K=2)
    states, _, _, _ = mc_values.step_states(batch, labelled)
    m, max_new = 3, 40
    calls = mc_values.continuation_batches(batch, states, m, 100, max_new, tok.pad_token_id)
    assert len(calls) == 1, "all the continuations in one generate() call when they fit"
    which, ids, mask, budget = calls[0]
    length = [int(batch.prompt_mask[i].sum()) + e for i, e in states]
    assert which.tolist() == [s for s in sorted(range(len(states)), key=lambda s: length[s]) for _ in range(m)], \
        "shortest states first, each state's m copies consecutive"
    assert ids.shape == (len(states) * m, max(length))
    for r, s in enumerate(which.tolist()):
        i, e = states[s]
        n = length[s]
        assert mask[r].tolist() == [0] * (ids.shape[1] - n) + [1] * n, "left-padded"
        assert torch.all(ids[r, :ids.shape[1] - n] == tok.pad_token_id)
        want = torch.cat([batch.prompt_ids[i][batch.prompt_mask[i].bool()], batch.resp[i, :e]])
        assert torch.equal(ids[r, -n:], want), "the prompt's valid tokens, then the response's first e tokens"
        assert budget[r] == max_new - e, "what a rollout of the whole response could still add"
    # at most `per_call` rows a call: as few calls as that allows
    chunks = mc_values.continuation_batches(batch, states, m, 5, max_new, tok.pad_token_id)
    assert [len(c[0]) for c in chunks] == [5, 5, 2]
    assert torch.cat([c[0] for c in chunks]).tolist() == which.tolist()
    for w, i_, am, _ in chunks:  # each call padded to its own longest row
        assert am[:, 0].any() and i_.shape[1] == max(length[s] for s in w.tolist())


def test_values_are_the_mean_outcome_of_the_continuations_cut_at_each_rows_budget(tok, monkeypatch):
    """A fake generate writes 'X;\\boxed{52}' after every prefix (more tokens than some budgets
    allow) and a fake verifier scores 1 iff the text ends with the box: V is the share of a state's
    copies that fit; the decoded texts are prefix + continuation, cut at the row's budget."""
    batch, labelled = hand_batch(tok, GROUPS[:1], K=2)
    states, _, _, _ = mc_values.step_states(batch, labelled)  # ends 8, 16, 16
    cont_text = "7;\\boxed{52}"  # 12 characters

    def fake_generate(model, tok_, ids, am, max_new_tokens, temperature, greedy=False, merged=True, batch_size=0,
                      decode="static"):
        assert max_new_tokens == 20 - 8, "the call's longest budget"
        c = tok_(cont_text, add_special_tokens=False)["input_ids"] + [tok_.eos_token_id]
        resp = torch.tensor([c] * ids.shape[0])
        return resp, sampling.response_mask(resp, tok_.eos_token_id)
    seen = []

    def fake_verify(rows, texts, K, workers=4, mode="bwrap"):
        seen.extend(texts)
        return torch.tensor([float(t.endswith("{52}")) for t in texts]), {}
    monkeypatch.setattr(sampling, "generate", fake_generate)
    cfg = config.Config(mc_samples=2, max_new_tokens=20, K=2, gen_batch=0)
    model = type("M", (), {"set_adapter": lambda self, name: None})()
    values, st = mc_values.estimate_values(model, tok, batch, states, cfg, fake_verify)
    # state (0, 8): budget 12, the continuation's 12 characters fit (its EOS does not): right;
    # states ending at 16: budget 4, cut to "7;\b": wrong
    assert values.tolist() == [1.0, 0.0, 0.0]
    assert st["mc_states"] == 3 and st["mc_rollouts"] == 6 and st["mc_tokens"] == 2 * 12 + 4 * 4
    assert sorted(set(seen)) == sorted({"47+8=55;" + cont_text, "47+8=55;55-3=52;7;\\b", "47+8=55;55-3=51;7;\\b"})


def test_mc_advantages_give_each_step_its_value_change_and_log_the_blame_shares(tok, monkeypatch):
    """Values fixed by hand through a fake estimate: the unwhitened advantages of each step, then
    whitening, the spread and the blame shares on the wrong response."""
    batch, labelled = hand_batch(tok, GROUPS[:1], K=2)  # row 0 right, row 1 wrong at step 2
    fixed = {(0, 8): 0.5, (0, 16): 1.0, (1, 16): 0.0}
    monkeypatch.setattr(mc_values, "estimate_values", lambda model, tok_, b, states, cfg, verify=None: (
        torch.tensor([fixed[s] for s in states]), {"mc_states": len(states), "mc_rollouts": 4 * len(states),
                                                    "mc_tokens": 0, "t_mc": 0.0, "t_mc_verify": 0.0}))
    raw = []
    real = rl.step_value_advantages
    monkeypatch.setattr(rl, "step_value_advantages", lambda *a: raw.append(real(*a)) or raw[-1])
    model = type("M", (), {"set_adapter": lambda self, name: None})()
    A, st = mc_values.mc_advantages(model, tok, batch, labelled, config.Config(K=2), None)
    v0 = [0.0, 1.0]  # the other sample's outcome
    n = batch.mask.sum(1).long().tolist()  # 27 tokens each (26 characters + EOS)
    want = torch.zeros_like(batch.mask)
    for i, (v1, v2) in enumerate([(0.5, 1.0), (0.5, 0.0)]):
        want[i, :8], want[i, 8:16], want[i, 16:n[i]] = v1 - v0[i], v2 - v1, batch.r_o[i] - v2
    torch.testing.assert_close(raw[0], want)
    torch.testing.assert_close(A, rl.masked_whiten(want, batch.mask))
    assert st["mc_v_spread"] == pytest.approx((0.5 + 0.5 + 0.5 + 0.5) / 4)
    # the wrong row: step 1 (8 of its 27 tokens) is right and gets -0.5 of the -1.0 negative mass (step 2: -0.5)
    assert st["blame_right_outcome"] == pytest.approx(8 / 27)
    assert st["blame_right_mc"] == pytest.approx(8 * 0.5 / (8 * 0.5 + 8 * 0.5))
    assert st["ret_outcome"] == pytest.approx(1.0) and st["ret_process"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--mc-samples", "8"], "--mc-samples: only --reward-mode mc-value reads it (this run: --reward-mode prime)"),
    (["--mc-samples", "8", "--reward-mode", "oracle"], "--mc-samples: only --reward-mode mc-value reads it"),
    (["--reward-mode", "mc-value", "--mc-samples", "0"], "--mc-samples: must be >= 1, got 0"),
    (["--reward-mode", "mc-value", "--process-coef", "1"], "--process-coef: --reward-mode mc-value does not read it"),
    (["--reward-mode", "mc-value", "--gamma-process", "0"], "--gamma-process: --reward-mode mc-value does not read"),
    (["--reward-mode", "mc-value", "--adv-estimator", "grpo"], "--adv-estimator: --reward-mode mc-value does not"),
    (["--reward-mode", "mc-value", "--oracle-form", "every"], "--oracle-form: only --reward-mode oracle reads it"),
])
def test_flags_that_mc_value_does_not_read_or_only_it_reads_are_refused(flags, needle):
    with pytest.raises(models.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        config.parse_config(flags, new_folder=False)


def test_the_new_arms_are_valid_configurations():
    assert experiments.arm_flags("mc-value") == ("mc-value", ["--reward-mode", "mc-value"])
    assert experiments.arm_flags("oracle-g0") == ("oracle-g0", ["--reward-mode", "oracle", "--gamma-process", "0"])
    assert config.parse_config(experiments.ARMS["mc-value"], new_folder=False).mc_samples == 4
    cfg = config.parse_config(experiments.ARMS["oracle-g0"], new_folder=False)
    assert cfg.gamma_process == 0.0 and cfg.oracle_form == "first"
    config.parse_config(experiments.ARMS["oracle-g0"] + ["--oracle-form", "every"], new_folder=False)


def test_oracle_g0_blames_only_the_wrong_steps_tokens_and_reward_to_go_every_token_before_it(tok):
    """--gamma-process 0: a token's process return is its own leave-one-out score, so on a wrong
    response the tokens of the steps before the wrong one get what the tokens after it get; with
    γ = 1 (reward-to-go) they carry the wrong step's -1 too."""
    batch, labelled = hand_batch(tok, GROUPS[:1], K=2)  # row 1: step 2 (tokens 8-15) wrong
    q = tasks.oracle_process_rewards(labelled, batch.resp.shape[1], "first")
    for gamma in (0.0, 1.0):
        cfg = config.Config(K=2, reward_mode="oracle", gamma_process=gamma)
        out_only = rl.rloo_returns(None, batch.r_o, batch.mask, 2)
        p = cfg.process_coef * rl.batch_norm(q, batch.mask)
        proc = (rl.rloo_returns(p, batch.r_o, batch.mask, 2, gamma) - out_only)[1]  # the wrong row's process return
        before, wrong, after = proc[:8], proc[8:16], proc[16:27]
        if gamma == 0.0:
            assert (wrong < after.min() - 1e-6).all(), "the wrong step is blamed"
            assert torch.allclose(before, after[0].expand(8)) and torch.allclose(after, after[0].expand(11)), \
                "every other token: the same (the group's baseline)"
        else:
            assert before.max() < after.min() - 0.4, "reward-to-go: the right step before it carries the wrong step's -1"


# ---------------------------------------------------------------------------------------------
# Micro runs of the loop
# ---------------------------------------------------------------------------------------------
def scripted_generate(tok):
    """Rollouts in place of the micro model's (it writes no steps): for the prompt 'N+1+1=', sample
    k=0 writes the right chain and k=1 a wrong second step, sharing the first step. The MC
    continuations still come from the model (mc_values calls sampling.generate)."""
    def generate(model, tok_, prompt_ids, prompt_mask, max_new_tokens, temperature, greedy=False, merged=True,
                 batch_size=0, decode="static"):
        seqs = []
        for r in range(prompt_ids.shape[0]):
            n = int(tok.decode(prompt_ids[r][prompt_mask[r].bool()], skip_special_tokens=True).split("+")[0])
            end = n + 2 if r % 2 == 0 else n + 3
            text = f"{n}+1={n + 1};{n + 1}+1={end};\\boxed{{{end}}}"
            seqs.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        T = max(map(len, seqs))
        resp = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])
        return resp, sampling.response_mask(resp, tok.eos_token_id)
    return generate


@pytest.fixture
def mc_run(world, monkeypatch, tmp_path):
    rows = arith_rows([f"{i}+1+1=" for i in range(40)])
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(pm, "generate", scripted_generate(world.tok))

    def run(name, *extra):
        return pm.run(config.parse_config(argv(world, name, "--reward-mode", "mc-value", "--max-new-tokens", "32",
                                               "--mc-samples", "3", "--data", str(path), *extra)))
    return run


def test_an_mc_value_run_estimates_each_distinct_state_and_logs_sane_metrics(world, mc_run, capsys):
    summary, run_dir = mc_run("mcv", "--steps", "2")
    out = capsys.readouterr().out
    m = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert len(m) == 2 and summary["reward_mode"] == "mc-value" and "acc_after" in summary
    stream = pm.PromptStream(40, 0)
    drawn = [[stream.next() for _ in range(2)] for _ in range(2)]  # each step's two prompts 'N+1+1=' (row N)
    for x, ns in zip(m, drawn):
        assert x["kept"] == 2 and x["process_on"] and "prm_loss" not in x, "no PRM"
        # per group: the shared first step and the two second steps, 3 distinct states; m = 3 each
        assert x["mc_states"] == 3 * 2 and x["mc_rollouts"] == 3 * x["mc_states"]
        assert x["mc_rollouts"] <= x["mc_tokens"] <= x["mc_rollouts"] * 32
        assert 0 < x["t_mc"] <= x["t_rollout"] and x["t_mc_verify"] <= x["t_verify"]
        # the wrong responses: their first step is right, then a wrong step, the box and the EOS
        right = sum(len(f"{n}+1={n + 1};") for n in ns)
        total = sum(len(f"{n}+1={n + 1};{n + 1}+1={n + 3};\\boxed{{{n + 3}}}") + 1 for n in ns)
        assert x["blame_right_outcome"] == pytest.approx(right / total)
        assert x["blame_right_mc"] is None or 0 <= x["blame_right_mc"] <= 1
        assert 0 <= x["mc_v_spread"] <= 1 and math.isfinite(x["pg_loss"])
    assert f"mc {m[0]['mc_rollouts']} |" in out, "the step line names the continuations"


def test_an_mc_value_run_resumed_from_its_checkpoint_takes_the_steps_a_straight_run_takes(world, mc_run, capsys):
    _, straight = mc_run("mcv-straight", "--steps", "2")
    _, part = mc_run("mcv-part", "--steps", "1", "--save-every", "1")
    pm.run(config.parse_config(["--resume", part, "--steps", "2", "--no-show-progress"]))
    assert metrics(part) == metrics(straight)


def test_mc_value_refuses_data_without_step_labels_before_building_a_model(world):
    cfg = config.parse_config(argv(world, "mcv-bad", "--reward-mode", "mc-value"))
    with pytest.raises(models.ConfigError, match="--reward-mode mc-value: its steps .* has other rows"):
        pm.run(cfg)
