"""veRL 0.6.1's own code on an export (optional: needs a separate Python with veRL installed,
docs/SCALING.md "veRL's own pieces on the CPU"). Skipped, saying why, where there is none; `.ci/run`
does not install veRL. Point PRIME_MINI_VERL_PYTHON at that Python (default /work/verl-venv/bin/python)."""
import json
import os
import subprocess

import pytest

import models
import tasks
import verl_export

HERE = os.path.dirname(os.path.abspath(__file__))
VERL_PYTHON = os.environ.get("PRIME_MINI_VERL_PYTHON", "/work/verl-venv/bin/python")


def verl_python():
    if not os.path.exists(VERL_PYTHON):
        pytest.skip(f"no Python with veRL 0.6.1 at {VERL_PYTHON} (set PRIME_MINI_VERL_PYTHON; docs/SCALING.md)")
    got = subprocess.run([VERL_PYTHON, "-c", "import verl; print(verl.__version__)"], capture_output=True, text=True)
    if got.returncode or got.stdout.strip() != "0.6.1":
        pytest.skip(f"{VERL_PYTHON} has no veRL 0.6.1: {(got.stdout + got.stderr).strip()[-200:]}")
    return VERL_PYTHON


def head(src, n, dst):
    with open(os.path.join(os.path.dirname(HERE), src)) as f, open(dst, "w") as g:
        g.writelines(f.readlines()[:n])
    return str(dst)


def test_verl_loads_the_export_and_scores_with_its_reward_function(tmp_path):
    """RLHFDataset renders each exported prompt to the text our run feeds the model; the
    PrimeRewardManager, with compute_score loaded by veRL's get_custom_reward_fn, gives 1/0/0 on a
    right, a wrong and a malformed response, at each response's last token."""
    python = verl_python()
    from transformers import Qwen2Config
    model = tmp_path / "model"
    tok = models.build_chat_tokenizer([tasks.SYSTEM_PROMPT, tasks.TASK_SUFFIX["math"], "What is 12 + 25?"] * 5)
    tok.save_pretrained(model)
    Qwen2Config(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                rope_parameters={"rope_theta": 123456.0, "rope_type": "default"}).save_pretrained(model)
    data = head("data/add_rl.jsonl", 20, tmp_path / "add.jsonl")
    out = verl_export.export_main(["--out", str(tmp_path / "out"), "--model", str(model), "--data", data,
                                   "--test-data", head("data/add_test.jsonl", 5, tmp_path / "t.jsonl"), "--P", "4"])
    rows = tasks.load_rows(data)
    gt = rows[0]["reward_model"]["ground_truth"]
    cases = [(f"so \\boxed{{{gt}}}", 0), (f"so \\boxed{{{int(gt) + 1}}}", 0), ("\\boxed{" + "{" * 50, 0)]
    json.dump({"responses": cases}, open(tmp_path / "expected.json", "w"))
    got = subprocess.run([python, os.path.join(HERE, "verl_checks.py"), out, str(model), str(tmp_path / "expected.json")],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    found = json.loads(got.stdout.strip().splitlines()[-1])
    assert found["n_rows"] == len(rows)
    # veRL 0.6.1 needs transformers 4.x, which cannot read the tokenizer_class "TokenizersBackend" that
    # this project's transformers 5 writes, and reads 5's rope_parameters as the default base 10000:
    # the export's model/ copy (verl_export.verl_readable) is what the launch loads, and 4.x reads it alike.
    assert found["loaded_from"] == os.path.join(out, "model")
    assert found["auto_tokenizer"] == "ok" and found["rope_theta"] == 123456.0, found
    ours = [tasks.prompt_text(tok, r["prompt"], r.get("ability")) for r in rows]  # what a run feeds the model
    assert found["prompts"] == ours, (found["prompts"][0], ours[0])
    assert found["scores"] == [1.0, 0.0, 0.0], found
    assert found["at_last_token"][0] == found["lengths"][0] - 1, found


VERL_CHECKOUT = os.environ.get("PRIME_MINI_VERL_CHECKOUT", "/work/verl-0.6.1")


@pytest.mark.parametrize("flags", [[], ["--faithful"], ["--reward-mode", "outcome", "--K", "8"]],
                         ids=["tiny", "faithful", "outcome-k8"])
def test_the_launch_overrides_compose_against_the_recipes_config(tmp_path, flags):
    """run_prime.sh's Hydra overrides, composed by veRL 0.6.1's Hydra against a v0.6.1 checkout's
    recipe/prime/config/prime_trainer.yaml (over verl/trainer/config, as the recipe's entry point
    composes it): no key is unknown, and each reads back as the value the script set. A made-up key
    makes the same composition stop (the check can fail)."""
    python = verl_python()
    if not os.path.exists(os.path.join(VERL_CHECKOUT, "recipe", "prime", "config", "prime_trainer.yaml")):
        pytest.skip(f"no veRL v0.6.1 checkout with recipe/prime at {VERL_CHECKOUT} (set PRIME_MINI_VERL_CHECKOUT: "
                    "git clone --branch v0.6.1 https://github.com/volcengine/verl)")
    from test_verl_export import run_script
    data = head("data/arith_rl.jsonl", 40, tmp_path / "arith.jsonl")
    out = verl_export.export_main(["--out", str(tmp_path / "out"), "--data", data, "--test-data",
                                   head("data/arith_test.jsonl", 10, tmp_path / "t.jsonl"), "--P", "4"] + flags)
    proc, launch = run_script(out, tmp_path)
    assert proc.returncode == 0, proc.stderr
    overrides = launch["argv"][1:]  # after prime_mini_main.py
    assert len(overrides) > 40

    def compose(items):
        path = tmp_path / "overrides.json"
        json.dump(items, open(path, "w"))
        got = subprocess.run([python, os.path.join(HERE, "verl_compose.py"), VERL_CHECKOUT, str(path)],
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr[-3000:]
        return json.loads(got.stdout.strip().splitlines()[-1])
    found = compose(overrides)
    assert found["ok"] and found["checked"] == len(overrides) and found["differ"] == [], found
    bad = compose(overrides + ["algorithm.no_such_setting=1"])
    assert not bad["ok"] and "algorithm.no_such_setting" in bad["error"], bad
