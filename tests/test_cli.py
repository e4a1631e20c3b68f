"""Configuration errors, data checks, and an end-to-end run of prime_mini.py through subprocess."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import config
import models
import prime_mini as pm
import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A micro configuration for end-to-end runs: a 1-layer tiny model, 20 SFT steps, 2 RL steps.
MICRO = ["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-intermediate", "64",
         "--sft-steps", "20", "--sft-batch", "16", "--steps", "2", "--P", "4", "--K", "2",
         "--filter-low", "0", "--filter-high", "1", "--max-new-tokens", "16", "--micro-batch", "4", "--no-show-progress"]


@pytest.mark.parametrize("argv, needle", [
    (["--K", "1"], "--K: must be >= 2"),
    (["--filter-low", "-0.1"], "--filter-low: must be in [0, 1]"),
    (["--filter-high", "1.5"], "--filter-high: must be in [0, 1]"),
    (["--filter-low", "0.9", "--filter-high", "0.5"], "--filter-low: 0.9 is above --filter-high 0.5"),
    (["--prm-init", "nope/adapters/prm"], "--prm-init: nope/adapters/prm/adapter_config.json not found"),
    (["--prm-init", "x", "--reward-mode", "outcome"], "--prm-init: --reward-mode outcome has no PRM"),
    (["--oracle-form", "every"], "--oracle-form: only --reward-mode oracle reads it"),
    (["--process-credit", "min", "--reward-mode", "outcome"], "--process-credit: --reward-mode outcome has no process"),
    (["--process-credit", "min", "--adv-estimator", "grpo"], "--process-credit: min-form credit is implemented for"),
    (["--data", "nope.jsonl"], "data file not found: nope.jsonl"),
    (["--steps", "0"], "--steps: must be >= 1"),
    # Accepted before and failing late, or silently changing the run:
    (["--eval-n", "-5"], "--eval-n: must be >= 0, got -5"),  # [:-5] dropped 5 held-out prompts
    (["--beta", "0"], "--beta: must be > 0, got 0.0"),
    (["--beta", "-0.05"], "--beta: must be > 0, got -0.05"),
    (["--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature: must be a finite number, got inf"),
    (["--temperature", "0"], "--temperature: must be > 0, got 0.0"),
    (["--save-every", "-3"], "--save-every: must be >= 0, got -3"),
    (["--eps-clip", "-1"], "--eps-clip: must be in (0, 1)"),
    (["--eps-clip", "1"], "--eps-clip: must be in (0, 1)"),
    (["--lr-policy", "-1"], "--lr-policy: must be > 0, got -1.0"),
    (["--lr-policy", "nan"], "--lr-policy: must be a finite number, got nan"),
    (["--lr-prm", "0"], "--lr-prm: must be > 0, got 0.0"),
    (["--sft-lr=-inf"], "--sft-lr: must be a finite number, got -inf"),
    (["--lora-alpha-ratio", "0.1"], "--lora-alpha-ratio: alpha = ratio × rank must be a whole number >= 1 for both "
                                    "adapters; 0.1 × --lora-r 8 = 0.8 (the adapter would get alpha 0: it would do nothing)"),
    (["--lora-alpha-ratio", "0.3"], "0.3 × --lora-r 8 = 2.4 (the adapter would get alpha 2)"),
    (["--lora-alpha-ratio", "0.5", "--prm-lora-r", "3"], "0.5 × --prm-lora-r 3 = 1.5 (the adapter would get alpha 1)"),
    (["--lora-alpha-ratio", "-2"], "--lora-alpha-ratio: must be > 0, got -2.0"),
    (["--process-coef", "-0.5"], "--process-coef: must be >= 0, got -0.5"),
    (["--process-coef", "nan"], "--process-coef: must be a finite number, got nan"),
    (["--wd-policy", "-0.01"], "--wd-policy: must be >= 0, got -0.01"),
    (["--prm-grad-clip", "0"], "--prm-grad-clip: must be > 0, got 0.0"),
    (["--policy-grad-clip", "-1"], "--policy-grad-clip: must be > 0, got -1.0"),
    (["--gamma-process", "1.5"], "--gamma-process: must be in [0, 1], got 1.5"),
    (["--gamma-outcome", "-0.1"], "--gamma-outcome: must be in [0, 1], got -0.1"),
    (["--prm-gate", "2"], "--prm-gate: must be in [0, 1], got 2.0"),
    (["--prm-warmup", "-1"], "--prm-warmup: must be >= 0, got -1"),
    (["--sft-target", "nan"], "--sft-target: must be a finite number, got nan"),
    (["--filter-low", "nan"], "--filter-low: must be a finite number, got nan"),
    (["--lora-dropout", "1"], "--lora-dropout: must be in [0, 1), got 1.0"),
    (["--eval-samples", "0"], "--eval-samples: must be >= 1, got 0"),
    (["--eval-every", "-1"], "--eval-every: must be >= 0, got -1"),
    (["--reward-pages", "-2"], "--reward-pages: must be >= 0, got -2"),
    (["--truth-prompts", "-1"], "--truth-prompts: must be >= 0, got -1"),
    (["--threads", "-1"], "--threads: must be >= 0, got -1"),
    (["--gen-batch", "-4"], "--gen-batch: must be >= 0, got -4"),
    (["--max-rollout-rounds", "0"], "--max-rollout-rounds: must be >= 1, got 0"),
    (["--sft-steps", "0"], "--sft-steps: must be >= 1, got 0"),
    (["--gpu-memory-gb", "inf"], "--gpu-memory-gb: must be a finite number, got inf"),
    (["--seed", "-1"], "--seed: must be in [0, 2**63), got -1"),
    (["--eval-seed", str(2 ** 64)], "--eval-seed: must be in [0, 2**63)"),
    (["--tiny-heads", "0"], "--tiny-heads: must be >= 1, got 0"),
    (["--tiny-layers", "0"], "--tiny-layers: must be >= 1, got 0"),
    (["--tiny-hidden", "130"], "--tiny-hidden: must be --tiny-heads (4) times an even head size"),
    (["--tiny-hidden", "36"], "--tiny-hidden: must be --tiny-heads (4) times an even head size"),  # head size 9
    (["--lora-targets", "q_proj,"], "--lora-targets: all-linear, or module names separated by commas"),
    (["--lora-targets", "q_proj,qkv"], "--lora-targets: the tiny default has no linear layer named qkv (it has down_proj"),
    (["--data", "data/arith_rl.jsonl,"], "--data: an empty file name in 'data/arith_rl.jsonl,'"),
])
def test_invalid_config_names_the_flag(argv, needle):
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(argv)
    assert needle in str(e.value)


def test_bad_flag_stops_the_command_with_exit_2_and_the_flag(tmp_path):
    runs = tmp_path / "runs"
    out = subprocess.run([sys.executable, "prime_mini.py", "--temperature", "nan", "--out-dir", str(runs)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == "error: --temperature: must be a finite number, got nan"
    assert "Traceback" not in out.stderr and "SFT" not in out.stdout and not runs.exists(), "nothing was trained or written"


def test_the_ends_of_each_allowed_range_are_accepted():
    cfg = config.parse_config(["--eval-n", "0", "--save-every", "0", "--eval-every", "0", "--threads", "0",
                               "--lora-alpha-ratio", "0.25", "--lora-r", "4", "--prm-lora-r", "4",
                               "--gamma-process", "0", "--gamma-outcome", "1", "--prm-gate", "1", "--prm-warmup", "0",
                               "--eps-clip", "0.99", "--wd-policy", "0", "--process-coef", "0", "--reward-pages", "0",
                               "--tiny-hidden", "36", "--tiny-heads", "3", "--lora-targets", "q_proj,v_proj"])
    assert (cfg.eval_n, cfg.lora_alpha_ratio * cfg.lora_r, cfg.tiny_hidden // cfg.tiny_heads) == (0, 1.0, 12)


def test_every_numeric_flag_is_range_checked():
    """Each int and float field is in one of validate()'s checks (or, K, eps_clip, lora_dropout, a
    rule of its own): a new field cannot be left without one."""
    ranged = (set(config.AT_LEAST_1) | set(config.AT_LEAST_0) | set(config.POSITIVE) | set(config.NON_NEGATIVE)
              | set(config.UNIT_RANGE) | set(config.SEEDS) | {"K", "eps_clip", "lora_dropout"})
    numeric = {f.name for f in pm.dataclasses.fields(config.Config) if f.type in (int, float)}
    assert numeric - ranged == set()


def test_unknown_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--prime-norm", "max"])
    assert "invalid choice: 'max'" in capsys.readouterr().err


def test_faithful_resets_algorithmic_choices_but_explicit_flags_win():
    cfg = config.parse_config(["--faithful", "--process-coef", "0.5", "--prime-norm", "none"])
    assert cfg.prime_norm == "none" and cfg.process_coef == 0.5
    cfg = config.parse_config(["--faithful", "--prime-norm", "none"])
    assert cfg.process_coef == 1.0 and cfg.prm_warmup == 0 and cfg.prm_update == "single"
    cfg = config.parse_config(["--faithful", "--process-coef=0.5", "--no-merged-rollout"])
    assert cfg.process_coef == 0.5 and not cfg.merged_rollout


@pytest.mark.parametrize("argv, flag", [(["--faithful", "--process-co", "0.5"], "--process-co"),
                                        (["--faithful", "--process-co=0.5"], "--process-co=0.5"),
                                        (["--preset", "qwen2.5-0.5b", "--max-new", "64"], "--max-new")])
def test_abbreviated_flags_are_refused_not_overridden_by_a_preset(argv, flag, capsys):
    """argparse would read `--process-co` as --process-coef, and --faithful would then replace the
    value with its own, as if the flag had not been given: the parser refuses abbreviations."""
    with pytest.raises(SystemExit) as e:
        config.parse_config(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_prm_update_none_without_a_trained_prm_warns_that_process_rewards_are_zero():
    with pytest.warns(RuntimeWarning, match="every process reward is exactly 0"):
        config.parse_config(["--prm-update", "none"])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in pm.dataclasses.fields(config.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    flat = " ".join(out.split())  # argparse wraps lines
    assert "then constant: the stopping step is not known in advance)" in flat and "β in r_φ = β log π_φ/π_ref" in flat


def test_every_config_field_is_in_exactly_one_help_group():
    named = [n for _, _, names in config.FLAG_GROUPS for n in names]
    fields = [f.name for f in pm.dataclasses.fields(config.Config)]
    twice = sorted({n for n in named if named.count(n) > 1})
    assert not twice, f"fields in more than one group of --help: {twice}"
    assert not set(fields) - set(named), f"fields in no group of --help: {sorted(set(fields) - set(named))}"
    assert not set(named) - set(fields), f"groups name what is not a Config field: {sorted(set(named) - set(fields))}"


def test_grouped_flags_keep_the_fields_names_defaults_and_help_text():
    """Grouping changes where a flag is listed, not what it is: one flag per field, named after
    it, with the field's default and its comment as help."""
    helps = config._field_help()
    actions = {a.dest: a for a in config.build_parser()._actions if a.dest != "help"}
    assert sorted(actions) == sorted(f.name for f in pm.dataclasses.fields(config.Config))
    for f in pm.dataclasses.fields(config.Config):
        a = actions[f.name]
        assert a.option_strings[0] == "--" + f.name.replace("_", "-"), a.option_strings
        assert a.default == f.default and a.help == helps[f.name], f.name


