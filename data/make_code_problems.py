"""Write data/code_problems.jsonl: 20 small programming problems, written for this project.

Each row has the schema of PRIME's RL data (Eurus-2-RL-Data) with `ability: "code"` and, as
ground truth, a JSON string of test cases in the APPS/TACO format the code verifier reads:
`{"inputs": [...], "outputs": [...]}` for stdin/stdout programs, plus `"fn_name"` for call-based
ones (then `inputs[i]` is the list of arguments). `extra_info.reference` holds a reference
solution; training never reads it, tests/test_sandbox.py checks that every one passes.

The expected outputs are computed here by running the reference on each input (trusted code,
in this process), so the file and the references cannot drift apart.

Run: python data/make_code_problems.py   (deterministic)
"""
import contextlib
import io
import json
import os

# (statement, reference program, test inputs, fn_name or None)
PROBLEMS = [
    ("Read two integers a and b on one line and print their sum.",
     "a, b = map(int, input().split())\nprint(a + b)",
     ["1 2\n", "-5 5\n", "1000000000 1000000000\n", "0 0\n", "-7 -8\n"], None),
    ("Read an integer n and print n! (the factorial of n).",
     "import math\nprint(math.factorial(int(input())))",
     ["0\n", "1\n", "5\n", "10\n", "20\n"], None),
    ("Read a line of text and print it reversed.",
     "print(input()[::-1])",
     ["hello\n", "a\n", "racecar\n", "ab cd\n", "PRIME rl\n"], None),
    ("Read an integer n, then n integers on the next line. Print the largest and the smallest, "
     "separated by a space.",
     "input()\nxs = list(map(int, input().split()))\nprint(max(xs), min(xs))",
     ["3\n1 2 3\n", "1\n-4\n", "5\n5 -1 7 7 0\n", "4\n-3 -3 -3 -3\n"], None),
    ("Read an integer n and print the numbers from 1 to n, one per line, but print Fizz for "
     "multiples of 3, Buzz for multiples of 5 and FizzBuzz for multiples of both.",
     "n = int(input())\nfor i in range(1, n + 1):\n"
     "    print('FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else i)",
     ["1\n", "5\n", "15\n", "16\n"], None),
    ("Read an integer n >= 2 and print YES if it is prime, NO otherwise.",
     "n = int(input())\nprint('YES' if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)) else 'NO')",
     ["2\n", "4\n", "17\n", "1000003\n", "1000001\n", "9\n"], None),
    ("Read a line of words and print how many words it has.",
     "print(len(input().split()))",
     ["one\n", "a b c\n", "  spaced   out  words \n", "x y z w v\n"], None),
    ("Read two positive integers and print their greatest common divisor.",
     "import math\na, b = map(int, input().split())\nprint(math.gcd(a, b))",
     ["12 18\n", "7 13\n", "100 10\n", "1 1\n", "1071 462\n"], None),
    ("Read a temperature in degrees Celsius (a real number) and print it in Fahrenheit with "
     "exactly two digits after the decimal point.",
     "c = float(input())\nprint(f'{c * 9 / 5 + 32:.2f}')",
     ["0\n", "100\n", "-40\n", "36.6\n", "-273.15\n"], None),
    ("Read an integer n and then n lines, each a name. Print the names sorted alphabetically, "
     "one per line.",
     "n = int(input())\nprint('\\n'.join(sorted(input() for _ in range(n))))",
     ["3\nbob\nalice\ncarol\n", "1\nzed\n", "4\nd\nc\nb\na\n"], None),
    ("Read an integer n and print the first n Fibonacci numbers (starting 0 1) on one line, "
     "separated by spaces.",
     "n = int(input())\na, b, out = 0, 1, []\nfor _ in range(n):\n    out.append(a)\n    a, b = b, a + b\n"
     "print(' '.join(map(str, out)))",
     ["1\n", "2\n", "7\n", "12\n"], None),
    ("Read a string of lowercase letters and print each distinct letter with its count, in "
     "alphabetical order, as 'letter count' lines.",
     "from collections import Counter\nfor ch, k in sorted(Counter(input().strip()).items()):\n    print(ch, k)",
     ["aab\n", "z\n", "mississippi\n", "abcabc\n"], None),
    # call-based problems (fn_name): inputs are argument lists
    ("Write a function `add(a, b)` that returns a + b.",
     "def add(a, b):\n    return a + b",
     [[1, 2], [-1, 1], [10 ** 12, 1], [0, 0]], "add"),
    ("Write a function `is_palindrome(s)` that returns True when the string s reads the same "
     "backwards, ignoring case.",
     "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]",
     [["abba"], ["Abc"], ["RaceCar"], [""], ["ab"]], "is_palindrome"),
    ("Write a function `two_sum(nums, target)` that returns the indices [i, j] (i < j) of the two "
     "numbers of nums that add up to target; exactly one such pair exists.",
     "def two_sum(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n"
     "        if target - x in seen:\n            return [seen[target - x], j]\n        seen[x] = j",
     [[[2, 7, 11, 15], 9], [[3, 2, 4], 6], [[1, 5, 1, 5], 10], [[0, -3, 3], 0]], "two_sum"),
    ("Write a function `running_sum(xs)` that returns the list of prefix sums of xs.",
     "def running_sum(xs):\n    out, s = [], 0\n    for x in xs:\n        s += x\n        out.append(s)\n    return out",
     [[[1, 2, 3]], [[]], [[5]], [[-1, 1, -1, 1]]], "running_sum"),
    ("Write a function `mean(xs)` that returns the arithmetic mean of a non-empty list of numbers.",
     "def mean(xs):\n    return sum(xs) / len(xs)",
     [[[1, 2, 3, 4]], [[0.1, 0.2]], [[5]], [[-1, 1]]], "mean"),
    ("Write a function `count_vowels(s)` that returns how many of the characters of s are vowels "
     "(a, e, i, o, u, either case).",
     "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)",
     [["hello"], ["xyz"], ["AEIOU"], [""], ["Programming In Python"]], "count_vowels"),
    ("Write a function `flatten(xs)` that returns a flat list of the integers in a nested list.",
     "def flatten(xs):\n    out = []\n    for x in xs:\n        out.extend(flatten(x) if isinstance(x, list) else [x])\n"
     "    return out",
     [[[1, [2, [3]], 4]], [[]], [[[[]]]], [[[1, 2], [3, [4, [5]]]]]], "flatten"),
    ("LeetCode style: write a class `Solution` with a method `max_profit(self, prices)` returning the "
     "best profit from one buy followed by one later sell (0 if none).",
     "class Solution:\n    def max_profit(self, prices):\n        best, low = 0, float('inf')\n"
     "        for p in prices:\n            low = min(low, p)\n            best = max(best, p - low)\n        return best",
     [[[7, 1, 5, 3, 6, 4]], [[7, 6, 4, 3, 1]], [[1]], [[2, 4, 1, 7]]], "max_profit"),
]


