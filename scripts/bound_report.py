"""The true bound of dense credit against outcome-only and PRIME: one table and one figure over
several regimes (docs/RESULTS.md, "The true bound").

Each regime is a folder of `compare` (or `sweep`) runs, `<arm>-s<seed>/` with metrics.jsonl and
summary.json. Per arm and regime, over seeds (mean ± sd):
  - held-out sampled and greedy Δ (after − before RL) and its difference to outcome-only's;
  - sample efficiency per RL step: outcome-only's steps to reach its own final training reward
    (seed-mean curve, trailing mean over --window steps) over the arm's steps to reach it
    (experiments.compare_table, as `compare` reports it);
  - sample efficiency per generated response: the same with the cumulative count of generated
    responses (rollouts, the filter's refills and, for mc-value, its Monte-Carlo continuations)
    in place of the step count;
  - wall time per run, the policy's entropy over the first 5 steps (nats per token), and, where
    logged, the share of blame that falls on right steps (blame_right_outcome, blame_right_mc);
  - for PRIME, its share of the bound's held-out gain over outcome-only, and its PRM's step F1.

Run: python scripts/bound_report.py --regime "weak start=results/bound-weak20" \
         --regime "T=1.4=results/bound-t14" --out docs/bound
Writes OUT.md, OUT.json and OUT.png.
"""
import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import experiments  # noqa: E402


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def finished_arms(folder):
    """{arm: [run dirs]} of the finished runs (summary.json) in a compare folder, seeds in order."""
    arms = {}
    for d in sorted(glob.glob(os.path.join(folder, "*-s[0-9]*"))):
        if os.path.exists(os.path.join(d, "summary.json")):
            arm = os.path.basename(d).rsplit("-s", 1)[0]
            arms.setdefault(arm, []).append(d)
    return arms


def cumulative_responses(metrics):
    """Responses generated up to and including each step: rollouts (with refills) + MC continuations."""
    total, out = 0, []
    for m in sorted(metrics, key=lambda m: m["step"]):
        total += m.get("generated", 0) + m.get("mc_rollouts", 0)
        out.append(total)
    return out


def responses_to_target(runs, smooth, target):
    """Mean over seeds of the cumulative responses at the first step where the seed-mean trailing
    training reward `smooth` (experiments.compare_table's) reaches `target`; None if it never does."""
    hit = next((i for i, v in enumerate(smooth) if v >= target), None)
    if hit is None:
        return None
    return statistics.mean(cumulative_responses(r["metrics"])[hit] for r in runs)


def regime_rows(folder, ref, window):
    arms = finished_arms(folder)
    if ref not in arms:
        raise SystemExit(f"error: {folder} has no finished {ref!r} runs (arms: {', '.join(arms) or 'none'})")
    runs = {arm: [experiments.read_run(d) for d in dirs] for arm, dirs in arms.items()}
    n_ref = len(runs[ref])
    runs = {arm: rs for arm, rs in runs.items() if len(rs) == n_ref}  # only arms with every seed of the reference
    table, target = experiments.compare_table(runs, ref, window)
    ref_resp = responses_to_target(runs[ref], table[ref]["smooth"], target)
    rows = {}
    for arm, rs in runs.items():
        t = table[arm]
        d_s = [r["summary"]["acc_after"] - r["summary"]["acc_before"] for r in rs]
        d_g = [r["summary"]["greedy_after"] - r["summary"]["greedy_before"] for r in rs]
        d_ref = [r["summary"]["acc_after"] - r["summary"]["acc_before"] for r in runs[ref]]
        resp = responses_to_target(rs, t["smooth"], target)

        def metric(key, steps=None):
            vals = [m[key] for r in rs for m in sorted(r["metrics"], key=lambda m: m["step"])[:steps]
                    if m.get(key) is not None]
            return statistics.mean(vals) if vals else None
        rows[arm] = {
            "seeds": len(rs), "acc_before": t["acc_before"][0], "greedy_before": t["greedy_before"][0],
            "delta_sampled": mean_sd(d_s), "delta_greedy": mean_sd(d_g),
            "delta_vs_ref": mean_sd([a - b for a, b in zip(d_s, d_ref)]),  # paired by seed
            "final_reward": t["final_reward"], "steps_to_target": t["steps_to_target"], "eff_steps": t["efficiency"],
            "responses_to_target": resp, "eff_responses": (ref_resp / resp) if (ref_resp and resp) else None,
            "wall_s": mean_sd([r["summary"]["wall_time_s"] for r in rs]), "t_step": t["t_step"],
            "entropy_start": metric("entropy", 5), "blame_right_outcome": metric("blame_right_outcome"),
            "blame_right_mc": metric("blame_right_mc"), "step_f1": t["step_f1"], "step_auroc": t["step_auroc"],
            "curve": t["smooth"], "responses": [statistics.mean(c) for c in zip(*[cumulative_responses(r["metrics"]) for r in rs])],
        }
    if "mc-value" in rows and "prime" in rows:  # PRIME's share of the bound's held-out gain over the reference
        gain_bound = rows["mc-value"]["delta_sampled"][0] - rows[ref]["delta_sampled"][0]
        gain_prime = rows["prime"]["delta_sampled"][0] - rows[ref]["delta_sampled"][0]
        rows["prime"]["share_of_bound"] = gain_prime / gain_bound if abs(gain_bound) > 1e-9 else None
    return rows, target


