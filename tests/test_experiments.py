"""Resume and compare refusing a run made otherwise, the compare table, the token-reward page, logging.

(Resume equal to a straight run, with a prompt buffer and after a kill: tests/test_loop.py.)"""
import dataclasses
import json
import os
import pickle
import re
import shutil
import sys

import pytest
import torch

import checkpoints
import config
import experiments as ex
import models
import prime_mini as pm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-intermediate", "64",
         "--sft-steps", "20", "--sft-batch", "16", "--P", "4", "--K", "2", "--filter-low", "0", "--filter-high", "1",
         "--max-new-tokens", "16", "--micro-batch", "4", "--eval-n", "6", "--eval-samples", "2", "--no-show-progress",
         "--threads", "1", "--reward-pages", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs folder for the micro runs below, so that they share one micro SFT model."""
    return tmp_path_factory.mktemp("runs")


def _run(argv):
    """A run as the command line makes it, in this process (no second start-up of torch and peft)."""
    n = torch.get_num_threads()
    try:
        pm.main(argv)
    finally:
        torch.set_num_threads(n)  # --threads is the run's, not the test session's


def _metrics(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in m.items() if not k.startswith("t_")} for m in rows]  # timings differ


def write_config(run, **changes):
    """A run folder's config.json as `run` writes it (all fields, the base path), with `changes`;
    a change to None removes the field."""
    saved = {**dataclasses.asdict(config.Config()), "base_path": "runs/sft/x", "device_used": "cpu", **changes}
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if v is not None}))


@pytest.mark.parametrize("argv, changes, needle", [
    (["--resume", "/nonexistent/run"], {}, "--resume: /nonexistent/run/config.json not found"),
    (["--lr-policy", "1"], {}, "only --steps, --save-every, --threads, --device, --show-progress may be given, not --lr-policy"),
    ([], {}, "has no complete checkpoint"),
    # Written by an older version: a field missing would silently take today's default.
    ([], {"prm_init": None, "process_coef": None}, "was written by another version of prime_mini.py: it lacks "
                                                   "prm_init, process_coef (today's defaults would stand in"),
    ([], {"kl_coef": 0.1}, "it has kl_coef, which this version does not know"),
    # Edited by hand (the message above asks for it): the types as strictly as the flags, then their ranges.
    ([], {"P": 2.5}, "run/config.json: P must be an integer, got 2.5"),  # ran, and failed mid-run
    ([], {"beta": "0.05"}, "run/config.json: beta must be a number, got '0.05'"),
    ([], {"K": True, "tensorboard": 1}, "run/config.json: K must be an integer, got True; tensorboard must be true or false, got 1"),
    ([], {"data": ["data/arith_rl.jsonl"]}, "run/config.json: data must be a string, got ['data/arith_rl.jsonl']"),
    ([], {"base_path": 3}, "run/config.json: base_path must be a string, got 3"),
    ([], {"P": 0}, "run/config.json: --P: must be >= 1, got 0"),
    ([], {"temperature": float("nan")}, "run/config.json: --temperature: must be a finite number, got nan"),
    ([], {"lora_alpha_ratio": 0.1}, "run/config.json: --lora-alpha-ratio: alpha = ratio × rank must be a whole number"),
    (["--save-every", "-3"], {}, "--save-every: must be >= 0, got -3"),  # an override is checked as a flag
])
def test_resume_refuses_what_it_cannot_do(tmp_path, argv, changes, needle):
    run = tmp_path / "run"
    write_config(run, **changes)
    if "--resume" not in argv:
        argv = ["--resume", str(run)] + argv
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(argv)
    assert needle in str(e.value)


@pytest.mark.parametrize("damage, needle", [
    (lambda text: text[: text.index('"seed"') + 4], "is not a readable JSON file (Unterminated string"),  # cut short
    (lambda text: text.replace('"seed": 0', '"seed": 0,,'), "is not a readable JSON file (Expecting property name"),
    (lambda text: "[" + text + "]", "must hold a JSON object of settings, not a list"),
    (lambda text: text.replace('"out_dir": "runs"', '"out_dir": "r\xe9"'), "is not a readable JSON file ('utf-8' codec"),
])
def test_damaged_config_json_names_the_file(tmp_path, damage, needle):
    write_config(tmp_path / "run", seed=0)
    path = tmp_path / "run" / "config.json"
    path.write_bytes(damage(path.read_text()).encode("latin-1"))
    for call, flag in ((lambda: config.parse_config(["--resume", str(tmp_path / "run")]), "--resume: "),
                       (lambda: ex.check_reusable(str(tmp_path / "run"), config.Config()), "compare: ")):
        with pytest.raises(models.ConfigError) as e:
            call()
        assert str(e.value).startswith(f"{flag}{path} ") and needle in str(e.value), str(e.value)


def test_saved_config_takes_a_whole_number_for_a_float_field(tmp_path):
    """json writes 0.05 as 0.05 and 1.0 as 1.0, but a hand edit may write 1: still a float field."""
    write_config(tmp_path / "run", beta=1)
    cfg, _ = config.saved_config(str(tmp_path / "run"), "")
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)


def test_show_rewards_reads_an_older_config_with_a_warning(tmp_path):
    write_config(tmp_path / "run", prm_init=None)
    with pytest.warns(RuntimeWarning, match="it lacks prm_init"):
        cfg, _ = config.saved_config(str(tmp_path / "run"), "", strict=False)
    assert cfg.prm_init == ""


def test_compare_reuses_a_run_only_if_it_was_made_with_the_same_settings(tmp_path):
    cfg = config.parse_config(["--steps", "30", "--lr-prm", "1e-3"])
    write_config(tmp_path / "same", **{**dataclasses.asdict(cfg), "threads": 1, "show_progress": False})
    ex.check_reusable(str(tmp_path / "same"), cfg)  # how it ran (threads, progress bars) does not matter
    write_config(tmp_path / "other", **{**dataclasses.asdict(cfg), "steps": 20, "process_coef": 1.0})
    with pytest.raises(models.ConfigError, match=r"other settings: steps 20 \(now 30\), process_coef 1.0 \(now 0.5\)"):
        ex.check_reusable(str(tmp_path / "other"), cfg)
    write_config(tmp_path / "old", **{**dataclasses.asdict(cfg), "prm_init": None})
    with pytest.raises(models.ConfigError, match="it lacks prm_init"):
        ex.check_reusable(str(tmp_path / "old"), cfg)


def test_compare_compares_sft_init_as_a_model_not_as_a_path(tmp_path):
    from safetensors.torch import save_file
    for name, value in (("a/0683ff0691", 1.0), ("b/0683ff0691", 1.0), ("c/0683ff0691", 2.0)):
        (tmp_path / name).mkdir(parents=True)
        save_file({"w": torch.full((3,), value)}, str(tmp_path / name / "model.safetensors"))
        shutil.copy(os.path.join(ROOT, "data", "sft", "fe1c94cb56", "config.json"), tmp_path / name / "config.json")
    cfg = config.parse_config(["--sft-init", str(tmp_path / "a" / "0683ff0691")])
    write_config(tmp_path / "copy", **{**dataclasses.asdict(cfg), "sft_init": str(tmp_path / "b" / "0683ff0691")})
    ex.check_reusable(str(tmp_path / "copy"), cfg)  # the same weights in another folder
    write_config(tmp_path / "elsewhere", **{**dataclasses.asdict(cfg), "sft_init": "/gone/runs/sft/0683ff0691"})
    ex.check_reusable(str(tmp_path / "elsewhere"), cfg)  # made in another checkout: the same key
    write_config(tmp_path / "other", **{**dataclasses.asdict(cfg), "sft_init": str(tmp_path / "c" / "0683ff0691")})
    with pytest.raises(models.ConfigError, match="other settings: sft_init"):
        ex.check_reusable(str(tmp_path / "other"), cfg)  # same name, other weights
    write_config(tmp_path / "renamed", **{**dataclasses.asdict(cfg), "sft_init": "/gone/runs/sft/1234567890"})
    with pytest.raises(models.ConfigError, match="other settings: sft_init"):
        ex.check_reusable(str(tmp_path / "renamed"), cfg)


def test_compare_stops_on_a_finished_run_made_with_other_flags_before_running_anything(tmp_path):
    run = tmp_path / "c" / "prime-s0"
    made = config.parse_config(["--seed", "0", "--eval-every", "20", "--steps", "12"])
    write_config(run, **dataclasses.asdict(made))
    (run / "summary.json").write_text("{}")
    with pytest.raises(models.ConfigError, match=rf"prime-s0 was made with other settings: steps 12 \(now {config.Config().steps}\);"):
        ex.compare_main(["--arms", "prime", "--seeds", "1", "--out-dir", str(tmp_path), "--name", "c"], pm.run)
    with pytest.raises(models.ConfigError, match="compare sets --seed for each run itself"):
        ex.compare_main(["--arms", "prime", "--seed", "1", "--out-dir", str(tmp_path), "--name", "c"], pm.run)


@pytest.mark.parametrize("argv, needle", [
    (["--arms", "prime,prime"], "--arms: prime given twice; name each arm once"),  # the spread of one arm counted twice
    (["--arms", "prime,outcome,x:beta=0.1,x:beta=0.2"], "--arms: x given twice"),
    (["--arms", "a/b:beta=0.1"], "--arms: arm name 'a/b' must be letters, digits and _ . + - only"),
    (["--arms", ":beta=0.1"], "--arms: arm name '' must be"),
    (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
    (["--seeds", "-2"], "--seeds: must be >= 1, got -2"),
    (["--window", "0"], "--window: must be >= 1, got 0"),  # a ZeroDivisionError after every run had finished
    (["--window", "-1"], "--window: must be >= 1, got -1"),
    (["--eval-every", "-5"], "--eval-every: must be >= 0, got -5"),
])
def test_compare_refuses_bad_arguments_before_running_anything(tmp_path, argv, needle):
    def no_run(cfg):
        raise AssertionError("compare ran an arm")
    with pytest.raises(models.ConfigError) as e:
        ex.compare_main(argv + ["--out-dir", str(tmp_path), "--name", "c"], no_run)
    assert needle in str(e.value)
    assert not (tmp_path / "c").exists(), "no folder was made"


def test_prompt_stream_state_round_trips_mid_epoch():
    a = pm.PromptStream(7, seed=3)
    first = [a.next() for _ in range(10)]
    assert sorted(first[:7]) == list(range(7)), "an epoch visits every prompt once"
    st = pickle.loads(pickle.dumps(a.state()))  # as torch.save stores it in a checkpoint
    b = pm.PromptStream(7, seed=99)
    b.load_state(st)
    assert [a.next() for _ in range(12)] == [b.next() for _ in range(12)]


def _fake(accs, t_step, acc_before=0.4, acc_after=0.5):
    return {"metrics": [{"step": i + 1, "acc": a, "t_step": t_step} for i, a in enumerate(accs)],
            "summary": {"acc_before": acc_before, "acc_after": acc_after, "greedy_before": 0.6,
                        "greedy_after": 0.65, "steps": len(accs)}}


def test_compare_table_steps_to_target_and_ratios_by_hand():
    # outcome: acc = s/20, window 2: final = (19/20 + 20/20)/2 = 0.975; its trailing mean at step s
    # is (s - 0.5)/20, which first reaches 0.975 at s = 20. prime: acc = min(1, s/10): the trailing
    # mean is 0.95 at s = 10 and 1.0 at s = 11. Efficiency 20/11; time ratio 1.3/1.0.
    results = {"prime": [_fake([min(1, s / 10) for s in range(1, 21)], 1.3)],
               "outcome": [_fake([s / 20 for s in range(1, 21)], 1.0)]}
    table, target = ex.compare_table(results, "outcome", window=2)
    assert target == pytest.approx(0.975)
    assert table["outcome"]["steps_to_target"] == 20 and table["prime"]["steps_to_target"] == 11
    assert table["prime"]["efficiency"] == pytest.approx(20 / 11) and table["outcome"]["efficiency"] == 1.0
    assert table["prime"]["t_ratio"] == pytest.approx(1.3)
    md = ex.compare_markdown(table, "outcome", target, 2)
    assert "| prime | 1 | 1.000 ± 0.000 |" in md and "| 11 | 1.82x |" in md


def test_compare_table_means_over_seeds_and_reports_not_reached():
    results = {"outcome": [_fake([0.5] * 4, 1.0, acc_after=0.6), _fake([0.7] * 4, 1.0, acc_after=0.7)],
               "prime": [_fake([0.1] * 4, 2.0), _fake([0.2] * 4, 2.0)]}
    table, target = ex.compare_table(results, "outcome", window=2)
    assert target == pytest.approx(0.6)
    assert table["outcome"]["acc_after"][0] == pytest.approx(0.65)
    assert table["prime"]["steps_to_target"] is None and table["prime"]["efficiency"] is None
    assert "not reached" in ex.compare_markdown(table, "outcome", target, 2)


def test_compare_table_says_when_it_cuts_seeds_to_the_shortest_curve():
    results = {"outcome": [_fake([0.5] * 4, 1.0), _fake([0.7] * 3, 1.0)]}
    with pytest.warns(RuntimeWarning, match="outcome: the seeds' curves have 4, 3 steps; all are cut to the shortest"):
        table, _ = ex.compare_table(results, "outcome", window=2)
    assert len(table["outcome"]["curve"]) == 3


def test_arm_flags_named_and_custom_arms():
    assert ex.arm_flags("outcome") == ("outcome", ["--reward-mode", "outcome"])
    assert ex.arm_flags("zero-prm") == ("zero-prm", ["--prm-update", "none"])
    assert ex.arm_flags("offline:prm-init=r/adapters/prm:prm-update=none") == \
        ("offline", ["--prm-init", "r/adapters/prm", "--prm-update", "none"])
    assert ex.arm_flags("coef1:process-coef=1.0:faithful") == ("coef1", ["--process-coef", "1.0", "--faithful"])
    with pytest.raises(models.ConfigError, match="unknown arm 'nope'"):
        ex.arm_flags("nope")


def test_reward_page_colours_by_sign_and_shows_the_sum():
    groups = [{"prompt": "<bos>1+2=", "answer": "3", "responses": [
        {"tokens": ["3", "&", "<eos>"], "r": [0.2, -0.1, 0.0], "r_o": 1.0},
        {"tokens": ["4"], "r": [-0.3], "r_o": 0.0}]}]
    page = ex.reward_page_html(groups, 0.05, "t")
    spans = re.findall(r'<span class="t" style="background:rgba\(([\d,]+),([\d.]+)\)" title="([^"]+)">([^<]*)</span>', page)
    assert [(s[3], float(s[2])) for s in spans] == [("3", 0.2), ("&amp;", -0.1), ("&lt;eos&gt;", 0.0), ("4", -0.3)]
    assert spans[0][0] == "0,150,60" and spans[1][0] == "215,40,40", "green credits, red blames"
    assert float(spans[3][1]) == 1.0 and float(spans[0][1]) < 1.0, "the largest |reward| is full colour"
    assert re.findall(r'class="sum">([^<]+)<', page) == ["+0.100", "-0.300"]
    assert "&lt;bos&gt;1+2=" in page and "✓" in page and "✗" in page


def test_run_writes_a_reward_page_and_show_rewards_rebuilds_it(tmp_path, runs):
    _run(MICRO + ["--out-dir", str(runs), "--run-name", "r", "--steps", "2"])
    page = (runs / "r" / "rewards.html").read_text()
    assert page.count('class="g"') == 2 and page.count('class="resp"') == 2 * 2, "2 prompts x K=2 responses"
    for resp, total in zip(re.findall(r'<div class="resp">(.*?)</div>', page), re.findall(r'class="sum">([^<]+)<', page)):
        values = [float(v) for v in re.findall(r'title="([^"]+)"', resp)]
        assert values and sum(values) == pytest.approx(float(total), abs=1e-3), "Σ is the sum of the token rewards"
    out = tmp_path / "again.html"
    ex.show_rewards_main([str(runs / "r"), "--prompts", "1", "--out", str(out)])
    assert out.read_text().count('class="resp"') == 2


def test_tensorboard_asked_for_but_not_installed_is_said_not_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.warns(RuntimeWarning, match="tensorboard is not installed, so no event files are written"):
        log, close = checkpoints.make_logger(config.Config(), str(tmp_path), 0)
    log({"step": 1, "acc": 0.5})
    close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "acc": 0.5}


def test_tensorboard_events_hold_the_metrics_when_installed(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _run(MICRO + ["--out-dir", str(runs), "--run-name", "tb", "--steps", "2", "--reward-pages", "0"])
    ev = EventAccumulator(str(runs / "tb"))
    ev.Reload()
    metrics = _metrics(runs / "tb")
    for key in ("acc", "prm_loss", "pg_loss"):
        assert [(e.step, round(e.value, 5)) for e in ev.Scalars(key)] == [(m["step"], round(m[key], 5)) for m in metrics]


def test_compare_table_averages_the_prms_step_f1_over_the_last_window_and_seeds():
    a, b = _fake([0.5] * 4, 1.0), _fake([0.5] * 4, 1.0)
    for r, f1s in ((a, [0.9, 0.1, 0.2, 0.4]), (b, [0.9, 0.9, 0.6, 0.8])):
        for m, f1 in zip(r["metrics"], f1s):
            m.update(step_f1=f1, step_auroc=0.5 + f1 / 10)
    table, target = ex.compare_table({"prime": [a, b], "outcome": [_fake([0.5] * 4, 1.0)]}, "outcome", window=2)
    assert table["prime"]["step_f1"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.8) / 4)
    assert table["outcome"]["step_f1"] is None
    md = ex.compare_markdown(table, "outcome", target, 2)
    assert "| 0.500 / 0.550 |" in md and md.splitlines()[-1].endswith("| - | - |")


def test_named_arms_for_process_ground_truth():
    assert ex.arm_flags("oracle") == ("oracle", ["--reward-mode", "oracle"])
    assert ex.arm_flags("min-form") == ("min-form", ["--process-credit", "min"])
    for name in ("oracle", "min-form"):
        config.parse_config(ex.ARMS[name])  # each is a valid configuration


def test_reward_page_underlines_the_true_first_wrong_step_and_says_what_the_prm_blames():
    groups = [{"prompt": "1+2+3=", "answer": "6", "responses": [
        {"tokens": list("1+2=4;4+3=7;"), "r": [0.0] * 12, "r_o": 0.0, "first_error": (0, 6),
         "truth": "first wrong step 1; PRM blames none"}]}]
    page = ex.reward_page_html(groups, 0.05, "t")
    underlined = re.findall(r'<span class="t fe"[^>]*>([^<]*)</span>', page)
    assert "".join(underlined) == "1+2=4;"
    assert "first wrong step 1; PRM blames none" in page


# ---------------------------------------------------------------------------------------------
# Nothing lost: an existing run folder is refused, files are replaced whole, resume checks its base
# ---------------------------------------------------------------------------------------------
class Stop(Exception):
    """Raised by a stand-in to stop run() at the point a test looks at."""


def test_a_new_run_refuses_an_existing_run_folder_before_building_anything(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_config(runs / "r")
    (runs / "r" / "metrics.jsonl").write_text('{"step": 1, "acc": 0.5}\n' * 30)
    flags = ["--out-dir", str(runs), "--run-name", "r"]
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(flags)
    assert f"--run-name: {runs / 'r'} exists already" in str(e.value) and "it has no checkpoint to resume from" in str(e.value)
    (runs / "r" / "checkpoint-000020").mkdir()
    with pytest.raises(models.ConfigError, match=re.escape(f"continue it with --resume {runs / 'r'}, or choose another --run-name")):
        config.parse_config(flags)
    # run() called with a Config (compare, bench.py, tests) refuses it too, before the SFT warm-up.
    monkeypatch.setattr(pm, "sft_warmup", lambda cfg, device: pytest.fail("the SFT warm-up ran"))
    with pytest.raises(models.ConfigError, match="exists already"):
        pm.run(config.Config(out_dir=str(runs), run_name="r", show_progress=False))
    assert len((runs / "r" / "metrics.jsonl").read_text().splitlines()) == 30, "the old run is untouched"
    (runs / "empty").mkdir()  # an empty folder holds nothing to lose
    assert config.parse_config(["--out-dir", str(runs), "--run-name", "empty"]).run_name == "empty"
    assert config.parse_config(flags + ["--plan-memory"]).plan_memory, "--plan-memory writes no run folder"


def fake_run(calls):
    """A stand-in for prime_mini.run that writes what compare reads (2 steps) and records its Config."""
    def run(cfg):
        run_dir = cfg.resume or config.new_run_dir(cfg)  # as the real run: refuses a folder in use
        calls.append(cfg)
        os.makedirs(run_dir, exist_ok=True)
        if not cfg.resume:
            checkpoints.write_json(os.path.join(run_dir, "config.json"), {**dataclasses.asdict(cfg), "base_path": "b"})
        (open(os.path.join(run_dir, "metrics.jsonl"), "w")
         .write("".join(json.dumps({"step": s, "acc": 0.5, "t_step": 1.0}) + "\n" for s in (1, 2))))
        checkpoints.write_json(os.path.join(run_dir, "summary.json"), {
            "acc_before": 0.4, "acc_after": 0.5, "greedy_before": 0.4, "greedy_after": 0.5, "steps": 2})
        return None, run_dir
    return run


def test_compare_restarts_a_run_stopped_before_its_first_checkpoint_and_resumes_one_with_a_cut_summary(tmp_path, capsys):
    common = ["--steps", "2", "--threads", "1", "--no-tensorboard"]
    argv = ["--arms", "prime", "--seeds", "3", "--out-dir", str(tmp_path), "--name", "c", "--window", "2"] + common

    def made(seed):  # the run folder of seed `seed` as compare's own run made it
        cfg = config.parse_config(common + ["--seed", str(seed), "--eval-every", "20", "--threads", "4",
                                            "--out-dir", str(tmp_path), "--run-name", f"c/prime-s{seed}"])
        write_config(tmp_path / "c" / f"prime-s{seed}", **dataclasses.asdict(cfg))
        return tmp_path / "c" / f"prime-s{seed}"
    killed = made(0)  # killed during the evaluation before RL: config.json only
    (killed / "metrics.jsonl").write_text("")
    cut = made(1)  # killed while writing summary.json, after its last checkpoint
    (cut / "checkpoint-000002").mkdir()
    (cut / "summary.json").write_text('{"acc_before": 0.4, "acc_af')
    calls = []
    with pytest.warns(RuntimeWarning, match=r"prime-s1/summary.json does not parse .*: the run is treated as unfinished"):
        ex.compare_main(argv, fake_run(calls))
    assert f"{killed} stopped before its first checkpoint (nothing to resume from): starting it again" in capsys.readouterr().out
    assert [(c.seed, c.resume) for c in calls] == [(0, ""), (1, str(cut)), (2, "")], "restart, resume, new"
    assert calls[1].threads == 1, "the resumed run takes this compare's --threads, not the killed one's"
    assert json.load(open(tmp_path / "c" / "compare.json"))["arms"]["prime"]["seeds"] == 3
    calls.clear()
    ex.compare_main(argv, fake_run(calls))  # run again: every run is finished and reused
    assert calls == []


def test_json_files_are_replaced_whole_and_hold_null_where_a_value_was_nan(tmp_path):
    path = tmp_path / "summary.json"
    checkpoints.write_json(str(path), {"acc": 0.5, "auroc": float("nan"), "xs": [float("inf"), 1.0]})
    strict = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a JSON file"))
    assert strict == {"acc": 0.5, "auroc": None, "xs": [None, 1.0]}
    with pytest.raises(TypeError):  # a failure half-way through: the old file stays whole
        checkpoints.write_json(str(path), {"acc": 0.7, "bad": object()})
    assert json.loads(path.read_text())["acc"] == 0.5 and os.listdir(tmp_path) == ["summary.json"]
    # metrics.jsonl: a skipped step's NaN length is null, and compare's table leaves it out.
    log, close = checkpoints.make_logger(config.Config(tensorboard=False), str(tmp_path), 0)
    for s, f1 in ((1, 0.2), (2, float("nan")), (3, 0.6)):
        log({"step": s, "acc": 0.5, "len": float("nan"), "t_step": 1.0, "step_f1": f1, "step_auroc": f1})
    close()
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(c)) for x in (tmp_path / "metrics.jsonl").open()]
    assert [m["step_f1"] for m in lines] == [0.2, None, 0.6] and lines[0]["len"] is None
    summary = {"acc_before": 0.4, "acc_after": 0.5, "greedy_before": 0.4, "greedy_after": 0.5, "steps": 3}
    table, _ = ex.compare_table({"prime": [{"metrics": lines, "summary": summary}]}, "prime", window=3)
    assert table["prime"]["step_f1"] == pytest.approx(0.4) and table["prime"]["step_auroc"] == pytest.approx(0.4)


def test_a_checkpoint_whose_state_runs_code_is_refused_unread(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint-000001"
    ckpt.mkdir()
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"step": 1, "x": Hostile()}, str(ckpt / "state.pt"))
    monkeypatch.setattr(checkpoints, "load_adapters", lambda model, folder: None)
    with pytest.raises(models.ConfigError, match=r"state.pt holds objects other than tensors.*refused, nothing in it "
                                                 r"was run \(.*GLOBAL posix.system"):
        checkpoints.load_checkpoint(str(ckpt), None, None, None)
    assert not marker.exists(), "the pickled command did not run"


def test_resume_stops_when_the_base_it_was_trained_on_is_gone_or_is_not_what_its_settings_give(tmp_path, monkeypatch):
    import sft
    runs = tmp_path / "runs"
    run = runs / "r"
    key = sft.sft_key(config.Config())
    write_config(run, out_dir=str(runs), base_path=str(runs / "sft" / key), show_progress=False)
    (run / "checkpoint-000002").mkdir()
    cfg = config.parse_config(["--resume", str(run)])
    monkeypatch.setattr(pm, "sft_warmup", lambda cfg, device: pytest.fail("the SFT model was trained again"))
    with pytest.raises(models.ConfigError, match=rf"the SFT model the run was trained on \({runs / 'sft' / key}\) is gone"):
        pm.run(cfg)
    (runs / "sft" / key).mkdir(parents=True)
    (runs / "sft" / key / "done").write_text("{}")
    assert pm.resumed_base(cfg) == str(runs / "sft" / key)
    shipped = os.path.join(sft.SHIPPED_SFT, key)  # a run that started from the shipped model goes on with it
    write_config(run, out_dir=str(runs), base_path=shipped, show_progress=False)
    assert pm.resumed_base(config.parse_config(["--resume", str(run)])) == shipped
    write_config(run, out_dir=str(runs), base_path=str(runs / "sft" / "0123456789"))  # other SFT settings
    with pytest.raises(models.ConfigError, match=r"trained on the SFT model .*0123456789', but its settings give"):
        pm.resumed_base(config.parse_config(["--resume", str(run)]))
    write_config(run, out_dir=str(runs), model="some/model", base_path="other/model")
    with pytest.raises(models.ConfigError, match="says the run was trained on 'other/model', but its model is 'some/model'"):
        pm.resumed_base(config.Config(**{**dataclasses.asdict(cfg), "model": "some/model"}))


def test_the_sft_warm_up_leaves_the_cpu_and_every_cuda_rng_as_they_were(tmp_path, monkeypatch):
    """The warm-up seeds its own RNGs (torch.manual_seed seeds CUDA too): run() restores what it
    drew before, on the CPU and on each CUDA device, so a cold run samples as a cached one. CUDA is
    a stand-in here: one device whose RNG state the warm-up changes."""
    cuda = {0: torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda[int(device)].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": cuda.__setitem__(int(device), state))

    def warmup(cfg, device):
        torch.manual_seed(cfg.sft_seed + 99)
        cuda[0] = torch.tensor([2], dtype=torch.uint8)
        return "sft-model"
    seen = {}

    def load_base(path, device, cfg):
        seen.update(cpu=torch.get_rng_state(), cuda=cuda[0].clone())
        raise Stop
    monkeypatch.setattr(pm, "sft_warmup", warmup)
    monkeypatch.setattr(pm, "load_base", load_base)
    with pytest.raises(Stop):
        pm.run(config.Config(out_dir=str(tmp_path), device="cpu", show_progress=False, seed=5))
    assert torch.equal(seen["cpu"], torch.manual_seed(5).get_state()), "the CPU RNG as run() seeded it"
    assert seen["cuda"].tolist() == [1], "the CUDA RNG as it was before the warm-up"
