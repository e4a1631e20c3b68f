"""The outcome verifiers: math answer extraction and equivalence, code extraction and scoring,
dispatch on `ability` with errors that name the sample, and batches that never raise."""
import json
import time

import pytest

import sandbox
import verifiers


@pytest.mark.parametrize("text, expect", [
    ("12+3=15;\\boxed{15}", "15"),
    ("\\boxed{1} and then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{\\sqrt{\\pi}}} done", "\\frac{\\sqrt{3}}{\\sqrt{\\pi}}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{ 3 } then \\fbox{4}", "4"),
    ("no box at all", None),
    ("\\boxed{12", None),
    ("so the answer is 42.", "42"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("answer: 7\nthat is all", "7"),
    ("the answer is 3, no wait, the answer is 5", "5"),
    ("the answer is \\boxed{9} (not 8)", "9"),
])
def test_extract_answer_takes_the_last_box_else_the_answer_phrase(text, expect):
    assert verifiers.extract_answer(text) == expect, f"extract_answer({text!r})"


MATH_CASES = [  # (response, ground truth, expected score)
    # equivalent forms
    ("\\boxed{55}", "55", 1.0),
    ("\\boxed{ 55 }", "55", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\tfrac34}", "0.75", 1.0),
    ("\\boxed{1/2}", "0.5", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{5.0}", "5", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{10\\text{ cm}}", "10", 1.0),
    ("\\boxed{\\$5}", "5", 1.0),
    ("\\boxed{\\text{(A)}}", "A", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    ("\\boxed{[1,2)}", "[1, 2)", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    ("\\boxed{2x+1}", "1+2x", 1.0),
    ("\\boxed{x^2}", "x^{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\sqrt3/2", 1.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{x=5}", "5", 1.0),
    ("\\boxed{\\infty}", "\\infty", 1.0),
    ("\\boxed{0.3333333}", "1/3", 1.0),
    ("first \\boxed{4}, corrected: \\boxed{5}", "5", 1.0),
    ("so the answer is 42.", "42", 1.0),
    ("The answer is $\\frac{3}{4}$.", "0.75", 1.0),
    # not equivalent
    ("\\boxed{54}", "55", 0.0),
    ("\\boxed{155}", "55", 0.0),
    ("\\boxed{-5}", "5", 0.0),
    ("\\boxed{(1,2]}", "[1,2)", 0.0),
    ("\\boxed{(2,1)}", "(1,2)", 0.0),
    ("\\boxed{-\\infty}", "\\infty", 0.0),
    ("\\boxed{1/3}", "0.333", 0.0),
    ("\\boxed{2x-1}", "2x+1", 0.0),
    ("\\boxed{a}", "b", 0.0),
    ("\\boxed{5} then \\boxed{4}", "5", 0.0),
    # malformed or missing answers
    ("\\boxed{\\frac{1}{}", "1", 0.0),
    ("\\boxed{}{", "1", 0.0),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),
    ("\\boxed{}", "55", 0.0),
    ("47+8=55;", "55", 0.0),
    ("", "1", 0.0),
    ("\\boxed{\\left(}", "(1,2)", 0.0),
]


def test_math_table_has_at_least_40_cases():
    assert len(MATH_CASES) >= 40, f"only {len(MATH_CASES)} math cases"


@pytest.mark.parametrize("response, gt, score", MATH_CASES)
def test_math_reward_matches_the_table(response, gt, score):
    got, reason = verifiers.math_reward(response, gt)
    assert got == score, f"math_reward({response!r}, {gt!r}) = {got} ({reason}), expected {score}"
    assert reason in verifiers.REASONS, f"unknown reason {reason!r}"


@pytest.mark.parametrize("response, reason", [
    ("47+8=55;\\boxed{55}", "correct"), ("\\boxed{54}", "wrong"), ("47+8=55;", "no_answer"),
    ("\\boxed{}", "no_answer"), ("\\boxed{12", "no_answer"),
])
def test_math_reason_says_why(response, reason):
    assert verifiers.math_reward(response, "55")[1] == reason, response


def test_a_ground_truth_math_verify_cannot_parse_is_warned_about_once(recwarn):
    """Its responses score 0 unless written exactly like it: a warning says so, once per ground truth."""
    for response in ("\\boxed{5}", "\\boxed{6}", "the answer is 7"):
        assert verifiers.math_reward(response, "}{ ") == (0.0, "wrong")
    hits = [w for w in recwarn if "cannot parse the ground truth '}{ '" in str(w.message)]
    assert len(hits) == 1 and hits[0].category is RuntimeWarning
    verifiers.math_reward("\\boxed{6}", "5")
    assert len(recwarn) == 1, "a ground truth that parses is not warned about"


@pytest.mark.parametrize("answer, gold", [("45", "45"), ("46", "45"), ("045", "45"), ("+7", "7"), ("-0", "0"),
                                          ("-3", "3"), ("12", "21"), ("-12", "-12"), ("1 000", "1000"), ("7", "-7")])
def test_integer_shortcut_agrees_with_math_verify(answer, gold):
    # math_equal compares two integer literals itself; the library's own verdict on the same pair
    from math_verify import parse, verify
    by_library = bool(verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{answer.replace(' ', '')}}}")))
    assert verifiers.math_equal(answer, gold) is by_library


def test_pathological_math_answer_is_cut_off_by_the_time_limit():
    t = time.monotonic()
    score, reason = verifiers.math_reward("\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "^{9^{9^{9}}}}", "1")
    took = time.monotonic() - t
    assert score == 0.0 and reason in ("wrong", "timeout", "no_answer"), (score, reason)
    assert took < 6 * verifiers.MATH_TIMEOUT, f"took {took:.1f}s"


ODD_ANSWERS = {  # answers a policy can write; each must score 0 without raising, and quickly
    "200k digits": "9" * 200_000, "5000-digit negative": "-" + "1" * 5000, "5000 nested braces": "{" * 5000 + "1" + "}" * 5000,
    "300 nested fractions": "\\frac{" * 300 + "1" + "}{2}" * 300, "500 nested roots": "\\sqrt{" * 500 + "2" + "}" * 500,
    "a 10k-digit fraction": "\\frac{" + "9" * 10_000 + "}{3}", "odd unicode": "\u202e\u0663\u0664\U0001F600\ufffd",
    "a NUL byte": "1\x00", "a lone surrogate": "4\ud8005", "a tower of powers": "9^9^9^9^9", "1e999999": "1e999999",
    "10**100000": "10**100000", "a 4301-digit decimal": "0." + "3" * 4301,
}


@pytest.mark.parametrize("name", list(ODD_ANSWERS), ids=range(len(ODD_ANSWERS)))
def test_any_math_answer_scores_zero_without_raising(name):
    t = time.monotonic()
    score, reason = verifiers.math_reward("1+2=3;\\boxed{" + ODD_ANSWERS[name] + "}", "45")
    assert score == 0.0 and reason in ("wrong", "timeout", "verifier_error"), (name, score, reason)
    assert verifiers.math_equal(ODD_ANSWERS[name], "45") is False, name
    assert time.monotonic() - t < 3 * verifiers.MATH_TIMEOUT, f"{name}: took {time.monotonic() - t:.1f}s"


def test_integers_of_any_length_compare_by_their_digits():
    big = "1" * 5000  # int() refuses more than 4300 digits
    assert verifiers.math_equal(big, big) and verifiers.math_equal("+000" + big, big)
    assert not verifiers.math_equal(big + "0", big) and not verifiers.math_equal("-" + big, big)
    assert verifiers.math_reward("\\boxed{" + big + "}", "0" + big) == (1.0, "correct")
    assert verifiers.integer_key("-0") == verifiers.integer_key("+00") == ("", "0")


def test_an_answer_math_verify_raises_on_scores_zero_and_is_counted(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("the library broke")
    monkeypatch.setattr(verifiers, "verify", broken)
    assert verifiers.math_reward("\\boxed{1/2}", "0.5") == (0.0, "verifier_error")
    assert verifiers.math_equal("1/2", "0.5") is False
    rows, texts = [_sample("math", "0.5", i) for i in range(5)], ["\\boxed{1/2}"] * 4 + ["\\boxed{0.5}"]
    with pytest.warns(RuntimeWarning) as seen:
        out = verifiers.outcome_rewards(rows, texts)
    assert out == [(0.0, "verifier_error")] * 4 + [(1.0, "correct")], out
    messages = [str(w.message) for w in seen]
    # the first MAX_ERRORS_SHOWN failures are logged by sample, the rest in one line
    assert sum("verifier failed on sample t#" in m for m in messages) == verifiers.MAX_ERRORS_SHOWN, messages
    assert any("1 more verifier failures in this batch" in m for m in messages), messages


@pytest.mark.parametrize("program", [
    "print(" * 100_000 + ")" * 100_000,  # the parser's recursion limit
    "x = 1\x00\n",  # a NUL byte in the source
    "print('\ud800')",  # a lone surrogate
    "# " + "y" * 100_000 + "\nprint(2)",  # a 100 kB program
    "print('9' * 10**7)",  # 10 MB of output
], ids=["deep-nesting", "nul-byte", "lone-surrogate", "100kB-program", "10MB-output"])
def test_any_code_response_scores_without_raising(program, code_mode):
    tests = json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})
    out = verifiers.outcome_rewards([_sample("code", tests)], ["```python\n" + program + "\n```"],
                                    sandbox.Limits(mode=code_mode), workers=1)
    assert len(out) == 1 and out[0][1] in verifiers.REASONS, out
    assert out[0][0] == (1.0 if program.endswith("print(2)") else 0.0), out


@pytest.mark.parametrize("response, program", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("first\n```python\nprint(1)\n```\nthen\n```python\nprint(2)\n```\ndone", "print(2)\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```python\nprint(3)", "print(3)"),  # unclosed last block runs to the end
    ("print(4)", "print(4)"),  # no block: the whole response
])
def test_extract_program_takes_the_last_python_block(response, program):
    assert verifiers.extract_program(response) == program, response


