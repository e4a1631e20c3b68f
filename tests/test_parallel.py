"""torchrun: two gloo processes on the CPU do what one process does (parallel.py).

Every rank holds the same batch and computes its share of the micro-batches; the gradients are
summed over ranks before clipping. With two ranks each sum has two terms, which is the same float
in either order, so the adapters and optimizer states after one PRM and one policy update must be
bit-identical to one process doing the same micro-batches; `collect` (with a deterministic stand-in
for sampling) must keep the same rows, buffer and stream; and `torchrun --nproc-per-node 2
prime_mini.py` runs end to end, writing one metrics.jsonl.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import parallel
import prime_mini as pm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_job as job  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("parallel") / "base")
    job.make_base(d)
    return d


@pytest.fixture(scope="module")
def two_ranks(base_dir, tmp_path_factory):
    """Both ranks' results of tests/parallel_job.py, run as a 2-process gloo job."""
    d = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "parallel_job.py"), base_dir, str(d / f"{r}.pt")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return [torch.load(d / f"{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(base_dir):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        up = job.updates(base_dir)
        pm_generate, pm.generate = pm.generate, job.scripted_generate
        try:
            col = job.collected(base_dir)
        finally:
            pm.generate = pm_generate
    finally:
        torch.set_num_threads(n)
    return {"updates": up, "collect": col}


def assert_same(a, b, where):
    """Bit-identical nested tensors / lists / dicts / numbers."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: differ by up to {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_share_deals_out_every_item_once_as_evenly_as_possible():
    for n in range(0, 9):
        for w in (1, 2, 3):
            parts = [parallel.share(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n and all(parts[i][1] == parts[i + 1][0] for i in range(w - 1))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), (n, w, parts)


def test_each_rank_takes_its_share_of_a_mini_batchs_rows_in_micro_batches(monkeypatch):
    got = {}
    for r in range(2):
        monkeypatch.setattr(parallel, "_RANK", r)
        monkeypatch.setattr(parallel, "_WORLD", 2)
        got[r] = parallel.my_micro_batches(0, 16, 4), parallel.my_micro_batches(16, 26, 4)
    assert got[0] == ([(0, 4), (4, 8)], [(16, 20), (20, 21)]) and got[1] == ([(8, 12), (12, 16)], [(21, 25), (25, 26)])


def test_one_process_is_one_rank_and_the_collectives_return_their_input():
    assert parallel.world() == 1 and parallel.rank() == 0 and parallel.is_main()
    x = torch.arange(6.0).view(2, 3)
    assert parallel.gather_rows(x, 0.0) is x and parallel.sum_rows(x) is x
    assert parallel.sum_values([1.5, 2.0]) == [1.5, 2.0] and parallel.gather_objects(["a"]) == ["a"]
    assert parallel.my_micro_batches(3, 13, 4) == [(3, 7), (7, 11), (11, 13)], "range(i0, i1, micro), as the loop always did"


def test_two_ranks_make_bit_identical_updates_to_one_process(two_ranks, one_process):
    want = one_process["updates"]
    # the PRM's grads differ from zero and the update moved the adapters: the equality is not vacuous
    assert want["prm_loss"] > 0 and any((v.abs() > 0).any() for v in want["opt_prm"]["state"][0].values()
                                        if isinstance(v, torch.Tensor) and v.dim() > 0)
    for r in two_ranks:
        assert r["world"] == 2
        for key in ("adapters", "opt_policy", "opt_prm", "q", "A", "logp_ref", "logp_old"):
            assert_same(r["updates"][key], want[key], f"rank {r['rank']} {key}")
        assert r["updates"]["prm_loss"] == pytest.approx(want["prm_loss"], rel=1e-12)  # a metric: summed in another order
        assert r["updates"]["pg_loss"] == pytest.approx(want["pg_loss"], rel=1e-9, abs=1e-12)


def test_two_ranks_collect_the_same_rows_buffer_and_stream_as_one_process(two_ranks, one_process):
    want = one_process["collect"]
    assert all(s["kept"] > 0 for s in want) and any(0 < s["acc"] < 1 for s in want)
    for r in two_ranks:
        assert_same(r["collect"], want, f"rank {r['rank']} collect")


def test_torchrun_two_processes_run_the_tiny_default_end_to_end(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           os.path.join(ROOT, "prime_mini.py"), "--steps", "2", "--P", "4", "--eval-n", "8", "--eval-samples", "1",
           "--truth-prompts", "4", "--reward-pages", "0", "--no-tensorboard", "--no-show-progress", "--threads", "1",
           "--out-dir", str(out), "--run-name", "tr"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    run = out / "tr"
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2], "rank 0 alone logs: one line per step"
    summary = json.load(open(run / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert p.stdout.count("run directory:") == 1, "rank 0 alone prints"
    assert (run / "adapters" / "policy").is_dir() and (run / "checkpoint-000002").is_dir()
