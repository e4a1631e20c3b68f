"""Chain length, the difficulty knob of the embedded task: its data, its SFT curriculum, the step
labels at every length, and `sweep` (a compare per length, one table and one figure)."""
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))

import experiments  # noqa: E402
import generate  # noqa: E402  (data/generate.py)
import steps  # noqa: E402
from config import Config, parse_config  # noqa: E402
from models import ConfigError  # noqa: E402

MICRO = ["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-intermediate", "64",
         "--sft-steps", "10", "--sft-batch", "16", "--sft-target", "0", "--P", "2", "--K", "2", "--filter-low", "0",
         "--filter-high", "1", "--micro-batch", "4", "--eval-n", "4", "--eval-samples", "2", "--no-show-progress",
         "--threads", "1", "--reward-pages", "0", "--truth-prompts", "2", "--no-tensorboard"]


def test_the_default_task_is_the_four_step_chain():
    d = Config()
    files = experiments.chain_files(4)
    assert (files["rl"], files["test"], files["sft"], files["val"]) == (d.data, d.test_data, d.sft_data, d.sft_val_data)
    assert experiments.chain_tokens(4) == d.max_new_tokens and experiments.chain_flags(4) == []
    with pytest.raises(ConfigError, match="starts from scratch"):
        experiments.chain_flags(4, "runs/sft/x")


@pytest.mark.parametrize("n_ops", [1, 2, 8, 16, 24])
def test_worked_solutions_of_every_length_are_labelled_right_and_fit_the_response_length(n_ops):
    rng = random.Random(n_ops)
    for _ in range(300):
        prompt, solution, answer = generate.make_problem(rng, n_ops, 10, 99, 19)
        labels = steps.label_steps(prompt, solution)
        assert labels.ok and labels.correct and labels.n_expected == n_ops and len(labels.steps) == n_ops
        assert len(solution) + 1 <= experiments.chain_tokens(n_ops), (solution, n_ops)  # + EOS, one token a character
        # A wrong result in step k (the rest of the solution unchanged): step k is the first wrong one.
        k = rng.randrange(n_ops)
        a, b = labels.steps[k].span
        piece = solution[a:b]
        c = piece[piece.index("=") + 1:-1]
        bad = solution[:a] + piece[:piece.index("=") + 1] + str(int(c) + 1) + ";" + solution[b:]
        wrong = steps.label_steps(prompt, bad)
        assert wrong.first_wrong == k and not wrong.steps[k].right


def test_chain_flags_give_a_run_the_lengths_files_and_response_length():
    cfg = parse_config(experiments.chain_flags(16) + ["--plan-memory"])  # --plan-memory: no data file needed
    assert cfg.data == "data/arith16_rl.jsonl" and cfg.test_data == "data/arith16_test.jsonl"
    assert cfg.sft_data == "data/arith16_sft.jsonl" and cfg.sft_val_data == "data/arith16_val.jsonl"
    assert cfg.max_new_tokens == 208


def test_sft_init_is_checked_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError, match="--sft-init: .*config.json not found"):
        parse_config(["--sft-init", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 3,
                                                      "num_attention_heads": 4, "intermediate_size": 512}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="hidden_size = 64, this run's tiny model 128"):
        parse_config(["--sft-init", str(tmp_path)])


