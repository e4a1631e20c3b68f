"""bench.py: the table's medians against a hand computation, and a micro run end to end."""
import importlib.util
import os
import subprocess
import sys

import pytest

import bench
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summarize_takes_per_step_medians_and_other_is_step_minus_phases():
    steps = [
        {"t_step": 2.0, "t_rollout": 1.0, "t_verify": 0.1, "t_prm": 0.5, "t_policy": 0.3, "t_model": 1.8, "gen_tokens": 100},
        {"t_step": 3.0, "t_rollout": 2.0, "t_verify": 0.1, "t_prm": 0.5, "t_policy": 0.2, "t_model": 2.4, "gen_tokens": 300},
        {"t_step": 1.0, "t_rollout": 0.5, "t_verify": 0.1, "t_policy": 0.3, "t_model": 0.9, "gen_tokens": 100},  # no PRM
    ]
    r = bench.summarize(steps)
    assert r["n"] == 3 and r["t_step"] == 2.0 and r["t_step_min"] == 1.0 and r["t_rollout"] == 1.0 and r["t_prm"] == 0.5
    # other per step: 0.1, 0.2, 0.1 -> median 0.1 (a median of differences, not a difference of medians)
    assert r["t_other"] == pytest.approx(0.1)
    # outside model calls per step: 0.1, 0.2, 0.1 -> median 0.1; tokens/s per step: 100, 150, 200 -> 150
    assert r["outside_share"] == pytest.approx(0.1) and r["tok_per_s"] == pytest.approx(150)


def test_table_has_one_row_per_arm_and_every_column():
    r = {**bench.summarize([{"t_step": 1.0, "t_rollout": 0.5, "t_model": 0.95, "gen_tokens": 50}]), "rss_mb": 512.0}
    lines = bench.fmt_table({"prime": r, "outcome": r}).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| prime | 1.000 | nan | 0.500 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines), "every row has every column"
    assert "| 5.0% | 512 |" in lines[3] and r["cpu_step"] != r["cpu_step"], "no cpu_step given: nan"


def test_ratio_table_holds_every_ratio_with_its_goal():
    def arm(step, fastest, cpu):
        return {"t_step": step, "t_step_min": fastest, "cpu_step": cpu}
    res = {"prime": arm(3.0, 2.0, 6.0), "outcome": arm(2.0, 1.6, 4.0), "outcome, no filter": arm(1.0, 0.9, 2.0),
           "TRL RLOO": arm(2.0, 1.5, 4.0)}
    res["prime"].update(t_ref=0.2, t_prm_recompute=0.3, t_prm=1.2)
    res["outcome"].update(t_policy=0.5)
    lines = bench.ratio_table(res).splitlines()
    assert lines[2] == "| PRIME / outcome-only step | 1.50x | 1.25x | 1.50x | <= 1.35x |"
    # floor = (2.0 + 0.2 + 0.5 + 0.3) / 2.0 = 1.50
    assert lines[3] == ("| PRIME / outcome-only floor: + π_ref forward (0.200 s) + one more update (0.500 s) + PRM "
                        "recompute (0.300 s) | 1.50x | - | - | PRIME's PRM phase 1.200 s against 1.000 s |")
    assert lines[4] == "| ours / TRL RLOOTrainer, same work | 0.50x | 0.60x | 0.50x | <= 0.6x |" and len(lines) == 5
    small = bench.ratio_table(res, smollm2=True).splitlines()
    assert small[2].endswith("<= 1.5x |") and small[-1] == "| PRIME step, seconds | 3.0 | 2.0 | 6.0 | <= 25 |"
    assert bench.ratio_table({"outcome": res["outcome"]}) == ""