def test_help_shows_each_group_with_its_purpose_and_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--help"])
    out = capsys.readouterr().out
    bare = "".join(out.split())  # argparse wraps lines, also after a hyphen
    starts = []
    for title, purpose, names in config.FLAG_GROUPS:
        assert f"\n{title}:\n" in out, f"--help has no section {title!r}"
        assert "".join(f"{title}: {purpose}".split()) in bare, f"section {title!r} lacks its line on what it is for"
        starts.append(out.index(f"\n{title}:\n"))
    assert starts == sorted(starts), "the sections are in FLAG_GROUPS' order"
    for (title, _, names), start, end in zip(config.FLAG_GROUPS, starts, starts[1:] + [len(out)]):
        for flag in ("--" + n.replace("_", "-") for n in names):  # "  --seed SEED", "  --faithful, --no-faithful"
            assert re.search(rf"^  {flag}[ ,\n]", out[start:end], re.M), f"{flag} is not listed under {title!r}"


def test_every_config_field_has_help_text():
    helps = config._field_help()
    missing = [f.name for f in pm.dataclasses.fields(config.Config) if not helps.get(f.name)]
    assert not missing, f"fields without a comment: {missing}"


@pytest.mark.parametrize("line, needle", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"prompt": "x", "ability": "math", "reward_model": {"ground_truth": "1"}}', "bad.jsonl:2: 'prompt' must be"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math"}', "bad.jsonl:2: missing 'reward_model.ground_truth'"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "poetry", "reward_model": {"ground_truth": "2"}}',
     "bad.jsonl:2: 'ability' must be"),
    ('{"prompt": [{"role": "user", "content": "x"}], "ability": "code", "reward_model": {"ground_truth": "{oops"}}',
     "bad.jsonl:2: sample ?#?: ground truth is not valid JSON"),
    ('{"prompt": [{"role": "user", "content": "x"}], "ability": "code", "reward_model": {"ground_truth": "{\\"inputs\\": [1]}"}}',
     "bad.jsonl:2: sample ?#?: ground truth needs 'inputs' and 'outputs'"),
    # Types that passed the check and failed mid-run (a TypeError after the SFT warm-up, an AttributeError).
    ('{"prompt": [{"role": "user", "content": 12}], "ability": "math", "reward_model": {"ground_truth": "2"}}',
     "bad.jsonl:2: prompt[0].content must be a string, got 12"),
    ('{"prompt": [{"role": "system", "content": "hi"}, {"role": "user", "content": null}], "ability": "math", '
     '"reward_model": {"ground_truth": "2"}}', "bad.jsonl:2: prompt[1].content must be a string, got None"),
    ('{"prompt": [{"role": 1, "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": "2"}}',
     "bad.jsonl:2: prompt[0].role must be a string, got 1"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": null}}',
     "bad.jsonl:2: a math row's 'reward_model.ground_truth' must be the answer as a string (or a number), got None"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": [2]}}',
     "bad.jsonl:2: a math row's 'reward_model.ground_truth' must be the answer as a string (or a number), got [2]"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": true}}',
     "bad.jsonl:2: a math row's 'reward_model.ground_truth' must be"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": " "}}',
     "bad.jsonl:2: a math row's 'reward_model.ground_truth' must be"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": "2"}, '
     '"extra_info": [1]}', "bad.jsonl:2: 'extra_info' must be an object, got [1]"),
    ('{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": "2"}, '
     '"data_source": 7}', "bad.jsonl:2: 'data_source' must be a string, got 7"),
    # The embedded task's rows are labelled step by step (steps.py): an AssertionError at the first RL step.
    ('{"data_source": "arith_chain", "prompt": [{"role": "user", "content": "What is 1+1?"}], "ability": "math", '
     '"reward_model": {"ground_truth": "2"}}',
     "bad.jsonl:2: a 'arith_chain' row's last prompt message must be a chain such as '47+8-3=' (not a prompt"),
    ('{"data_source": "arith_chain", "prompt": [{"role": "user", "content": "47+8-3="}], "ability": "math", '
     '"reward_model": {"ground_truth": "53"}}', "bad.jsonl:2: the chain 47+8-3= is 52, but 'reward_model.ground_truth' is '53'"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, needle):
    good = '{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": "2"}}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(models.ConfigError) as e:
        tasks.load_rows(str(path))
    assert needle in str(e.value) and str(e.value).startswith(f"{path}:2: ")