def test_sweep_table_pairs_seeds_and_counts_steps_by_hand():
    def seed(accs, before, after, evals=()):
        metrics = [{"step": i + 1, "acc": a} for i, a in enumerate(accs)]
        for step, acc in evals:
            metrics[step - 1]["eval_acc"] = acc
        return {"metrics": metrics, "summary": {"acc_before": before, "acc_after": after, "greedy_before": before,
                                                "greedy_after": after + 0.1, "steps": len(accs)}}
    results = {8: {"outcome": [seed([0.2, 0.4, 0.6, 0.6], 0.3, 0.5, [(2, 0.4)]),
                               seed([0.2, 0.2, 0.4, 0.6], 0.3, 0.6, [(2, 0.5)])],
                   "oracle": [seed([0.4, 0.6, 0.6, 0.6], 0.3, 0.7, [(2, 0.6)]),
                              seed([0.2, 0.6, 0.6, 0.6], 0.3, 0.5, [(2, 0.5)])]}}
    t = experiments.sweep_table(results, "outcome", window=1)[8]
    assert t["ref_final_reward"] == pytest.approx(0.6) and t["ref_final_acc"] == pytest.approx(0.55)
    o, r = t["arms"]["outcome"], t["arms"]["oracle"]
    assert o["steps_reward"] == [3, 4] and r["steps_reward"] == [2, 2]
    assert r["eff_reward"][0] == pytest.approx((3 / 2 + 4 / 2) / 2)  # per seed: outcome's steps / oracle's
    # outcome's final held-out accuracy, 0.55: outcome seed 0 never reaches it (0.4, then 0.5), seed 1 at
    # the end (step 4); oracle seed 0 at its step-2 evaluation, seed 1 never. No seed has both: no ratio.
    assert o["steps_acc"] == [None, 4] and r["steps_acc"] == [2, None]
    assert r["eff_acc"][0] is None
    # Δ: outcome +0.2, +0.3; oracle +0.4, +0.2 -> gains +0.2, -0.1 (paired by seed)
    assert r["gain"][0] == pytest.approx(0.05) and r["gain"][1] == pytest.approx(0.2121, abs=1e-4)
    md = experiments.sweep_markdown({8: t}, "outcome", 1)
    assert "| 8 | oracle | 2 |" in md and "1.75 ± 0.35 (n=2)x" in md and "| 2, >4 |" in md


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """One --out-dir for the sweep and chain tests below: their SFT models of seed 0 are shared."""
    return tmp_path_factory.mktemp("chains")


def test_sweep_runs_every_length_and_draws_the_figure(sft_dir):
    tmp_path = sft_dir
    import prime_mini
    argv = ["sweep", "--lengths", "2,5", "--arms", "outcome,oracle", "--seeds", "1", "--name", "sw",
            "--out-dir", str(tmp_path), "--eval-every", "1", "--window", "1", "--steps", "2"] + MICRO
    prime_mini.main(argv)
    folder = tmp_path / "sw"
    for n in (2, 5):
        for arm in ("outcome", "oracle"):
            for s in (0,):
                cfg = json.load(open(folder / f"len{n}" / f"{arm}-s{s}" / "config.json"))
                assert cfg["data"] == f"data/arith{n}_rl.jsonl" and cfg["max_new_tokens"] == 12 * n + 16
                assert cfg["reward_mode"] == arm and cfg["seed"] == s
    cfg5 = json.load(open(folder / "len5" / "oracle-s0" / "config.json"))
    cfg2 = json.load(open(folder / "len2" / "oracle-s0" / "config.json"))
    assert cfg2["sft_init"] == ""  # up to 4 steps from scratch
    assert cfg5["sft_init"] and os.path.basename(cfg5["sft_init"]) == os.path.basename(  # 5 starts from 4's model
        experiments.chain_sft([4], 0, MICRO, str(tmp_path))[4][1])
    models_ = experiments.chain_sft([5, 6], 0, MICRO, str(tmp_path))  # as sweep --lengths 6 --via 5
    assert os.path.basename(models_[6][0][-1]) == os.path.basename(models_[5][1]), "6 starts from 5's model"
    out = json.load(open(folder / "sweep.json"))
    assert sorted(out["lengths"]) == ["2", "5"] and os.path.getsize(folder / "sweep.png") > 0
    assert "| 5 | oracle | 1 |" in open(folder / "sweep.md").read()
    # Again: every run is reused, nothing is trained (the figure is redrawn from the same runs).
    mtime = os.path.getmtime(folder / "len5" / "oracle-s0" / "summary.json")
    prime_mini.main(argv)
    assert os.path.getmtime(folder / "len5" / "oracle-s0" / "summary.json") == mtime
    # An arm not finished at a length is left out there only (the reference's runs are there).
    os.remove(folder / "len5" / "oracle-s0" / "summary.json")
    prime_mini.main(argv + ["--report-only"])
    out = json.load(open(folder / "sweep.json"))
    assert list(out["lengths"]["5"]["arms"]) == ["outcome"] and list(out["lengths"]["2"]["arms"]) == ["outcome", "oracle"]
    # --merge: the lengths of an earlier sweep.json that this folder has no runs of join the table.
    earlier = {**out, "lengths": {"2": "not taken: this folder has length 2", "9": out["lengths"]["2"]}}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    prime_mini.main(argv + ["--report-only", "--merge", str(tmp_path / "earlier.json")])
    merged = json.load(open(folder / "sweep.json"))
    assert sorted(merged["lengths"], key=int) == ["2", "5", "9"] and merged["lengths"]["2"] == out["lengths"]["2"]
    assert merged["lengths"]["9"] == out["lengths"]["2"] and merged["merged"] == {"9": str(tmp_path / "earlier.json")}
    assert "| 9 | oracle | 1 |" in open(folder / "sweep.md").read()
    with pytest.raises(ConfigError, match="--merge: .* with --window 1, this sweep against --ref outcome with --window 3"):
        experiments.sweep_main(argv[1:-len(MICRO) - 2] + ["--window", "3", "--steps", "2"] + MICRO + [
            "--report-only", "--merge", str(tmp_path / "earlier.json")], prime_mini.run)


