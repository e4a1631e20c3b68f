"""Step labels for the embedded arithmetic task: which step of a response went wrong, exactly.

The task is the one `data/generate.py` writes (this module is its checker; it lives at the top
level, next to `verifiers.py`, so the loop and the tests import it as `import steps`):

    prompt:    "47+8-3+9-6="
    solution:  "47+8=55;55-3=52;52+9=61;61-6=55;\\boxed{55}"

Every step `a±b=c;` can be checked on its own, so a response has a ground truth *per step*, which
is what the implicit PRM's token rewards (prm.py) are meant to find and what no outcome label says.
For one response `label_steps(prompt, response)` gives

  - the character span [start, end) of each step (its `;` included) and of the final `\\boxed{}`;
  - per step, `right`:   a ± b == c, judged on the step's own numbers;
              `follows`: a is the previous step's c (the prompt's first number for step 0) and
                         ±b is the prompt's operation of the same index (the chain is followed);
  - `first_wrong`: the index (0-based) of the first step that is not right *or* does not follow
    the chain; None when every step is right and follows. A chain break counts as wrong: a step
    such as `55+9=64` after `47+8=55` in "47+8-3+9-6=" is right arithmetic on the wrong numbers;
  - `errors`, the format errors, each a name of ERRORS:
        "empty"        the response is empty (or only whitespace)
        "junk"         text that is neither a step `a±b=c;` nor the final `\\boxed{N}`: a `;`-ended
                       piece that does not parse (it still counts as a step, wrong and not
                       following; a number of more than 640 digits does not parse), or text
                       after the last `;` that is not a box
        "missing_box"  no `\\boxed{N}` (N an integer) after the last step
        "step_count"   a number of steps other than the prompt's number of operations (a
                       skipped, merged or extra step, or a response cut short)
        "wrong_box"    the box differs from the last step's result c (the steps may all be right)
  - `correct`: the box equals the prompt's true total (the outcome, by this module's parse).

A response with no wrong step can still be wrong as a whole (a short chain, a missing or wrong box):
`first_wrong` is None for it and `errors` says why; `ok` is "no wrong step and no format error".
`token_spans` maps the character spans to token index ranges, for any tokenizer.

Pure Python: strings in, labels out. No torch, no model.
Run the tests: python -m pytest -q tests/test_steps.py
"""
import re
from dataclasses import dataclass
from typing import Optional

ERRORS = ("empty", "junk", "missing_box", "step_count", "wrong_box")

# A number is at most 640 digits: int() refuses longer digit strings under the lowest limit Python
# can be set to (sys.set_int_max_str_digits; its default is 4300), and the task's numbers have 1-3.
# A longer number in a response makes its piece junk (or its box missing), not a crash.
_N = r"\d{1,640}"
_PROMPT = re.compile(rf"({_N})((?:[+-]{_N})+)=")  # "47+8-3+9-6="
_OPERATION = re.compile(r"([+-])(\d+)")  # one "+8" or "-3" of a prompt
_STEP = re.compile(rf"(-?{_N})([+-])({_N})=(-?{_N});")  # a model may write a negative a or c
_BOX = re.compile(rf"\s*\\boxed\{{(-?{_N})\}}\s*")  # the whole text after the last ';'
_PIECE = re.compile(r"[^;]*;")  # a step candidate: everything up to and including the next ';'


@dataclass(frozen=True)
class Step:
    """One `;`-ended piece of a response. a, op, b, c are None when the piece does not parse."""
    span: tuple  # (start, end): response[start:end] is the piece, its ';' included
    a: Optional[int]
    op: Optional[str]  # "+" or "-"
    b: Optional[int]
    c: Optional[int]
    right: bool  # a ± b == c (False when unparsed)
    follows: bool  # a = previous c (prompt's first number for step 0), ±b = the prompt's operation


@dataclass(frozen=True)
class StepLabels:
    """The ground truth of one response (see the module docstring for each field's rule)."""
    steps: tuple  # of Step, in order
    box: Optional[int]  # the final \boxed{N}'s N, None when missing
    box_span: Optional[tuple]  # (start, end) of "\boxed{N}" in the response
    first_wrong: Optional[int]  # first step that is not right or does not follow; None if none
    errors: tuple  # format errors, names from ERRORS, in ERRORS' order
    n_expected: int  # the prompt's number of operations = the number of steps of a solution
    correct: bool  # box == the prompt's true total

    @property
    def ok(self):
        """No wrong step and no format error: the response is a correct solution, step by step."""
        return self.first_wrong is None and not self.errors


