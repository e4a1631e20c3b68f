"""Outcome verifiers: the outcome reward r_o(y) ∈ [0, 1] of a response, from strings only.

PRIME's only supervision is this score (paper §4.1: r_math ∈ {0, 1}; spec §9). It trains both
the policy (through RLOO) and the implicit PRM (its cross-entropy labels), so it must be right.

- math: the last `\\boxed{...}` of the response (brace-matched, nested braces allowed; spec §9.1
  falls back to "the answer is ..." when there is no box) compared with the ground truth by
  math-verify (https://github.com/huggingface/Math-Verify), which handles fractions vs decimals,
  LaTeX spacing, `\\frac`/`\\dfrac` and the like. Score 1.0 or 0.0.
- code: not in this module yet (a later issue adds sandboxed execution); a code sample raises.

Entry point: `outcome_reward(sample, response) -> (score, reason)`, with `reason` one of
"correct", "wrong", "no_answer" so a run can count why samples fail. No torch here.

math-verify limits its own run time with SIGALRM, which only works in a process's main thread;
elsewhere (a thread pool) we turn its timeout off rather than crash.
"""
import functools
import re
import threading

from math_verify import parse, verify

_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$",
                        re.IGNORECASE)


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
    """The final answer of a math response: the last box, else "the answer is X"; None if none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    m = _ANSWER_IS.search(lines[-1]) if lines else None
    return m.group(1).strip() if m else None


def _timeout():
    # math-verify's timeouts use signal.alarm, which raises outside the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=100_000)
def _parse_gold(ground_truth):
    return parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=_timeout())


def math_equal(answer, ground_truth):
    """Is `answer` mathematically the same as `ground_truth`? (math-verify; exact match first)."""
    if answer.replace(" ", "") == str(ground_truth).replace(" ", ""):
        return True  # identical strings are equal; skips the parser on the common case
    gold = _parse_gold(str(ground_truth))
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout())
    return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=_timeout())


def math_reward(response, ground_truth):
    """(1.0, "correct") / (0.0, "wrong") / (0.0, "no_answer").

    Example: math_reward("3+4=7;\\boxed{7}", "7") -> (1.0, "correct")
    """
    answer = extract_answer(response)
    if answer is None or answer == "":
        return 0.0, "no_answer"
    return (1.0, "correct") if math_equal(answer, ground_truth) else (0.0, "wrong")


def outcome_reward(sample, response):
    """Dispatch on the sample's `ability` (Eurus-2-RL-Data schema). Returns (score, reason)."""
    ability = sample.get("ability")
    gt = (sample.get("reward_model") or {}).get("ground_truth")
    name = f"{sample.get('data_source', '?')}#{(sample.get('extra_info') or {}).get('index', '?')}"
    if gt is None:
        raise ValueError(f"sample {name}: missing reward_model.ground_truth")
    if ability == "math":
        return math_reward(response, gt)
    raise ValueError(f"sample {name}: ability {ability!r} has no verifier here (supported: 'math')")
