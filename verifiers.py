"""Outcome verifiers: the outcome reward r_o(y) ∈ [0, 1] of a response, from strings only.

PRIME's only supervision is this score (paper §4.1: r_math ∈ {0, 1}, r_code = #passed/#tests).
It trains both the policy (through RLOO) and the implicit PRM (its cross-entropy labels), so it
must be right, and one bad sample must never stop a run.

- math: the last `\\boxed{...}` of the response (brace-matched, nested braces allowed), else the
  text after the last "the answer is", compared with the ground truth by math-verify
  (https://github.com/huggingface/Math-Verify): fractions vs decimals, `\\frac`/`\\dfrac`,
  percentages, intervals, tuples, sets, simple expressions, LaTeX spacing and `\\text{}` noise.
  Each parse and comparison has math-verify's own time limit (`MATH_TIMEOUT` s). Score 1 or 0.
- code: the last ```python block (the whole response if none) run on the sample's test cases
  (APPS/TACO JSON: inputs/outputs[/fn_name]) by `sandbox.run_tests`, in a separate sandboxed
  process: bubblewrap unless the caller names the weaker mode (`sandbox.Limits(mode="rlimit")`).
  Score 1.0 if every test passes, else the fraction passed of the first 10.

Entry points: `outcome_reward(sample, response) -> (score, reason)` for one sample and
`outcome_rewards(samples, responses)` for a batch (code samples in parallel). `reason` is one of
REASONS, so a run can count why samples fail. No torch here.

math-verify limits its run time with SIGALRM, which only works in a process's main thread; the
batch function therefore checks math answers in the calling (main) thread and only hands code
samples, which wait on subprocesses, to a thread pool. Called from another thread, the math
check runs without a time limit (a warning says so).
"""
import concurrent.futures
import functools
import json
import re
import threading
import time
import warnings

from math_verify import parse, verify

import sandbox

MATH_TIMEOUT = 3  # seconds per math-verify parse or comparison (SIGALRM; whole seconds)
MAX_CODE_TESTS = 10  # partial credit counts the first 10 tests (PRIME's code reward)
REASONS = ("correct", "partial", "wrong", "no_answer", "timeout", "syntax_error", "runtime_error", "memory",
           "output_limit", "sandbox_error", "verifier_error")

# The fallback when there is no box: the text after the last "answer is"/"answer:".
_ANSWER_IS = re.compile(r"(?:answer is|answers are|answer\s*:)\s*", re.IGNORECASE)


def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} in `text`, brace-matched; None if none.

    Example: last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") -> "\\frac{1}{2}"
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None  # unbalanced: the box was never closed


