"""The tasks: data rows, their chat prompts, and scoring responses against them.

Rows follow the schema of PRIME's RL data, Eurus-2-RL-Data (`prompt` as chat messages,
`ability` math or code, `reward_model.ground_truth`, `data_source`), read from JSONL, Parquet or
JSON files or a hub dataset and checked row by row (an error names the file and line).
`prompt_text` is what the model sees: the chat template with PRIME's system prompt and task
suffix (paper §4.1), or BOS + the prompt for the tiny default. `verify_batch` turns response
texts into outcome scores r_o through verifiers.py (code runs in sandbox.py's sandbox). On the
embedded arithmetic task every step can be checked too: `label_batch` labels each response's
steps (steps.py) and maps them to token ranges, and `oracle_process_rewards` turns the labels
into process rewards.

It must not touch: models, adapters or the config object (it takes plain values).
"""
import json
import os
import weakref

import torch

import sandbox
import steps
import verifiers
from models import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))


def resolve(path):
    """Paths in the config are relative to the working directory, or else to this file's folder."""
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(HERE, path)


SCHEMA = ("prompt", "ability", "reward_model")


def is_local_data(path):
    """A data file (JSONL, JSON or Parquet) rather than a hub dataset name such as PRIME-RL/Eurus-2-RL-Data."""
    return path.endswith((".jsonl", ".json", ".parquet"))


def check_row(r, where, need_response=False):
    """Stop at the first row that does not follow the schema, naming where it is and the field:
    a value of the wrong type would otherwise pass here and fail mid-run (after the SFT warm-up)."""
    if not isinstance(r, dict):
        raise ConfigError(f"{where}: a row must be a JSON object")
    msgs = r.get("prompt")
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "content" in m for m in msgs)):
        raise ConfigError(f"{where}: 'prompt' must be a list of chat messages with 'content'")
    for i, m in enumerate(msgs):
        if not isinstance(m["content"], str):
            raise ConfigError(f"{where}: prompt[{i}].content must be a string, got {m['content']!r:.80}")
        if not isinstance(m.get("role", "user"), str):
            raise ConfigError(f"{where}: prompt[{i}].role must be a string, got {m['role']!r:.80}")
    if not isinstance(r.get("reward_model"), dict) or "ground_truth" not in r["reward_model"]:
        raise ConfigError(f"{where}: missing 'reward_model.ground_truth'")
    if r.get("ability") not in ("math", "code"):
        raise ConfigError(f"{where}: 'ability' must be 'math' or 'code' (got {r.get('ability')!r})")
    for key in ("data_source", "extra_info"):  # names a sample in warnings; picks the embedded task
        if r.get(key) is not None and not isinstance(r[key], (str if key == "data_source" else dict)):
            raise ConfigError(f"{where}: '{key}' must be {'a string' if key == 'data_source' else 'an object'}, "
                              f"got {r[key]!r:.80}")
    gt = r["reward_model"]["ground_truth"]
    if r["ability"] == "math" and (isinstance(gt, bool) or not isinstance(gt, (str, int, float)) or not str(gt).strip()):
        raise ConfigError(f"{where}: a math row's 'reward_model.ground_truth' must be the answer as a string "
                          f"(or a number), got {gt!r:.80}")
    try:  # code ground truth is a JSON string of test cases: check it now, not mid-run
        verifiers.check_sample(r)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if r.get("data_source") == STEP_TASK:  # its steps are checked by steps.py: the prompt must be a chain
        try:
            start, operations = steps.parse_prompt(msgs[-1]["content"])
        except ValueError as e:
            raise ConfigError(f"{where}: a '{STEP_TASK}' row's last prompt message must be a chain such as "
                              f"'47+8-3=' ({e})") from None
        total = start + sum(b if op == "+" else -b for op, b in operations)
        if str(gt).strip() != str(total):
            raise ConfigError(f"{where}: the chain {msgs[-1]['content'].strip()} is {total}, but "
                              f"'reward_model.ground_truth' is {gt!r:.80}")
    if need_response and not isinstance(r.get("response"), str):
        raise ConfigError(f"{where}: SFT rows need a 'response' string")