def parse_prompt(prompt):
    """The start number and the operations of a task prompt.

    Example: parse_prompt("47+8-3+9-6=") -> (47, [("+", 8), ("-", 3), ("+", 9), ("-", 6)])
    A ValueError names any other text (tasks.check_row refuses such rows when they are loaded).
    """
    m = _PROMPT.fullmatch(prompt.strip()) if isinstance(prompt, str) else None
    if m is None:
        raise ValueError(f"not a prompt of the arithmetic task (like '47+8-3='): {prompt!r:.80}")
    return int(m.group(1)), [(op, int(b)) for op, b in _OPERATION.findall(m.group(2))]


def _apply(a, op, b):
    return a + b if op == "+" else a - b


def label_steps(prompt, response):
    """Label every step of `response` to the task `prompt` (rules: module docstring).

    Steps are the `;`-ended pieces of the response, in order; the text after the last `;` must be
    the box. Step i is judged against the prompt's i-th operation; a step past the prompt's last
    operation does not follow (there is no operation for it).
    Example: label_steps("47+8-3=", "47+8=55;55-3=51;\\boxed{51}")
             -> steps right (True, False), follows (True, True); first_wrong 1;
                errors (); box 51; correct False
    """
    start, operations = parse_prompt(prompt)
    steps, errors = [], set()
    prev_c = start  # what the next step's a must be; None after an unparsed step
    end = 0  # where the text after the last ';' begins
    for i, piece in enumerate(_PIECE.finditer(response)):
        end = piece.end()
        m = _STEP.fullmatch(piece.group())
        if m is None:
            errors.add("junk")
            steps.append(Step(piece.span(), None, None, None, None, right=False, follows=False))
            prev_c = None
            continue
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        follows = i < len(operations) and prev_c == a and operations[i] == (op, b)
        steps.append(Step(piece.span(), a, op, b, c, right=_apply(a, op, b) == c, follows=follows))
        prev_c = c

    tail = response[end:]
    box_match = _BOX.fullmatch(tail)
    box = int(box_match.group(1)) if box_match else None
    box_span = None
    if box_match:
        lead = len(tail) - len(tail.lstrip())  # the span covers "\boxed{N}" without the whitespace
        box_span = (end + lead, end + len(tail.rstrip()))
    elif tail.strip():
        errors.add("junk")
    if not response.strip():
        errors.add("empty")
    if box is None:
        errors.add("missing_box")
    if len(steps) != len(operations):
        errors.add("step_count")
    if box is not None and steps and steps[-1].c is not None and box != steps[-1].c:
        errors.add("wrong_box")

    total = start
    for op, b in operations:
        total = _apply(total, op, b)
    first_wrong = next((i for i, s in enumerate(steps) if not (s.right and s.follows)), None)
    return StepLabels(steps=tuple(steps), box=box, box_span=box_span, first_wrong=first_wrong,
                      errors=tuple(e for e in ERRORS if e in errors), n_expected=len(operations),
                      correct=box == total)


def token_offsets(tokens):
    """Character span [start, end) of each token in "".join(tokens).

    `tokens` are the response's tokens as text, each decoded on its own (special tokens as "",
    so an EOS gets an empty span). With the default character tokenizer every span has length 1.
    Example: token_offsets(["47", "+", "8", ""]) -> [(0, 2), (2, 3), (3, 4), (4, 4)]
    """
    offsets, pos = [], 0
    for t in tokens:
        offsets.append((pos, pos + len(t)))
        pos += len(t)
    return offsets


def token_spans(char_spans, tokens, text=None):
    """Token index range [i, j) of each character span: the tokens that share a character with it.

    A token that straddles two spans (a BPE piece such as "55;5") belongs to both; an empty token
    (a decoded EOS) belongs to none; an empty span gets an empty range. `text`, when given, must be "".join(tokens): byte-level
    tokenizers can split one character over two tokens, whose separate decodings then do not add
    up to the text, and offsets computed from them would be wrong.
    Example: token_spans([(0, 8), (8, 16)], ["47+", "8=", "55;5", "5-", "3=52;"]) -> [(0, 3), (2, 5)]
             (text "47+8=55;55-3=52;": the token "55;5" ends step 0 and starts step 1)
    """
    if text is not None:
        assert "".join(tokens) == text, "the tokens, decoded one by one, do not join to the text"
    offsets = token_offsets(tokens)
    total = offsets[-1][1] if offsets else 0
    ranges = []
    for start, end in char_spans:
        assert 0 <= start <= end <= total, f"span ({start}, {end}) outside the {total} characters of the tokens"
        hit = [k for k, (s, e) in enumerate(offsets) if max(s, start) < min(e, end)]  # shares a character
        if hit:
            ranges.append((hit[0], hit[-1] + 1))
        else:  # an empty span: the empty range at the first token that starts at or after it
            k = next((k for k, (s, _) in enumerate(offsets) if s >= start), len(offsets))
            ranges.append((k, k))
    return ranges