def fmt(x, f="{:+.3f}"):
    if x is None:
        return "-"
    if isinstance(x, tuple):
        return (f + " ± " + f.replace("+", "")).format(*x)
    return f.format(x)


def markdown(report, ref):
    lines = [f"| regime | arm | seeds | held-out sampled Δ | − {ref}'s (paired) | greedy Δ | efficiency per step | "
             f"per response | wall time (s) | entropy, steps 1-5 | blame on right steps ({ref} / mc) | PRM step F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (rows, target) in report.items():
        for arm, r in rows.items():
            blame = f"{fmt(r['blame_right_outcome'], '{:.2f}')} / {fmt(r['blame_right_mc'], '{:.2f}')}"
            lines.append(f"| {name} (start {r['acc_before']:.3f}) | {arm} | {r['seeds']} | {fmt(r['delta_sampled'])} | "
                         f"{fmt(r['delta_vs_ref']) if arm != ref else ''} | {fmt(r['delta_greedy'])} | "
                         f"{fmt(r['eff_steps'], '{:.2f}x')} | {fmt(r['eff_responses'], '{:.2f}x')} | "
                         f"{fmt(r['wall_s'], '{:.0f}')} | {fmt(r['entropy_start'], '{:.3f}')} | {blame} | "
                         f"{fmt(r['step_f1'], '{:.2f}')} |")
    return "\n".join(lines)


def plot(report, ref, window, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(report)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 8), squeeze=False)
    for j, (name, (rows, target)) in enumerate(report.items()):
        for arm, r in rows.items():
            x = range(1, len(r["curve"]) + 1)
            line, = axes[0][j].plot(x, r["curve"], label=arm)
            axes[1][j].plot(r["responses"][:len(r["curve"])], r["curve"], color=line.get_color(), label=arm)
        for ax, xlabel in ((axes[0][j], "RL step"), (axes[1][j], "responses generated (incl. MC continuations)")):
            ax.axhline(target, color="gray", ls="--", lw=1, label=f"{ref} final")
            ax.set(xlabel=xlabel, ylabel=f"training reward (trailing mean, {window} steps)", title=name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("The true bound (mc-value: Monte-Carlo step values) against outcome-only and PRIME; seed means")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", action="append", required=True, help="NAME=FOLDER of compare runs (repeat)")
    ap.add_argument("--ref", default="outcome", help="the arm the others are measured against")
    ap.add_argument("--window", type=int, default=10, help="steps in the trailing mean of the training reward")
    ap.add_argument("--out", default="docs/bound", help="writes OUT.md, OUT.json, OUT.png")
    args = ap.parse_args()
    report = {}
    for spec in args.regime:
        name, sep, folder = spec.rpartition("=")
        if not sep or not os.path.isdir(folder):
            raise SystemExit(f"error: --regime {spec!r}: need NAME=FOLDER with an existing folder")
        report[name] = regime_rows(folder, args.ref, args.window)
    md = markdown(report, args.ref)
    open(args.out + ".md", "w").write(md + "\n")
    json.dump({name: {"target": t, "arms": {a: {k: v for k, v in r.items() if k not in ("curve", "responses")}
                                            for a, r in rows.items()}} for name, (rows, t) in report.items()},
              open(args.out + ".json", "w"), indent=1)
    plot(report, args.ref, args.window, args.out + ".png")
    print(md)
    print(f"\nwrote {args.out}.md, .json, .png")


if __name__ == "__main__":
    main()