def load_rows(path, need_response=False):
    """Read the rows of a JSONL file (our own reader: errors name file and line), or of a Parquet
    or JSON file or a hub dataset (`NAME` or `NAME:SPLIT`, default split train) through
    `datasets.load_dataset`."""
    if not path.endswith(".jsonl"):
        return load_dataset_rows(path, need_response)
    rows = []
    try:
        f = open(resolve(path), "rb")  # bytes: a line that is not UTF-8 is named, not a bare UnicodeDecodeError
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line is {raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            check_row(r, where, need_response)
            rows.append(r)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def load_dataset_rows(path, need_response=False):
    import datasets
    datasets.disable_progress_bars()
    try:
        if is_local_data(path):
            kind = "parquet" if path.endswith(".parquet") else "json"
            ds = datasets.load_dataset(kind, data_files=resolve(path), split="train")
        else:
            name, _, split = path.partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        rows = ds.to_list()  # decodes the strings: a file that is not UTF-8 fails here
    except Exception as e:  # no such dataset, hub unreachable, unreadable file: all stop here
        raise ConfigError(f"{path}: cannot load with datasets ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [c for c in SCHEMA + (("response",) if need_response else ()) if c not in ds.column_names]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}; the Eurus-2-RL-Data schema needs "
                          f"prompt (chat messages), ability and reward_model.ground_truth (has: {', '.join(ds.column_names)})")
    for i, r in enumerate(rows):
        check_row(r, f"{path} row {i}", need_response)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


# PRIME's RL system prompt (ALGORITHM.md §10): the seven actions by name and the format of a step, as
# in the Eurus-2-RL-Data prompts; and the task suffixes of its user turns.
SYSTEM_PROMPT = ("\nWhen tackling complex reasoning tasks, you have access to the following actions. Use them as "
                 "needed to progress through your thought process.\n\n[ASSESS]\n\n[ADVANCE]\n\n[VERIFY]\n\n"
                 "[SIMPLIFY]\n\n[SYNTHESIZE]\n\n[PIVOT]\n\n[OUTPUT]\n\nYou should strictly follow the format below:"
                 "\n\n[ACTION NAME]\n\n# Your action step 1\n\n# Your action step 2\n\n# Your action step 3\n\n"
                 "...\n\nNext action: [NEXT ACTION NAME]\n\n")


TASK_SUFFIX = {"math": "\n\nPresent the answer in LaTex format: \\boxed{Your answer}",
               "code": "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."}


def chat_messages(messages, ability=None):
    """The messages a chat model sees: PRIME's system prompt unless the data brings its own, and
    the task suffix on the last user turn unless the answer's form is already there: asked for
    in that turn (Eurus-2-RL-Data has both) or shown in a worked example, an assistant turn of
    the prompt (data/add_*.jsonl)."""
    msgs = [dict(m) for m in messages]
    if not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    suffix = TASK_SUFFIX.get(ability)
    users = [m for m in msgs if m.get("role", "user") == "user"]
    marker = "\\boxed" if ability == "math" else "```python"
    shown = any(marker in m["content"] for m in msgs if m.get("role") == "assistant")
    if suffix and users and not shown and marker not in users[-1]["content"]:
        users[-1]["content"] += suffix
    return msgs


def prompt_text(tok, messages, ability=None):
    """The chat template when the tokenizer has one, with PRIME's system prompt and task suffix
    (`chat_messages`). Without a template, the documented plain-text fallback: BOS + the user
    turn(s) as they are (the tiny default: its prompt is just `<bos>47+8-3+9-6=`)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(chat_messages(messages, ability), add_generation_prompt=True, tokenize=False)
    return (tok.bos_token or "") + "\n".join(m["content"] for m in messages if m.get("role", "user") != "system")


def drop_long_prompts(rows, tok, max_len, name):
    """Drop prompts longer than max_len tokens, as [O]'s dataset does (ALGORITHM.md §8), and say how many."""
    texts = [prompt_text(tok, r["prompt"], r.get("ability")) for r in rows]
    lens = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    kept = [r for r, n in zip(rows, lens) if n <= max_len]
    if len(kept) < len(rows):
        print(f"{name}: dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than --max-prompt-len {max_len} tokens")
    if not kept:
        raise ConfigError(f"--max-prompt-len: all {len(rows)} prompts of {name} are longer than {max_len} tokens")
    return kept


def verify_batch(rows, texts, K, workers=4, mode="bwrap"):
    """Outcome score per response (row i // K is the prompt of response i); and failure counts.

    Math answers are checked in this (main) thread, where math-verify's time limit works; code
    responses run in sandboxed subprocesses (sandbox `mode`), `workers` at a time. A response whose
    verifier fails scores 0 with reason "verifier_error": one bad sample never stops the run."""
    results = verifiers.outcome_rewards([rows[i // K] for i in range(len(texts))], texts,
                                        sandbox.Limits(mode=mode), workers)
    reasons = {}
    for _, why in results:
        reasons[why] = reasons.get(why, 0) + 1
    return torch.tensor([s for s, _ in results]), reasons


def check_sandbox(mode, rows):
    """With code rows to verify, say which sandbox runs their programs; stop (before any model is
    built) if it is bubblewrap and bwrap cannot run here. The weaker mode runs only when named."""
    if not any(r.get("ability") == "code" for r in rows):
        return
    problem = sandbox.bwrap_problem() if mode == "bwrap" else None
    if problem:
        raise ConfigError(sandbox.bwrap_error(problem))
    print("code sandbox: " + ("bwrap (bubblewrap)" if mode == "bwrap" else
                              "rlimit, as asked (a plain subprocess with resource limits: programs can read and write "
                              "what this user can and reach the network)"))


# ---------------------------------------------------------------------------------------------
# Step labels of the embedded task: the ground truth a PRM's token rewards can be judged against.
# ---------------------------------------------------------------------------------------------
STEP_TASK = "arith_chain"  # data_source of the rows data/generate.py writes


def is_step_task(rows):
    """Whether every row is the embedded arithmetic task, whose steps steps.py can check."""
    return bool(rows) and all(r.get("data_source") == STEP_TASK for r in rows)


_PIECES = weakref.WeakKeyDictionary()  # tokenizer -> {token id: the token's text decoded alone}


def label_batch(rows, resp, mask, tok, K):
    """For each response (row i // K is its prompt): (StepLabels, the steps' token ranges, the
    box's token range or None, number of valid tokens). Tokens are decoded one by one (specials
    as ""), so the ranges index `resp`'s columns whatever the tokenizer; each token id is decoded
    once per tokenizer and remembered (a PRIME step labels ~6k tokens: 25 ms of decode calls)."""
    pieces = _PIECES.setdefault(tok, {})
    out = []
    for i in range(resp.shape[0]):
        n = int(mask[i].sum())
        ids = resp[i, :n].tolist()
        for t in set(ids).difference(pieces):
            pieces[t] = tok.decode([t], skip_special_tokens=True)
        tokens = [pieces[t] for t in ids]
        text = "".join(tokens)
        labels = steps.label_steps(rows[i // K]["prompt"][-1]["content"], text)
        spans = steps.token_spans([s.span for s in labels.steps], tokens, text)
        box = steps.token_spans([labels.box_span], tokens, text)[0] if labels.box_span else None
        out.append((labels, spans, box, n))
    return out


def oracle_process_rewards(labelled, T, form="first"):
    """(B, T) process rewards from the step labels (`label_batch`): steps.oracle_rewards per row,
    0 after each row's valid tokens. They take the place of the PRM's q in the advantage."""
    q = torch.zeros(len(labelled), T)  # (B, T)
    for i, (labels, spans, box, n) in enumerate(labelled):
        q[i, :n] = torch.tensor(steps.oracle_rewards(labels, spans, box, n, form))
    return q