@pytest.mark.parametrize("results, expect", [
    (["pass"] * 3, (1.0, "correct")),
    (["pass", "wrong", "pass", "timeout"], (0.5, "partial")),
    (["wrong", "timeout"], (0.0, "wrong")),
    (["timeout", "wrong"], (0.0, "timeout")),
    (["pass"] * 5 + ["wrong"] * 15, (0.5, "partial")),  # only the first 10 count
    (["wrong"] + ["pass"] * 19, (0.9, "partial")),
    (["pass"] * 10 + ["wrong"], (0.9, "partial")),  # a failure after the first 10 still costs: never 1.0
    (["pass"] * 12 + ["timeout"] * 3, (0.9, "partial")),
])
def test_code_score_is_all_or_fraction_of_first_ten(results, expect):
    assert verifiers.code_score(results) == pytest.approx(expect), results


def _sample(ability, gt, index=4):
    return {"ability": ability, "reward_model": {"ground_truth": gt}, "data_source": "t", "extra_info": {"index": index}}


@pytest.mark.parametrize("sample, needle", [
    (_sample("poetry", "x"), "sample t#4: ability 'poetry' has no verifier"),
    ({"ability": "math", "data_source": "t", "extra_info": {"index": 4}}, "sample t#4: missing reward_model.ground_truth"),
    (_sample("code", "{not json"), "sample t#4: ground truth is not valid JSON"),
    (_sample("code", json.dumps({"inputs": ["1"]})), "sample t#4: ground truth needs 'inputs' and 'outputs'"),
    (_sample("code", json.dumps({"inputs": ["1"], "outputs": []})), "sample t#4: ground truth has 1 inputs and 0 outputs"),
    (_sample("code", json.dumps({"inputs": ["1"], "outputs": ["1"], "fn_name": "a b"})), "'fn_name' must be"),
    (_sample("code", json.dumps({"inputs": ["1"], "outputs": ["1"], "fn_name": "f"})), "need each input to be a list"),
])
def test_unverifiable_sample_raises_an_error_naming_it(sample, needle):
    with pytest.raises(ValueError) as e:
        verifiers.outcome_reward(sample, "x")
    assert needle in str(e.value), str(e.value)