def extract_answer(text):
    """The final answer of a math response: the last box, else the rest of the sentence after the
    last "answer is" / "answer:" (without `$` and the final period); None if neither.

    Example: extract_answer("so the answer is $\\frac{1}{2}$.") -> "\\frac{1}{2}"
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    found = list(_ANSWER_IS.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end():].split("\n")[0]
    rest = re.split(r"\.\s", rest + " ")[0]  # cut at the end of the sentence
    return rest.strip().strip("$").strip().rstrip(".").strip() or None


def _timeout():
    # math-verify's timeouts use signal.alarm, which raises outside the main thread.
    if threading.current_thread() is threading.main_thread():
        return MATH_TIMEOUT
    warnings.warn("math check outside the main thread: math-verify runs without its time limit", RuntimeWarning)
    return None


@functools.lru_cache(maxsize=100_000)
def _parse_gold(ground_truth, timeout):
    """math-verify's parse of a ground truth; a warning (once per ground truth) when it yields no
    mathematical object, for then only an answer written exactly the same way can score 1."""
    gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=timeout)
    if all(isinstance(g, str) for g in gold):  # [] or the bare string: nothing was parsed
        warnings.warn(f"math-verify cannot parse the ground truth {ground_truth!r}: only an answer written "
                      "exactly like it can score 1, every other response scores 0", RuntimeWarning)
    return gold


_INTEGER = re.compile(r"([+-]?)([0-9]+)")  # an integer literal, ASCII digits only: (sign, digits)
MAX_ANSWER_CHARS = 1000  # a longer answer than this (and than 10x the ground truth) is wrong without a parse


def integer_key(literal):
    """An integer literal as (sign, digits) with leading zeros and a "+" dropped and -0 = 0, or
    None if it is not one. Compares integers of any length without int(), which refuses more
    than 4300 digits (Python's limit on str -> int since 3.11). Example: integer_key("-007") -> ("-", "7")"""
    m = _INTEGER.fullmatch(literal)
    if m is None:
        return None
    digits = m.group(2).lstrip("0") or "0"
    return ("-" if m.group(1) == "-" and digits != "0" else "", digits)


def math_equal(answer, ground_truth):
    """Is `answer` mathematically the same as `ground_truth`? (math-verify; exact match first).

    Never raises: any string a policy can write (huge numbers, deep nesting, odd unicode) is
    either equal or not, and an answer that makes math-verify raise is not equal
    (`math_reward` reports that case as "verifier_error").
    Example: math_equal("0.5", "\\frac{1}{2}") -> True; math_equal("50\\%", "0.5") -> True
    """
    try:
        return _math_equal(answer, ground_truth)
    except Exception:  # noqa: BLE001 -- a library failure on an odd answer: not shown equal
        return False


def _math_equal(answer, ground_truth):
    """math_equal, letting math-verify's own exceptions through. Two integer literals are compared
    as digit strings (any length: int() refuses more than 4300 digits); an answer longer than
    MAX_ANSWER_CHARS and 10x the ground truth is not equal without a parse (math-verify's parse of
    10k nested braces takes its whole time limit, and logs the whole string)."""
    a, g = answer.replace(" ", ""), str(ground_truth).replace(" ", "")
    if a == g:
        return True  # identical strings are equal; skips the parser on the common case
    ka, kg = integer_key(a), integer_key(g)
    if ka is not None and kg is not None:
        return ka == kg  # two integers (the embedded task's every answer): no parse needed (0.65 ms each)
    if len(a) > max(MAX_ANSWER_CHARS, 10 * len(g)):
        return False
    timeout = _timeout()
    gold = _parse_gold(str(ground_truth), timeout)
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
    return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))


def math_reward(response, ground_truth):
    """(1.0, "correct") or (0.0, "wrong" | "no_answer" | "timeout" | "verifier_error"). Never raises.

    math-verify turns a timed-out parse or comparison into "not equal"; a False that took the
    whole time limit is reported as "timeout" so a run can see pathological answers. An answer on
    which math-verify itself raised scores 0 as "verifier_error" (counted, not fatal).
    Example: math_reward("3+4=7;\\boxed{7}", "7") -> (1.0, "correct")
    """
    answer = extract_answer(response)
    if answer is None or answer == "":
        return 0.0, "no_answer"
    t = time.monotonic()
    try:
        equal = _math_equal(answer, ground_truth)
    except Exception:  # noqa: BLE001 -- one odd answer must not stop the run
        return 0.0, "verifier_error"
    if equal:
        return 1.0, "correct"
    return 0.0, "timeout" if time.monotonic() - t >= MATH_TIMEOUT else "wrong"


# ---------------------------------------------------------------------------------------------
# Code: the program of a response, run on the sample's test cases in the sandbox.
# ---------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_program(response):
    """The last ```python block of the response (an unclosed last block runs to the end);
    the whole response if there is none.

    Example: extract_program("try:\\n```python\\nprint(1)\\n```") -> "print(1)\\n"
    """
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_code_tests(ground_truth):
    """The test cases of a code sample from its ground truth (a JSON string, or already a dict).

    Raises ValueError naming what is wrong. Example:
    parse_code_tests('{"inputs": ["1\\n"], "outputs": ["2\\n"]}') -> {"inputs": [...], "outputs": [...]}
    """
    if isinstance(ground_truth, str):
        try:
            ground_truth = json.loads(ground_truth)
        except json.JSONDecodeError as e:
            raise ValueError(f"ground truth is not valid JSON ({e.msg})") from None
    if not isinstance(ground_truth, dict):
        raise ValueError("ground truth must be a JSON object with 'inputs' and 'outputs'")
    ins, outs = ground_truth.get("inputs"), ground_truth.get("outputs")
    if not isinstance(ins, list) or not isinstance(outs, list):
        raise ValueError("ground truth needs 'inputs' and 'outputs' lists")
    if len(ins) != len(outs) or not ins:
        raise ValueError(f"ground truth has {len(ins)} inputs and {len(outs)} outputs (need the same, >= 1)")
    fn = ground_truth.get("fn_name")
    if fn is not None and not (isinstance(fn, str) and fn.isidentifier()):
        raise ValueError(f"'fn_name' must be a Python identifier, got {fn!r}")
    if fn is not None and not all(isinstance(x, list) for x in ins):
        raise ValueError("call-based tests ('fn_name') need each input to be a list of arguments")
    return {"inputs": ins, "outputs": outs, **({"fn_name": fn} if fn else {})}