def test_repeats_column_gives_median_and_range_of_the_paired_ratios():
    def arm(step):
        return {"t_step": step, "t_step_min": step, "cpu_step": step}
    reps = [{"prime": arm(3.0), "outcome": arm(2.0)}, {"prime": arm(4.0), "outcome": arm(2.0)},
            {"prime": arm(3.0), "outcome": arm(2.5)}]
    for r in reps:
        r["prime"].update(t_ref=0.1, t_prm_recompute=0.1, t_prm=1.0)
        r["outcome"].update(t_policy=0.3)
    pooled = {"prime": {**arm(3.0), "t_ref": 0.1, "t_prm_recompute": 0.1, "t_prm": 1.0},
              "outcome": {**arm(2.0), "t_policy": 0.3}}
    lines = bench.ratio_table(pooled, per_repeat=reps).splitlines()
    assert lines[0] == "| figure | median | fastest step | CPU time | per repeat: median (range) of 3 | goal |"
    # paired ratios 3/2, 4/2, 3/2.5 = 1.5, 2.0, 1.2: median 1.50, range 1.20-2.00 (a median of ratios,
    # not the ratio of the pooled medians, which is also 1.50 here by construction of `pooled`)
    assert lines[2] == "| PRIME / outcome-only step | 1.50x | 1.50x | 1.50x | 1.50x (1.20x-2.00x) | <= 1.35x |"
    # floors (2 + 0.5) / 2 = 1.25, 1.25, (2.5 + 0.5) / 2.5 = 1.20
    assert lines[3].endswith("| 1.25x | - | - | 1.25x (1.20x-1.25x) | PRIME's PRM phase 1.000 s against 0.500 s |")
    assert all(line.count("|") == lines[0].count("|") for line in lines), "every row has every column"
    one = bench.ratio_table(pooled, per_repeat=reps[:1]).splitlines()
    assert one[0] == "| figure | median | fastest step | CPU time | goal |", "one repeat: no per-repeat column"


def test_bench_runs_end_to_end_on_a_micro_configuration(tmp_path):
    micro = ["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-intermediate", "64",
             "--sft-steps", "20", "--sft-batch", "16", "--P", "4", "--K", "2", "--max-new-tokens", "16",
             "--micro-batch", "4", "--filter-low", "0", "--filter-high", "1"]
    have_trl = importlib.util.find_spec("trl") is not None
    arms = "prime,outcome" + (",outcome-nofilter,trl" if have_trl else "")
    argv = [sys.executable, "bench.py", "--steps", "2", "--warmup", "1", "--threads", "1", "--arms", arms, "--repeats", "2",
            "--out-dir", str(tmp_path), "--json", str(tmp_path / "bench.json"), "--"] + micro
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "| prime |" in out.stdout and "| outcome |" in out.stdout and "PRIME / outcome step time" in out.stdout
    assert "| PRIME / outcome-only step |" in out.stdout, "the ratio table"
    assert "repeat 2/2: outcome" in out.stdout and "per repeat: median (range) of 2" in out.stdout, "arms alternate"
    import json
    saved = json.load(open(tmp_path / "bench.json"))
    assert len(saved["per_repeat"]) == 2 and len(saved["raw"]["prime"]["steps"]) == 4, "2 steps x 2 repeats pooled"
    if have_trl:
        assert "| TRL RLOO |" in out.stdout and "ours / TRL" in out.stdout


def test_the_wrapped_model_calls_are_the_ones_the_loop_and_the_evaluation_make():
    # The loop imports `generate` and `token_logprobs` by name: wrapping only sampling's attribute
    # timed nothing (gen tok/s 0 in bench's table). Every project module that holds them gets the wrapper.
    import evaluation
    import prime_mini
    import sampling
    originals = (sampling.generate, sampling.token_logprobs)
    clock = bench.ModelClock()
    replaced = bench.wrap_model_calls(clock)
    try:
        for module in (sampling, prime_mini, evaluation):
            assert module.generate is not originals[0] and module.generate.__wrapped__ is not None, module.__name__
        assert prime_mini.token_logprobs is not originals[1] and sampling.token_logprobs is not originals[1]
        assert {(m.__name__, n) for m, n, _ in replaced} >= {("prime_mini", "generate"), ("prime_mini", "token_logprobs"),
                                                            ("evaluation", "generate"), ("sampling", "generate")}
        # A call through the loop's name is timed and its valid tokens counted.
        import torch
        from models import build_char_tokenizer, build_tiny_model
        from config import parse_config
        cfg = parse_config(["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-intermediate", "64",
                            "--plan-memory"])
        tok = build_char_tokenizer()
        model = build_tiny_model(cfg, tok).eval()
        ids, am = sampling.encode_prompts(tok, [tok.bos_token + "1+2="] * 2, "cpu")
        torch.manual_seed(0)
        resp, mask = prime_mini.generate(model, tok, ids, am, 5, 1.0)
        seconds, tokens = clock.reset()
        assert tokens == int(mask.sum()) > 0 and seconds > 0
    finally:
        for module, name, fn in replaced:
            setattr(module, name, fn)
    assert prime_mini.generate is originals[0] and sampling.token_logprobs is originals[1]