def test_outcome_reward_dispatches_on_ability(code_mode):
    tests = json.dumps({"inputs": ["1\n", "5\n"], "outputs": ["2\n", "6\n"]})
    for sample, response, expect in [
        (_sample("math", "3"), "\\boxed{3}", (1.0, "correct")),
        (_sample("code", tests), "```python\nprint(int(input()) + 1)\n```", (1.0, "correct")),
        (_sample("code", tests), "```python\nprint(2)\n```", (0.5, "partial")),
        (_sample("code", tests), "I don't know", (0.0, "syntax_error")),
        (_sample("code", tests), "```python\n```", (0.0, "no_answer")),
    ]:
        got = verifiers.outcome_reward(sample, response, sandbox.Limits(mode=code_mode))
        assert got == expect, f"{sample['ability']} {response!r}: {got}, expected {expect}"


def test_batch_never_raises_and_keeps_order(code_mode):
    tests = json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})
    samples = [_sample("math", "3"), _sample("code", tests), _sample("poetry", "1"), _sample("math", "3"), _sample("code", tests)]
    responses = ["\\boxed{3}", "```python\nprint(2)\n```", "x", "\\boxed{4}", "```python\nraise ValueError\n```"]
    with pytest.warns(RuntimeWarning, match="verifier failed on sample t#4"):
        out = verifiers.outcome_rewards(samples, responses, sandbox.Limits(mode=code_mode), workers=2)
    assert out == [(1.0, "correct"), (1.0, "correct"), (0.0, "verifier_error"), (0.0, "wrong"), (0.0, "runtime_error")], out


def test_batch_matches_one_at_a_time(code_mode):
    rows = [json.loads(l) for l in open(sandbox.HERE + "/data/code_problems.jsonl")][:4]
    responses = ["```python\n" + r["extra_info"]["reference"] + "\n```" for r in rows] + ["print(0)"] * 4
    rows = rows + rows
    lim = sandbox.Limits(mode=code_mode)
    batch = verifiers.outcome_rewards(rows, responses, lim, workers=3)
    one = [verifiers.outcome_reward(r, t, lim) for r, t in zip(rows, responses)]
    assert batch == one, (batch, one)