def code_score(results):
    """1.0 if every test passed, else the fraction passed of the first 10 tests, below 1 when the
    failures all come later (the first 10 pass, the 11th fails: 9/10), so a failing program never
    gets the full reward.

    The reason is "correct", "partial" (some passed), or the first failure's kind.
    Example: code_score(["pass", "wrong", "pass", "timeout"]) -> (0.5, "partial")
             code_score(["pass"] * 10 + ["wrong"]) -> (0.9, "partial")
    """
    if all(r == "pass" for r in results):
        return 1.0, "correct"
    first = results[:MAX_CODE_TESTS]
    passed = min(sum(r == "pass" for r in first), len(first) - 1)  # a later failure costs one test's share
    if passed:
        return passed / len(first), "partial"
    return 0.0, next(r for r in results if r != "pass")


def code_reward(response, tests, limits=sandbox.Limits()):
    """Run the response's program on `tests` in the sandbox. Returns (score, reason).

    Example: code_reward("```python\\nprint(int(input())+1)\\n```", {"inputs": ["1"], "outputs": ["2"]})
             -> (1.0, "correct")
    """
    program = extract_program(response)
    if not program.strip():
        return 0.0, "no_answer"
    result = sandbox.run_tests(program, parse_code_tests(tests), limits)
    if "error" in result:
        return 0.0, result["error"]  # "syntax_error", or "sandbox_error" (the runner broke down)
    return code_score(result["results"])


# ---------------------------------------------------------------------------------------------
# Dispatch: one sample, and a batch with code samples in parallel.
# ---------------------------------------------------------------------------------------------
def sample_name(sample):
    """How errors name a sample: data_source#index."""
    return f"{sample.get('data_source', '?')}#{(sample.get('extra_info') or {}).get('index', '?')}"


def check_sample(sample):
    """Raise ValueError (naming the sample) if it cannot be verified: unknown ability, missing
    or malformed ground truth. Returns the parsed ground truth (a string or a test dict)."""
    name = sample_name(sample)
    ability = sample.get("ability")
    gt = (sample.get("reward_model") or {}).get("ground_truth") if isinstance(sample.get("reward_model"), dict) else None
    if gt is None:
        raise ValueError(f"sample {name}: missing reward_model.ground_truth")
    if ability == "math":
        return str(gt)
    if ability == "code":
        try:
            return parse_code_tests(gt)
        except ValueError as e:
            raise ValueError(f"sample {name}: {e}") from None
    raise ValueError(f"sample {name}: ability {ability!r} has no verifier here (supported: 'math', 'code')")


def outcome_reward(sample, response, limits=sandbox.Limits()):
    """Dispatch on the sample's `ability` (Eurus-2-RL-Data schema). Returns (score, reason).

    Example: outcome_reward({"ability": "math", "reward_model": {"ground_truth": "3"}}, "\\boxed{3}")
             -> (1.0, "correct")
    """
    gt = check_sample(sample)
    if sample["ability"] == "math":
        return math_reward(response, gt)
    return code_reward(response, gt, limits)


MAX_ERRORS_SHOWN = 3  # verifier failures logged per batch; every one is counted (reason "verifier_error")


def _safe_reward(sample, response, limits):
    """outcome_reward that never raises: (score, reason, what failed or None). A verifier
    failure scores 0 with reason "verifier_error"."""
    try:
        score, reason = outcome_reward(sample, response, limits)
        return score, reason, (f"its verifier failed on the response {response[:60]!r}" if reason == "verifier_error" else None)
    except Exception as e:  # noqa: BLE001 -- one bad sample must not stop the run
        return 0.0, "verifier_error", f"{type(e).__name__}: {str(e)[:200]}"