def test_rollout_tables_against_a_hand_computation():
    rep = lambda hf, ours, same=True: {"hf": {"s": hf, "tokens": 1000}, "static": {"s": ours, "tokens": 1000},  # noqa: E731
                                       "same": same}
    res = {"rollout": [{"n_ops": 16, "threads": 1, "rows": 64, "max_new": 208, "eval_prompts": 200, "eval_samples": 4,
                        "repeats": [rep(2.0, 1.0), rep(3.0, 1.0, False), rep(1.0, 1.0)],
                        "eval": {"hf": {"s": 30.0, "acc": 0.4}, "static": {"s": 12.0, "acc": 0.4}}}],
           "steps": [{"n_ops": 16, "decode": "hf", "t_step": 5.0, "t_rollout": 4.0}], "step_threads": 2}
    out = bench.rollout_tables(res)
    # tok/s: medians of 1000/2, 1000/3, 1000/1 -> 500 and of 1000/1 x3 -> 1000; ratios 2, 3, 1 -> 2 (1-3)
    assert "| 16 | 1 | 64 x 208 | 500 | 1000 | 2.00x (1.00x-3.00x) | 2/3 |" in out
    assert "| 16 | 1 | 200 x 4 | 30.0 | 12.0 | 2.50x | 0.400, 0.400 |" in out
    assert "| 16 | hf | 5.00 | 4.00 | 80% |" in out and "threads 2" in out


def test_rollout_mode_stops_on_bad_lists():
    with pytest.raises(SystemExit, match="comma-separated integers"):
        bench.main(["rollout", "--lengths", "4,x"])
    with pytest.raises(SystemExit, match="at least 1"):
        bench.main(["rollout", "--threads", "0"])


def test_bench_attention_times_the_same_scores_three_ways_and_the_loops_products():
    import torch
    mod = load_script("bench_attention")
    cases, mb = mod.operations(A=3, h=2, d=4, L=5, capacity=7)
    assert mb == 3 * 2 * 4 * 5 * 4 / 1e6
    out = {name: f() for name, f in cases}
    ways = [v for k, v in out.items() if k.startswith("q·kᵀ")]
    assert len(ways) == 3 and all(w.shape == (3, 2, 1, 5) for w in ways)
    for w in ways[1:]:
        torch.testing.assert_close(w, ways[0])
    # by hand: row 1, head 0, position 4 of q·kᵀ
    g = torch.Generator().manual_seed(0)
    kt = torch.randn(3, 2, 4, 7, generator=g)
    torch.randn(3, 2, 7, 4, generator=g)
    q = torch.randn(3, 2, 1, 4, generator=g)
    assert ways[0][1, 0, 0, 4].item() == pytest.approx(sum(q[1, 0, 0, i].item() * kt[1, 0, i, 4].item() for i in range(4)), rel=1e-5)


def test_bench_attention_prints_a_row_per_operation_and_stops_on_a_length_past_the_cache(capsys):
    mod = load_script("bench_attention")
    mod.main(["--rows", "2", "--length", "8", "--capacity", "8", "--repeats", "1", "--inner", "1"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and not l.startswith("| operation")]
    assert len(rows) == 5 and all(float(r.split("|")[2]) > 0 for r in rows)
    with pytest.raises(SystemExit) as e:
        mod.main(["--length", "300"])
    assert e.value.code == 2 and "--capacity (256)" in capsys.readouterr().err