def test_chain_builds_each_sft_seeds_model_and_prints_its_band_and_run_flags(sft_dir, capsys):
    tmp_path = sft_dir
    rows = experiments.chain_main(["--n-ops", "5", "--sft-seeds", "0,1", "--out-dir", str(tmp_path)] + MICRO)
    assert [r[0] for r in rows] == [0, 1] and all(r[1] == 10 for r in rows)  # --sft-steps 10, no stopping rule
    assert rows[0][4] != rows[1][4] and all(os.path.exists(os.path.join(r[4], "done")) for r in rows)
    for _, _, sampled, greedy, _, _ in rows:
        assert 0.0 <= sampled <= 1.0 and 0.0 <= greedy <= 1.0
    out = capsys.readouterr().out
    assert "band over 2 SFT seeds" in out and "| 1 | 10 |" in out
    flags = out.split("python prime_mini.py ")[-1].split()
    cfg = parse_config(flags + ["--run-name", "x"])  # the printed command is a run of 5 steps on that model
    assert cfg.data == "data/arith5_rl.jsonl" and cfg.max_new_tokens == 76
    import sft  # the printed run's settings give the 5-step model (its --sft-init is the 4-step one it started from)
    assert sft.sft_path(cfg) == rows[0][4] and cfg.sft_init != rows[0][4]
    assert cfg.tiny_hidden == 32


def test_generate_writes_whole_files_under_their_names_only(tmp_path):
    """data/generate.py writes each split through a temporary file renamed into place (two sweeps
    of one length started together read a whole file or none; before, one read the other's
    half-written file): only the four files are left, every line JSON, the same as a second
    generation's."""
    argv = [sys.executable, os.path.join(ROOT, "data", "generate.py"), "--n-ops", "3", "--n-sft", "30", "--n-rl", "20",
            "--n-test", "5", "--n-val", "5", "--name", "g", "--out"]
    for d in ("a", "b"):
        os.makedirs(tmp_path / d)
        subprocess.run(argv + [str(tmp_path / d)], check=True, capture_output=True)
    assert sorted(os.listdir(tmp_path / "a")) == ["g_rl.jsonl", "g_sft.jsonl", "g_test.jsonl", "g_val.jsonl"]
    for name in os.listdir(tmp_path / "a"):
        text = open(tmp_path / "a" / name).read()
        assert text == open(tmp_path / "b" / name).read(), "deterministic: a file that exists is the one it would write"
        assert all(json.loads(line) for line in text.splitlines())
    assert len(open(tmp_path / "a" / "g_rl.jsonl").read().splitlines()) == 20