def expected_output(program, inp, fn_name):
    """What the reference program prints on `inp` (stdin problems) or returns (call-based)."""
    ns = {"__name__": "reference"}
    if fn_name is None:
        out, lines = io.StringIO(), iter(inp.splitlines())
        with contextlib.redirect_stdout(out):
            exec(program, {**ns, "input": lambda *a: next(lines)})
        return out.getvalue()
    exec(program, ns)
    fn = ns[fn_name] if fn_name in ns else getattr(ns["Solution"](), fn_name)
    return json.loads(json.dumps(fn(*inp)))  # tuples -> lists, as the verifier sees them


def make_rows():
    rows = []
    for i, (statement, program, inputs, fn_name) in enumerate(PROBLEMS):
        tests = {"inputs": inputs, "outputs": [expected_output(program, x, fn_name) for x in inputs]}
        if fn_name:
            tests["fn_name"] = fn_name
        how = ("Read from standard input and write to standard output." if fn_name is None
               else f"Define `{fn_name}`; do not read input or print.")
        prompt = f"{statement}\n{how}\nAnswer with one ```python code block."
        rows.append({"data_source": "prime_mini_code", "prompt": [{"role": "user", "content": prompt}],
                     "ability": "code", "reward_model": {"style": "rule", "ground_truth": json.dumps(tests)},
                     "extra_info": {"index": i, "reference": program}})
    return rows


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_problems.jsonl")
    with open(path, "w") as f:
        for row in make_rows():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(PROBLEMS)} problems to {path}")
