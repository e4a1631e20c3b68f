"""The math verifier: answer extraction and equivalence (a later issue makes it complete)."""
import pytest

import verifiers


@pytest.mark.parametrize("text, expect", [
    ("12+3=15;\\boxed{15}", "15"),
    ("\\boxed{1} and then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\fbox{7}", "7"),
    ("no box at all", None),
    ("\\boxed{12", None),
    ("so the answer is 42.", "42"),
])
def test_extract_answer_takes_the_last_box(text, expect):
    assert verifiers.extract_answer(text) == expect


@pytest.mark.parametrize("response, gt, score, reason", [
    ("47+8=55;\\boxed{55}", "55", 1.0, "correct"),
    ("47+8=54;\\boxed{54}", "55", 0.0, "wrong"),
    ("47+8=55;", "55", 0.0, "no_answer"),
    ("\\boxed{}", "55", 0.0, "no_answer"),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, "correct"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0, "correct"),
    ("\\boxed{ 55 }", "55", 1.0, "correct"),
    ("\\boxed{155}", "55", 0.0, "wrong"),
])
def test_math_reward(response, gt, score, reason):
    assert verifiers.math_reward(response, gt) == (score, reason)


def test_outcome_reward_dispatch_names_bad_samples():
    sample = {"ability": "math", "reward_model": {"ground_truth": "3"}, "data_source": "t", "extra_info": {"index": 4}}
    assert verifiers.outcome_reward(sample, "\\boxed{3}") == (1.0, "correct")
    with pytest.raises(ValueError, match="sample t#4: ability 'code'"):
        verifiers.outcome_reward({**sample, "ability": "code"}, "x")
    with pytest.raises(ValueError, match="sample t#4: missing reward_model.ground_truth"):
        verifiers.outcome_reward({**sample, "reward_model": {}}, "x")
