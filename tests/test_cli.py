"""Configuration errors, data checks, and an end-to-end run of prime_mini.py through subprocess."""
import json
import os
import subprocess
import sys

import pytest

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
])
def test_invalid_config_names_the_flag(argv, needle):
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(argv)
    assert needle in str(e.value)


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
])
def test_malformed_row_names_file_and_line(tmp_path, line, needle):
    good = '{"prompt": [{"role": "user", "content": "1+1="}], "ability": "math", "reward_model": {"ground_truth": "2"}}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(models.ConfigError) as e:
        tasks.load_rows(str(path))
    assert needle in str(e.value) and str(e.value).startswith(f"{path}:2: ")


def test_malformed_data_stops_before_any_model_is_built(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": "1+1="}]}\n')
    out = subprocess.run([sys.executable, "prime_mini.py", "--data", str(path), "--out-dir", str(tmp_path / "runs")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"{path}:1: missing 'reward_model.ground_truth'" in out.stderr
    assert "SFT" not in out.stdout and not (tmp_path / "runs").exists(), "nothing was trained or written"


def test_end_to_end_micro_run_writes_its_outputs(tmp_path):
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
    # The SFT model is cached: a second run reuses it instead of retraining.
    again = subprocess.run(argv[:5] + ["micro2"] + argv[6:], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "SFT model: reusing" in again.stdout
    again_summary = json.loads((runs / "micro2" / "summary.json").read_text())
    assert again_summary["acc_before"] == summary["acc_before"], "the same cached SFT model, the same eval seed"
    # --model: a saved causal LM folder is the SFT model (here the cached tiny one); no SFT runs.
    sft_dir = json.loads((run / "config.json").read_text())["base_path"]
    argv_model = argv[:5] + ["micro3", "--model", sft_dir] + argv[6:]
    third = subprocess.run(argv_model, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "SFT warm-up" not in third.stdout and "SFT model: reusing" not in third.stdout
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
