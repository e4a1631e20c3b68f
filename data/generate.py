"""Generate the embedded default task: multi-step arithmetic chains with worked solutions.

A problem is a running total of `n_ops` additions and subtractions, for example

    prompt:   "47+8-3+9-6="
    solution: "47+8=55;55-3=52;52+9=61;61-6=55;\\boxed{55}"

Each step rewrites the running total, so a solution has `n_ops` steps and one wrong digit in
step 2 makes every later step (and the final answer) wrong: an outcome reward says only *that*
something went wrong, which is what PRIME's process rewards are meant to add to.

Rows use the schema of PRIME's RL data (Eurus-2-RL-Data), so one loader and one verifier serve
both: `data_source`, `prompt` (chat messages), `ability`, `reward_model.{style,ground_truth}`,
`extra_info`. SFT rows add `response` (the worked solution).

Run: python data/generate.py          (writes data/arith_{sft,rl,test}.jsonl, deterministic)
"""
import argparse
import json
import os
import random


def make_problem(rng, n_ops, lo, hi, op_max):
    """One chain: a start in [lo, hi], then n_ops steps of +/- a number in [1, op_max].

    Subtractions that would go below 0 become additions, so every intermediate total is >= 0.
    Example: make_problem(random.Random(0), 4, 10, 99, 9) -> ("...=", "...;\\boxed{..}", "..")
    """
    total = rng.randint(lo, hi)
    prompt, steps = str(total), []
    for _ in range(n_ops):
        b = rng.randint(1, op_max)
        op = rng.choice("+-")
        if op == "-" and total - b < 0:
            op = "+"
        new = total + b if op == "+" else total - b
        prompt += f"{op}{b}"
        steps.append(f"{total}{op}{b}={new}")
        total = new
    solution = ";".join(steps) + ";\\boxed{" + str(total) + "}"
    return prompt + "=", solution, str(total)


def row(prompt, answer, split, index, response=None):
    r = {
        "data_source": "arith_chain",
        "prompt": [{"role": "user", "content": prompt}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index},
    }
    if response is not None:
        r["response"] = response
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-ops", type=int, default=4, help="steps per chain")
    ap.add_argument("--lo", type=int, default=10, help="smallest starting number")
    ap.add_argument("--hi", type=int, default=99, help="largest starting number")
    ap.add_argument("--op-max", type=int, default=19, help="largest operand of a step")
    ap.add_argument("--n-sft", type=int, default=60000)
    ap.add_argument("--n-rl", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-val", type=int, default=200, help="prompts the SFT warm-up checks its progress on")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--name", default="arith")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    seen, splits = set(), {"test": [], "rl": [], "sft": [], "val": []}
    sizes = {"test": args.n_test, "rl": args.n_rl, "sft": args.n_sft, "val": args.n_val}
    # Held-out prompts first, and no prompt appears in two splits (RL prompts may repeat SFT's
    # *distribution*, never a held-out prompt). The validation split comes last, so adding it left
    # the other three files as they were.
    for split in ("test", "rl", "sft", "val"):
        while len(splits[split]) < sizes[split]:
            prompt, solution, answer = make_problem(rng, args.n_ops, args.lo, args.hi, args.op_max)
            if prompt in seen:
                continue
            seen.add(prompt)
            i = len(splits[split])
            splits[split].append(row(prompt, answer, split, i, solution if split == "sft" else None))
    for split, rows in splits.items():
        path = os.path.join(args.out, f"{args.name}_{split}.jsonl")
        tmp = f"{path}.tmp-{os.getpid()}"  # then renamed: a run started beside this one reads a whole file or none
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