# ---------------------------------------------------------------------------------------------
# Judging a PRM by the step labels (ProcessBench-style; Zheng et al., 2024, arXiv 2412.06559),
# and the oracle process rewards that the labels give.
# ---------------------------------------------------------------------------------------------
def step_scores(token_rewards, spans):
    """The PRM's reward of each step: the sum of its tokens' rewards (β·q_t), spans from token_spans.

    Example: step_scores([0.1, -0.3, 0.2, 0.5], [(0, 2), (2, 4)]) -> [-0.2, 0.7] (up to rounding)
    """
    return [sum(token_rewards[i:j]) for i, j in spans]


def predicted_first_error(scores, threshold=0.0):
    """Index of the first step whose summed reward is below `threshold`, or None.

    The threshold 0: a step's summed reward β·Σq is the PRM's log-odds contribution, β·log of how
    much more likely π_φ finds the step than π_ref does; below 0 the PRM finds the step *less*
    likely than the reference, i.e. it blames it (σ(β·Σq) < 0.5, ProcessBench's 0.5 on a PRM's
    probability). No threshold is tuned: this task has no held-out set for calibrating one.
    Example: predicted_first_error([0.2, -0.1, -0.5]) -> 1;  predicted_first_error([0.2, 0.0]) -> None
    """
    return next((i for i, s in enumerate(scores) if s < threshold), None)


def auroc(pos, neg):
    """P(a random `pos` score > a random `neg` score), ties counting 1/2 (the Mann-Whitney AUROC);
    None when either list is empty. Example: auroc([0.3, 0.1], [0.2]) -> 0.5"""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def process_metrics(items, threshold=0.0):
    """How well step rewards point at the step that went wrong, over `items` = [(StepLabels, scores)].

    - erroneous responses (a wrong step, `first_wrong` is not None): `acc_err` = the share whose
      predicted first error (predicted_first_error) is the true first wrong step;
    - correct responses (every step right and following, no format error, right answer): `acc_ok`
      = the share predicted "no error";
    - `f1` = the harmonic mean of acc_err and acc_ok (ProcessBench's F1);
    - `auroc`: summed rewards of right steps (right and following) against wrong steps, over all
      responses' steps.
    Responses that are neither (no wrong step but a format error: a missing or wrong box, a short
    chain) count in `n_format_only` only: they have no wrong step to find.
    Metrics that have no responses to average are None.
    """
    hit_err, n_err, hit_ok, n_ok, n_fmt, right, wrong = 0, 0, 0, 0, 0, [], []
    for labels, scores in items:
        assert len(scores) == len(labels.steps), "one score per step"
        for s, sc in zip(labels.steps, scores):
            (right if s.right and s.follows else wrong).append(sc)
        pred = predicted_first_error(scores, threshold)
        if labels.first_wrong is not None:
            n_err += 1
            hit_err += pred == labels.first_wrong
        elif labels.ok and labels.correct:
            n_ok += 1
            hit_ok += pred is None
        else:
            n_fmt += 1
    acc_err = hit_err / n_err if n_err else None
    acc_ok = hit_ok / n_ok if n_ok else None
    f1 = None
    if acc_err is not None and acc_ok is not None:
        f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0
    return {"acc_err": acc_err, "acc_ok": acc_ok, "f1": f1, "auroc": auroc(right, wrong),
            "n_err": n_err, "n_ok": n_ok, "n_format_only": n_fmt}


ORACLE_FORMS = ("first", "every")


def oracle_rewards(labels, spans, box_span, n_tokens, form="first"):
    """Process rewards from the step labels instead of a PRM: a list of n_tokens values.

    `form` "first": -1 on every token of the first wrong step, 0 elsewhere: the one place an
    error entered the chain. "every": -1 on the tokens of every step that is not right or does
    not follow the chain (each judged on its own numbers). A response with no wrong step that is
    still not correct (a wrong or missing box, a short chain) gets -1 on its box's tokens, or on
    its last token when it has no box. A correct response gets all 0: the outcome reward already
    credits it, and the oracle says only where a wrong response went wrong.
    `spans`: the token ranges of the steps, `box_span`: the box's token range or None.
    Example: a 4-step response whose step 1 (tokens 8-16) is wrong, form "first" ->
             [0]*8 + [-1]*8 + [0]*(n_tokens-16)
    """
    assert form in ORACLE_FORMS, f"oracle form must be one of {ORACLE_FORMS}, got {form!r}"
    r = [0.0] * n_tokens
    if form == "first":
        wrong = [] if labels.first_wrong is None else [labels.first_wrong]
    else:
        wrong = [k for k, s in enumerate(labels.steps) if not (s.right and s.follows)]
    marked = [spans[k] for k in wrong]
    if not marked and not (labels.ok and labels.correct) and n_tokens:
        marked = [box_span if box_span and box_span[1] > box_span[0] else (n_tokens - 1, n_tokens)]
    for i, j in marked:
        for t in range(i, j):
            r[t] = -1.0
    return r
