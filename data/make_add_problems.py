"""Write data/add_{rl,test}.jsonl: two-number addition in chat form, for a small pretrained chat model.

The task of `--preset smollm2-135m` (README, "A real pretrained model on the CPU"). Each prompt is
a chat in the schema of PRIME's RL data (Eurus-2-RL-Data): a short system turn, one worked
example as an earlier user/assistant exchange, then the question:

    system:    You are a helpful assistant.
    user:      What is 12 + 25?
    assistant: 12 + 25 = 37. The answer is \\boxed{37}.
    user:      What is 31 + 18?

Why this form: SmolLM2-135M-Instruct, given a question and PRIME's instruction to box the answer,
almost never boxes it (0-11% of samples at temperature 1, 0-3% right), so no prompt passes
PRIME's [0.2, 0.8] filter and RL has nothing to learn from. With one worked example it boxes ~70%
of its samples and gets ~20% right (two examples: ~95% and ~30%, for a prompt 50% longer, which
on the CPU costs more than the gain): about half the prompts sit inside the filter, and there is
both the form and the sum to learn. The example shows the answer's form, so
`tasks.chat_messages` adds no task suffix (measured on 32 prompts x 4 samples, Q4_1 GGUF copy).

Operands are drawn from [1, 50]; the test prompts come first and no prompt is in both files.

Run: python data/make_add_problems.py   (deterministic)
"""
import argparse
import json
import os
import random

SYSTEM = "You are a helpful assistant."
EXAMPLES = [(12, 25)]


def question(a, b):
    return f"What is {a} + {b}?"


def answer(a, b):
    return f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."


def chat(a, b):
    """The prompt's messages: the system turn, the worked examples, the question."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for x, y in EXAMPLES:
        msgs += [{"role": "user", "content": question(x, y)}, {"role": "assistant", "content": answer(x, y)}]
    return msgs + [{"role": "user", "content": question(a, b)}]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-rl", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--lo", type=int, default=1)
    ap.add_argument("--hi", type=int, default=50)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seen = set(EXAMPLES)
    for split, n in (("test", args.n_test), ("rl", args.n_rl)):
        rows = []
        while len(rows) < n:
            a, b = rng.randint(args.lo, args.hi), rng.randint(args.lo, args.hi)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            rows.append({"data_source": "add_chat", "prompt": chat(a, b), "ability": "math",
                         "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                         "extra_info": {"split": split, "index": len(rows)}})
        path = os.path.join(args.out, f"add_{split}.jsonl")
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