def outcome_rewards(samples, responses, limits=sandbox.Limits(), workers=4):
    """Scores of a batch: code samples run in parallel on a pool of `workers` threads (each
    waits on a sandboxed subprocess) while math samples are checked here, in the calling
    thread, where math-verify's time limit works. Returns a list of (score, reason).

    Example: outcome_rewards([math_sample, code_sample], ["\\boxed{3}", "```python..."])
             -> [(1.0, "correct"), (0.5, "partial")]
    """
    assert len(samples) == len(responses), f"{len(samples)} samples but {len(responses)} responses"
    out = [None] * len(samples)
    code = [i for i, s in enumerate(samples) if s.get("ability") == "code"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if code else None
    try:
        futures = {pool.submit(_safe_reward, samples[i], responses[i], limits): i for i in code} if code else {}
        for i, s in enumerate(samples):
            if s.get("ability") != "code":
                out[i] = _safe_reward(s, responses[i], limits)
        for f, i in futures.items():
            out[i] = f.result()
    finally:
        if pool:
            pool.shutdown(wait=True)
    # The first few failures of the batch are logged, the rest only counted: a policy that keeps
    # writing answers its verifier cannot handle must not flood the log.
    failed = [(i, why) for i, (_, _, why) in enumerate(out) if why]
    for i, why in failed[:MAX_ERRORS_SHOWN]:
        warnings.warn(f"verifier failed on sample {sample_name(samples[i])}: {why}; scored 0 (verifier_error)", RuntimeWarning)
    if len(failed) > MAX_ERRORS_SHOWN:
        warnings.warn(f"{len(failed) - MAX_ERRORS_SHOWN} more verifier failures in this batch, scored 0 and counted "
                      "(verifier_error), not shown", RuntimeWarning)
    return [(score, reason) for score, reason, _ in out]


def _bench(workers, mode):
    """Throughput on a batch of 256 math and 64 code responses (docs/VERIFIERS.md), in sandbox `mode`."""
    import os
    import random
    here = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(0)
    arith = [json.loads(line) for line in open(os.path.join(here, "data", "arith_sft.jsonl"))][:256]
    math_rows, math_resp = [], []
    for r in arith:  # half right, a quarter wrong, a quarter cut off before the box
        u, text = rng.random(), r["response"]
        if u < 0.25:
            gt = r["reward_model"]["ground_truth"]
            text = text.replace("\\boxed{" + gt, "\\boxed{1" + gt)
        elif u < 0.5:
            text = text[: len(text) // 2]
        math_rows.append(r)
        math_resp.append(text)
    code = [json.loads(line) for line in open(os.path.join(here, "data", "code_problems.jsonl"))]
    code_rows, code_resp = [], []
    for i in range(64):  # a quarter each: correct, wrong output, syntax error, exception
        r = code[i % len(code)]
        fn = json.loads(r["reward_model"]["ground_truth"]).get("fn_name")
        program = [r["extra_info"]["reference"], f"def {fn}(*a):\n    return 0" if fn else "print(0)",
                   "def f(:\n    pass", "raise ValueError('no')"][i % 4]
        code_rows.append(r)
        code_resp.append("Here is my solution.\n```python\n" + program + "\n```")
    problem = sandbox.bwrap_problem() if mode == "bwrap" else None
    if problem:
        raise SystemExit("error: " + sandbox.bwrap_error(problem))
    limits = sandbox.Limits(mode=mode)
    print(f"sandbox mode: {mode}, {os.cpu_count()} CPU cores, {workers} code workers")
    for name, rows, resp in [("256 math", math_rows, math_resp), ("64 code", code_rows, code_resp),
                             ("256 math + 64 code", math_rows + code_rows, math_resp + code_resp)]:
        outcome_rewards(rows[:8], resp[:8], limits, workers)  # warm caches (math-verify)
        t = time.perf_counter()
        out = outcome_rewards(rows, resp, limits, workers)
        dt = time.perf_counter() - t
        mean = sum(s for s, _ in out) / len(out)
        print(f"{name:>20}: {dt:6.2f} s, {len(rows) / dt:7.1f} samples/s, mean score {mean:.3f}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Benchmark the outcome verifiers")
    ap.add_argument("--bench", action="store_true", help="time a batch of 256 math and 64 code responses")
    ap.add_argument("--workers", type=int, default=4, help="threads running code responses in parallel")
    ap.add_argument("--sandbox", choices=("bwrap", "rlimit"), default="bwrap",
                    help="bwrap (stops if bubblewrap cannot run) or rlimit (a plain subprocess: trusted code only)")
    args = ap.parse_args()
    if args.bench:
        _bench(args.workers, args.sandbox)
    else:
        ap.print_help()
