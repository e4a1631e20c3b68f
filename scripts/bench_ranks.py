"""Two processes against one on the same work: `torchrun --nproc-per-node 2 prime_mini.py` with one
thread each, against `python prime_mini.py` with two threads (BENCHMARKS.md, "torchrun on the CPU").

    python scripts/bench_ranks.py [--steps 10] [--out-dir runs/bench-ranks] [run flags...]

Runs the tiny default both ways (the same flags and seed; held-out evaluations cut short, as they
are not part of a step) and prints, per layout, the median seconds per step and per phase over
the steps after the first, and for the 2-process run rank 0's median seconds in collectives
(`t_comm`: the all-gathers and all-reduces, including any wait for the slower rank). Run it on an
idle machine: two processes that share the cores with anything else measure that instead.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("t_step", "t_rollout", "t_verify", "t_prm", "t_policy", "t_comm")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="RL steps per layout (the first is left out of the medians)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "bench-ranks"), help="where both runs are written")
    args, extra = ap.parse_known_args(argv)
    if args.steps < 2:
        sys.exit("error: --steps must be >= 2 (the first step is left out of the medians)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = ["--steps", str(args.steps), "--eval-n", "20", "--eval-samples", "1", "--truth-prompts", "0",
              "--reward-pages", "0", "--no-tensorboard", "--no-show-progress", "--out-dir", args.out_dir, *extra]
    layouts = {
        "1 process x 2 threads": [sys.executable, "prime_mini.py", "--threads", "2"],
        "2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                   "--master-port", "29517", "prime_mini.py", "--threads", "1"],
    }
    rows = []
    for i, (name, cmd) in enumerate(layouts.items()):
        run = f"{stamp}-{i}"
        t = time.time()
        p = subprocess.run(cmd + common + ["--run-name", run], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "2" if i == 0 else "1"})
        if p.returncode:
            sys.exit(f"error: {name} failed:\n{(p.stdout + p.stderr)[-3000:]}")
        m = [json.loads(line) for line in open(os.path.join(args.out_dir, run, "metrics.jsonl"))][1:]
        rows.append([name, time.time() - t] + [statistics.median(x.get(k, 0.0) for x in m) for k in PHASES])
    print(f"\nmedian seconds per RL step over steps 2-{args.steps} (tiny default; held-out evaluations cut short)\n")
    print("| layout | wall s (whole run) | step | rollout | verify | PRM | policy | in collectives (rank 0) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + r[0] + " | " + " | ".join(f"{x:.2f}" for x in r[1:]) + " |")
    print(f"\n2 processes / 1 process, median step: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
