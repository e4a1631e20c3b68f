"""Tests for `steps.py`, the step labeller of the arithmetic task (data/generate.py).

Every expected label is written by hand from the response in the test (spans checked by the text
they cut out), never computed with the module's own helpers. No torch, milliseconds.
"""
import importlib.util
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import steps  # noqa: E402

PROMPT = "47+8-3+9-6="  # 47 → 55 → 52 → 61 → 55
SOLUTION = "47+8=55;55-3=52;52+9=61;61-6=55;\\boxed{55}"


def pieces(response, labels):
    """The text of each step's span, then of the box's span."""
    return [response[s:e] for s, e in (st.span for st in labels.steps)], (
        response[labels.box_span[0]:labels.box_span[1]] if labels.box_span else None)


def flags(labels):
    return [s.right for s in labels.steps], [s.follows for s in labels.steps]


def load_generate():
    spec = importlib.util.spec_from_file_location("generate", os.path.join(ROOT, "data", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# label_steps on hand-labelled responses, one of each kind
# --------------------------------------------------------------------------------------------

def test_correct_solution_has_every_step_right_and_following_and_no_error():
    lab = steps.label_steps(PROMPT, SOLUTION)
    step_texts, box_text = pieces(SOLUTION, lab)
    assert step_texts == ["47+8=55;", "55-3=52;", "52+9=61;", "61-6=55;"]
    assert box_text == "\\boxed{55}" and lab.box == 55
    assert [st.span for st in lab.steps] == [(0, 8), (8, 16), (16, 24), (24, 32)] and lab.box_span == (32, 42)
    assert [(st.a, st.op, st.b, st.c) for st in lab.steps] == [(47, "+", 8, 55), (55, "-", 3, 52),
                                                             (52, "+", 9, 61), (61, "-", 6, 55)]
    assert flags(lab) == ([True] * 4, [True] * 4)
    assert lab.first_wrong is None and lab.errors == () and lab.correct and lab.ok and lab.n_expected == 4


def test_generated_solutions_are_labelled_all_right():
    generate = load_generate()
    rng = random.Random(0)
    for _ in range(300):
        prompt, solution, answer = generate.make_problem(rng, rng.randint(1, 6), 10, 99, 19)
        lab = steps.label_steps(prompt, solution)
        assert lab.ok and lab.correct and lab.box == int(answer), f"{prompt} {solution}: {lab}"


def test_arithmetic_slip_at_step_2_is_the_first_wrong_step_and_later_consistent_steps_are_right():
    # 55-3 is 52, not 51; the later steps carry 51 on correctly, so they are right and follow.
    response = "47+8=55;55-3=51;51+9=60;60-6=54;\\boxed{54}"
    lab = steps.label_steps(PROMPT, response)
    assert flags(lab) == ([True, False, True, True], [True, True, True, True])
    assert lab.first_wrong == 1
    assert lab.errors == (), "the box equals the last step's result: no format error"
    assert lab.box == 54 and not lab.correct and not lab.ok


def test_chain_break_counts_as_the_first_wrong_step_although_its_arithmetic_is_right():
    # Step 2 starts from 53, not the previous result 52: right arithmetic, chain broken.
    response = "47+8=55;55-3=52;53+9=62;62-6=56;\\boxed{56}"
    lab = steps.label_steps(PROMPT, response)
    assert flags(lab) == ([True] * 4, [True, True, False, True])
    assert lab.first_wrong == 2 and lab.errors == () and not lab.correct


def test_step_with_the_wrong_operation_does_not_follow_the_chain():
    # 55+3 uses the previous result but not the prompt's "-3".
    lab = steps.label_steps(PROMPT, "47+8=55;55+3=58;58+9=67;67-6=61;\\boxed{61}")
    assert flags(lab) == ([True] * 4, [True, False, True, True])
    assert lab.first_wrong == 1


def test_skipped_step_is_a_step_count_error_and_breaks_the_chain_where_it_happens():
    # "-3" is skipped: step 1 does "+9" where the prompt's second operation is "-3".
    response = "47+8=55;55+9=64;64-6=58;\\boxed{58}"
    lab = steps.label_steps(PROMPT, response)
    assert pieces(response, lab) == (["47+8=55;", "55+9=64;", "64-6=58;"], "\\boxed{58}")
    assert flags(lab) == ([True] * 3, [True, False, False])
    assert lab.first_wrong == 1 and lab.errors == ("step_count",) and not lab.correct


def test_short_chain_with_right_steps_has_no_wrong_step_but_a_step_count_error():
    lab = steps.label_steps(PROMPT, "47+8=55;55-3=52;\\boxed{52}")
    assert flags(lab) == ([True, True], [True, True])
    assert lab.first_wrong is None and lab.errors == ("step_count",) and not lab.ok


def test_extra_step_past_the_last_operation_does_not_follow():
    lab = steps.label_steps(PROMPT, "47+8=55;55-3=52;52+9=61;61-6=55;55+0=55;\\boxed{55}")
    assert flags(lab) == ([True] * 5, [True] * 4 + [False])
    assert lab.first_wrong == 4 and lab.errors == ("step_count",)
    assert lab.correct, "the box still holds the right total"


def test_missing_box_with_right_steps_is_a_format_error_only():
    lab = steps.label_steps(PROMPT, "47+8=55;55-3=52;52+9=61;61-6=55;")
    assert flags(lab) == ([True] * 4, [True] * 4)
    assert lab.first_wrong is None and lab.errors == ("missing_box",)
    assert lab.box is None and lab.box_span is None and not lab.correct and not lab.ok


def test_box_cut_short_is_junk_and_a_missing_box():
    lab = steps.label_steps(PROMPT, "47+8=55;55-3=52;52+9=61;61-6=55;\\boxed{5")
    assert lab.errors == ("junk", "missing_box") and lab.first_wrong is None


def test_wrong_final_box_after_right_steps():
    lab = steps.label_steps(PROMPT, "47+8=55;55-3=52;52+9=61;61-6=55;\\boxed{56}")
    assert flags(lab) == ([True] * 4, [True] * 4)
    assert lab.first_wrong is None and lab.errors == ("wrong_box",) and lab.box == 56 and not lab.correct


def test_unparsable_piece_is_a_wrong_step_and_the_next_step_cannot_follow_it():
    # "55-3=;" has no result; 52+9=61 is right but does not follow a step with no result.
    response = "47+8=55;55-3=;52+9=61;61-6=55;\\boxed{55}"
    lab = steps.label_steps(PROMPT, response)
    assert pieces(response, lab)[0] == ["47+8=55;", "55-3=;", "52+9=61;", "61-6=55;"]
    assert (lab.steps[1].a, lab.steps[1].c) == (None, None)
    assert flags(lab) == ([True, False, True, True], [True, False, False, True])
    assert lab.first_wrong == 1 and lab.errors == ("junk",)
    assert lab.correct, "the box is the right total; the outcome alone would call this response right"


def test_garbage_is_junk_and_every_piece_is_a_wrong_step():
    response = "hello;;47+8==55;\\boxed{55}x"
    lab = steps.label_steps(PROMPT, response)
    assert pieces(response, lab) == (["hello;", ";", "47+8==55;"], None)
    assert flags(lab) == ([False] * 3, [False] * 3)
    assert lab.first_wrong == 0 and lab.errors == ("junk", "missing_box", "step_count")


def test_garbage_without_a_semicolon_has_no_steps():
    lab = steps.label_steps(PROMPT, "abc 12 xyz")
    assert lab.steps == () and lab.first_wrong is None
    assert lab.errors == ("junk", "missing_box", "step_count") and not lab.ok


def test_empty_response_is_empty_missing_box_and_step_count():
    for response in ("", "  \n"):
        lab = steps.label_steps(PROMPT, response)
        assert lab.steps == () and lab.box is None and lab.first_wrong is None
        assert lab.errors == ("empty", "missing_box", "step_count"), f"{response!r}: {lab.errors}"
        assert not lab.correct and not lab.ok


def test_negative_numbers_parse_and_whitespace_around_the_box_is_allowed():
    response = "5-3=2;2-4=-2;\\boxed{-2}\n"
    lab = steps.label_steps("5-3-4=", response)
    assert lab.ok and lab.correct and lab.box == -2
    assert response[lab.box_span[0]:lab.box_span[1]] == "\\boxed{-2}"


def test_parse_prompt_reads_start_and_operations_and_rejects_other_text():
    assert steps.parse_prompt(PROMPT) == (47, [("+", 8), ("-", 3), ("+", 9), ("-", 6)])
    for text in ("What is 2+2?", "47+8-3", "1" * 700 + "+1=", 47):
        with pytest.raises(ValueError, match="not a prompt of the arithmetic task"):
            steps.parse_prompt(text)


def test_a_number_too_long_for_int_makes_a_junk_step_not_a_crash():
    """int() refuses digit strings over 4300 digits (ValueError); a response is untrusted text, and
    the same response comes back on every resume (the RNG replays it): it must label, not raise."""
    huge = "5" * 5000
    lab = steps.label_steps("47+8-3=", f"47+8=55;55-3={huge};\\boxed{{{huge}}}")
    assert [s.a for s in lab.steps] == [47, None] and not lab.steps[1].right and not lab.steps[1].follows
    assert lab.first_wrong == 1 and lab.errors == ("junk", "missing_box") and lab.box is None and not lab.correct
    lab = steps.label_steps("47+8-3=", f"47+8=55;55-3=52;\\boxed{{{huge}}}")  # right steps, then a huge box
    assert lab.first_wrong is None and lab.errors == ("junk", "missing_box") and lab.box is None
    a, c = "1" * 640, "1" * 639 + "2"  # 640 digits, the longest number that parses: judged as any other
    lab = steps.label_steps(f"{a}+1=", f"{a}+1={c};\\boxed{{{c}}}")
    assert lab.ok and lab.correct and lab.box == int(c)


# --------------------------------------------------------------------------------------------
# character spans → token index ranges
# --------------------------------------------------------------------------------------------

def test_character_tokenizer_token_ranges_equal_the_character_spans():
    tokens = list(SOLUTION) + [""]  # one token per character, then the EOS, decoded to ""
    lab = steps.label_steps(PROMPT, SOLUTION)
    spans = [st.span for st in lab.steps] + [lab.box_span]
    assert steps.token_spans(spans, tokens, text=SOLUTION) == spans


def test_token_offsets_are_cumulative_lengths_and_special_tokens_are_empty():
    assert steps.token_offsets(["47", "+", "8", ""]) == [(0, 2), (2, 3), (3, 4), (4, 4)]


def test_token_straddling_two_steps_belongs_to_both():
    # "47+8=55;55-3=52;": the token "55;5" ends step 0 and starts step 1.
    tokens = ["47+", "8=", "55;5", "5-", "3=52;"]
    assert steps.token_spans([(0, 8), (8, 16)], tokens) == [(0, 3), (2, 5)]


def test_empty_span_maps_to_an_empty_token_range():
    assert steps.token_spans([(3, 3)], ["ab", "cd"]) == [(2, 2)]


def test_tokens_that_do_not_join_to_the_text_are_refused():
    with pytest.raises(AssertionError, match="do not join"):
        steps.token_spans([(0, 1)], ["4", "7"], text="47;")


# --- judging a PRM by the labels, and the oracle rewards ------------------------------------
def test_step_scores_sum_each_steps_token_rewards():
    assert steps.step_scores([0.1, -0.3, 0.2, 0.5, 9.0], [(0, 2), (2, 4)]) == pytest.approx([-0.2, 0.7])
    assert steps.step_scores([1.0, 2.0], [(1, 1)]) == [0], "an empty token range scores 0"


@pytest.mark.parametrize("scores, threshold, want", [([0.2, -0.1, -0.5], 0.0, 1), ([0.2, 0.0], 0.0, None),
                                                     ([0.2, 0.1], 0.15, 1), ([], 0.0, None)])
def test_predicted_first_error_is_the_first_step_below_the_threshold(scores, threshold, want):
    assert steps.predicted_first_error(scores, threshold) == want


def test_auroc_counts_pairs_with_ties_as_half():
    assert steps.auroc([0.3, 0.1], [0.2]) == 0.5  # 0.3 > 0.2 wins, 0.1 < 0.2 loses
    assert steps.auroc([1.0, 1.0], [1.0, 0.0]) == (0.5 + 1 + 0.5 + 1) / 4
    assert steps.auroc([1.0], []) is None


def test_process_metrics_by_hand():
    """Five responses to PROMPT, scores made up, expected values counted by hand."""
    slip = steps.label_steps(PROMPT, "47+8=55;55-3=51;51+9=60;60-6=54;\\boxed{54}")  # first wrong: step 1
    late = steps.label_steps(PROMPT, "47+8=55;55-3=52;52+9=60;60-6=54;\\boxed{54}")  # first wrong: step 2
    good = steps.label_steps(PROMPT, SOLUTION)
    nobox = steps.label_steps(PROMPT, "47+8=55;55-3=52;52+9=61;61-6=55;")  # format only
    assert (slip.first_wrong, late.first_wrong, good.ok, nobox.first_wrong) == (1, 2, True, None)
    items = [(slip, [0.1, -0.2, 0.3, 0.1]),   # predicted 1 = true 1: hit
             (late, [-0.1, 0.1, -0.1, 0.2]),  # predicted 0 != true 2: miss
             (good, [0.1, 0.2, 0.3, 0.0]),    # predicted none: hit
             (good, [0.1, -0.1, 0.3, 0.0]),   # predicted 1: miss
             (nobox, [-1.0, -1.0, -1.0, -1.0])]  # not counted in the accuracies
    m = steps.process_metrics(items)
    assert (m["n_err"], m["n_ok"], m["n_format_only"]) == (2, 2, 1)
    assert m["acc_err"] == 0.5 and m["acc_ok"] == 0.5 and m["f1"] == pytest.approx(0.5)
    # Wrong steps (not right or not following): slip's step 1 (-0.2) and late's step 2 (-0.1);
    # late's step 3 (60-6=54) is right arithmetic and takes the previous result: a right step.
    wrong = [-0.2, -0.1]
    right = [0.1, 0.3, 0.1, -0.1, 0.1, 0.2, 0.1, 0.2, 0.3, 0.0, 0.1, -0.1, 0.3, 0.0, -1.0, -1.0, -1.0, -1.0]
    assert [s.right and s.follows for s in late.steps] == [True, True, False, True]
    want = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong) / (len(right) * len(wrong))
    assert m["auroc"] == pytest.approx(want)


def test_process_metrics_f1_is_none_without_correct_responses():
    slip = steps.label_steps(PROMPT, "47+8=55;55-3=51;51+9=60;60-6=54;\\boxed{54}")
    m = steps.process_metrics([(slip, [0.0, -1.0, 0.0, 0.0])])
    assert m["acc_err"] == 1.0 and m["acc_ok"] is None and m["f1"] is None


def test_oracle_first_form_blames_only_the_first_wrong_steps_tokens():
    r = "47+8=55;55-3=51;51+9=60;60-7=53;\\boxed{53}"  # step 1 slips, step 3 uses a wrong operation
    labels = steps.label_steps(PROMPT, r)
    tokens = list(r) + [""]  # the character tokenizer, and an EOS
    spans = steps.token_spans([s.span for s in labels.steps], tokens, r + "")
    box = steps.token_spans([labels.box_span], tokens)[0]
    first = steps.oracle_rewards(labels, spans, box, len(tokens), "first")
    assert [t for t, v in zip(tokens, first) if v == -1.0] == list("55-3=51;")
    assert sum(first) == -8.0
    every = steps.oracle_rewards(labels, spans, box, len(tokens), "every")
    assert "".join(t for t, v in zip(tokens, every) if v == -1.0) == "55-3=51;60-7=53;"


def test_oracle_gives_nothing_to_a_correct_response_and_blames_the_box_of_a_format_error():
    tokens = list(SOLUTION) + [""]
    labels = steps.label_steps(PROMPT, SOLUTION)
    spans = steps.token_spans([s.span for s in labels.steps], tokens)
    box = steps.token_spans([labels.box_span], tokens)[0]
    assert steps.oracle_rewards(labels, spans, box, len(tokens)) == [0.0] * len(tokens)
    wrong_box = SOLUTION.replace("{55}", "{56}")
    labels = steps.label_steps(PROMPT, wrong_box)
    tokens = list(wrong_box)
    box = steps.token_spans([labels.box_span], tokens)[0]
    r = steps.oracle_rewards(labels, steps.token_spans([s.span for s in labels.steps], tokens), box, len(tokens))
    assert "".join(t for t, v in zip(tokens, r) if v) == "\\boxed{56}"
    cut = "47+8=55;55-3=52;"  # right but short, no box: the last token
    labels = steps.label_steps(PROMPT, cut)
    r = steps.oracle_rewards(labels, steps.token_spans([s.span for s in labels.steps], list(cut)), None, len(cut))
    assert r == [0.0] * (len(cut) - 1) + [-1.0]