def test_data_file_that_is_not_utf8_names_file_and_line(tmp_path):
    good = '{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": "2"}}'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((good + "\n" + good.replace("1+1=", "caf\xe9 1+1=") + "\n").encode("latin-1"))
    with pytest.raises(models.ConfigError) as e:
        tasks.load_rows(str(path))
    assert str(e.value) == f"{path}:2: not UTF-8 text (byte 45 of the line is b'\\xe9')"  # 41 characters, then caf
    json_file = tmp_path / "latin1.json"  # read by datasets: its own message, with the file's name
    json_file.write_bytes(path.read_bytes())
    with pytest.raises(models.ConfigError, match=f"{json_file}: cannot load with datasets \\(UnicodeDecodeError"):
        tasks.load_rows(str(json_file))
    (tmp_path / "folder.jsonl").mkdir()  # a folder named like a data file
    with pytest.raises(models.ConfigError, match="folder.jsonl: cannot read \\(Is a directory\\)"):
        tasks.load_rows(str(tmp_path / "folder.jsonl"))


def test_malformed_data_stops_before_any_model_is_built(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": "1+1="}]}\n')
    out = subprocess.run([sys.executable, "prime_mini.py", "--data", str(path), "--out-dir", str(tmp_path / "runs")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"{path}:1: missing 'reward_model.ground_truth'" in out.stderr
    assert "SFT" not in out.stdout and not (tmp_path / "runs").exists(), "nothing was trained or written"


def test_end_to_end_micro_run_writes_its_outputs(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [sys.executable, "prime_mini.py", "--out-dir", str(runs), "--run-name", "micro", "--seed", "3",
            *MICRO, "--eval-n", "6", "--eval-samples", "2"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = runs / "micro"
    assert f"run directory: {run}" in out.stdout
    assert "step 2/2 | acc" in out.stdout and "before RL (SFT model)" in out.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 3 and config["K"] == 2
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("acc", "kept", "prm_loss", "prm_acc_fresh", "prm_acc_after", "ret_process", "ret_outcome",
                "pg_loss", "clipfrac", "len", "t_rollout", "t_verify", "t_prm", "t_policy"):
        assert key in metrics[-1], key
    summary = json.loads((run / "summary.json").read_text())
    for key in ("acc_before", "acc_after", "greedy_before", "greedy_after", "seed", "wall_time_s"):
        assert key in summary, key
    assert summary["seed"] == 3 and summary["eval_prompts"] == 6 and summary["eval_samples"] == 2
    for key in ("acc_before", "acc_after"):  # a mean over 6 prompts x 2 samples: a multiple of 1/12
        assert summary[key] * 12 == pytest.approx(round(summary[key] * 12), abs=1e-6), (key, summary[key])
    assert (run / "adapters" / "policy" / "adapter_config.json").exists(), "policy adapter in peft format"
    assert (run / "adapters" / "prm" / "adapter_config.json").exists(), "PRM adapter in peft format"
    from safetensors.torch import load_file
    for name in ("policy", "prm"):
        weights = load_file(str(run / "adapters" / name / "adapter_model.safetensors"))
        assert weights and all("lora_" in k for k in weights), f"{name}: LoRA tensors only"
    # The SFT model is cached: a second run reuses it instead of retraining. (This run and the
    # next in this process, as main() makes them: the command line's start-up is tested above.)
    n = torch.get_num_threads()
    capsys.readouterr()
    try:
        pm.main(argv[2:5] + ["micro2"] + argv[6:])
        again = capsys.readouterr().out
        assert "SFT model: reusing" in again
        again_summary = json.loads((runs / "micro2" / "summary.json").read_text())
        assert again_summary["acc_before"] == summary["acc_before"], "the same cached SFT model, the same eval seed"
        # --model: a saved causal LM folder is the SFT model (here the cached tiny one); no SFT runs.
        sft_dir = json.loads((run / "config.json").read_text())["base_path"]
        pm.main(argv[2:5] + ["micro3", "--model", sft_dir] + argv[6:])
        third = capsys.readouterr().out
    finally:
        torch.set_num_threads(n)
    assert "SFT warm-up" not in third and "SFT model: reusing" not in third
    assert (runs / "micro3" / "summary.json").exists()


def test_math_and_code_mix_trains_in_a_micro_run(tmp_path, code_mode):
    # Four arithmetic and four code prompts: the tiny model writes no Python, so its code
    # responses fail (syntax errors, mostly), but the code path runs end to end in the sandbox.
    mix = tmp_path / "mix.jsonl"
    lines = open(os.path.join(ROOT, "data", "arith_rl.jsonl")).readlines()[:4]
    lines += open(os.path.join(ROOT, "data", "code_problems.jsonl")).readlines()[:4]
    mix.write_text("".join(lines))
    runs = tmp_path / "runs"
    argv = [sys.executable, "prime_mini.py", "--out-dir", str(runs), "--run-name", "mix",
            "--data", f"{mix},data/code_problems.jsonl", *MICRO, "--eval-n", "4", "--eval-samples", "1",
            "--sandbox", code_mode]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"code sandbox: {code_mode}" in out.stdout, "the sandbox mode is printed at start"
    assert json.loads((runs / "mix" / "config.json").read_text())["sandbox"] == code_mode, "and recorded"
    metrics = [json.loads(l) for l in (runs / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2], metrics
    code_reasons = {"n_syntax_error", "n_runtime_error", "n_partial", "n_timeout", "n_memory", "n_output_limit",
                    "n_sandbox_error"}
    seen = {k for m in metrics for k in m if k in code_reasons}
    assert seen, f"no code response was verified: {[sorted(m) for m in metrics]}"
    assert not any(m.get("n_verifier_error") for m in metrics), "a verifier crashed"


def test_code_run_stops_before_any_model_when_bwrap_cannot_run(tmp_path, broken_bwrap):
    runs = tmp_path / "runs"
    out = subprocess.run([sys.executable, "prime_mini.py", "--data", "data/code_problems.jsonl", "--out-dir", str(runs)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert broken_bwrap in out.stderr, f"the probe's own error: {out.stderr}"
    assert "install bubblewrap" in out.stderr and "--sandbox rlimit" in out.stderr, "the fix and the opt-in"
    assert "SFT" not in out.stdout and not runs.exists(), "nothing was trained or written"


def test_weaker_sandbox_runs_only_when_named_and_says_so(broken_bwrap, capsys):
    code = [{"ability": "code"}]
    with pytest.raises(models.ConfigError, match="bwrap cannot run here"):
        tasks.check_sandbox("bwrap", code)
    tasks.check_sandbox("rlimit", code)  # named: goes on, and says what it gives up
    assert "code sandbox: rlimit, as asked" in capsys.readouterr().out
    tasks.check_sandbox("bwrap", [{"ability": "math"}])  # no code rows: nothing to sandbox, nothing to stop
    assert config.parse_config(["--sandbox", "rlimit"]).sandbox == "rlimit"
