"""The real-model path on the CPU: a local Qwen2 checkpoint with a chat-template tokenizer, 4-bit
NF4 loading, Parquet data through `datasets`, the memory planner and presets, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import models
import sampling
import tasks
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def build_chat_checkpoint(path, vocab=512):
    """A small Qwen2ForCausalLM (random weights) and a byte-level BPE tokenizer carrying a ChatML
    template, saved as a Hugging Face folder, as a hub checkpoint would be."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    corpus = [tasks.SYSTEM_PROMPT, tasks.TASK_SUFFIX["math"], "47+8-13+9-6=", "47+8=55;55-13=42;\\boxed{45}"] * 5
    tok = models.build_chat_tokenizer(corpus)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    mc = Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                     tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(mc).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_chat_checkpoint(tmp_path_factory.mktemp("qwen2-chat"))


def eurus_rows(n, offset=0):
    return [{"data_source": "numina_synthetic", "prompt": [{"role": "user", "content": f"{i}+{i}="}],
             "ability": "math", "reward_model": {"ground_truth": str(2 * i), "style": "rule"}}
            for i in range(offset, offset + n)]


def write_parquet(path, rows):
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def cfg_for(**kw):
    cfg = config.Config(lora_r=4, prm_lora_r=4, P=2, K=2, micro_batch=4, show_progress=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# --- tokenizer and prompt format -------------------------------------------------------------
def test_chat_tokenizer_round_trips_spaces_and_newlines_through_load_tokenizer(ckpt):
    tok = models.load_tokenizer(ckpt)
    text = "a  b\n\n  c\tx \\boxed{3}\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.chat_template and tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_chat_prompt_gets_prime_system_prompt_and_math_suffix_once(ckpt):
    tok = models.load_tokenizer(ckpt)
    text = tasks.prompt_text(tok, [{"role": "user", "content": "2+2="}], "math")
    assert text == ("<|im_start|>system\n" + tasks.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n2+2=\n\n"
                    "Present the answer in LaTex format: \\boxed{Your answer}<|im_end|>\n<|im_start|>assistant\n")
    # Eurus-2-RL-Data rows already carry a system prompt and the suffix: nothing is added twice.
    eurus = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2=" + tasks.TASK_SUFFIX["math"]}]
    again = tasks.prompt_text(tok, eurus, "math")
    assert again.count("Present the answer") == 1 and tasks.SYSTEM_PROMPT not in again
    code = tasks.prompt_text(tok, [{"role": "user", "content": "Sum a list."}], "code")
    assert code.count("```python") == 1 and "Write Python code to solve the problem." in code


def test_tiny_model_without_template_keeps_the_plain_text_prompt():
    tok = models.build_char_tokenizer()
    assert tasks.prompt_text(tok, [{"role": "user", "content": "47+8-3="}], "math") == "<bos>47+8-3="


def test_long_prompts_are_dropped_and_counted(ckpt, capsys):
    tok = models.load_tokenizer(ckpt)
    rows = eurus_rows(3) + [{**eurus_rows(1)[0], "prompt": [{"role": "user", "content": "1+" * 400}]}]
    kept = tasks.drop_long_prompts(rows, tok, 300, "d.parquet")
    assert kept == rows[:3]
    assert "d.parquet: dropped 1 of 4 prompts longer than --max-prompt-len 300 tokens" in capsys.readouterr().out


# --- loading, log-probs, generation ----------------------------------------------------------
def test_4bit_base_is_nf4_with_fp32_adapters_and_gradient_checkpointing(ckpt):
    cfg = cfg_for(load_in_4bit=True)
    base, tok = models.load_base(ckpt, "cpu", cfg)
    q = base.model.layers[0].self_attn.q_proj
    assert type(q.weight).__name__ == "Params4bit" and q.weight.quant_type == "nf4"
    assert q.weight.quant_state.nested, "double quantization"
    assert models.checkpointing(base)
    assert base.model.embed_tokens.weight.dtype == torch.float32, "the CPU's compute dtype is fp32"
    model = models.add_adapters(base, cfg)
    assert all(p.dtype == torch.float32 for p in models.adapter_params(model, "policy"))
    # A policy loss gives gradients to the policy adapter only, through checkpointed 4-bit layers.
    ids = torch.tensor([tok("1+1=", add_special_tokens=False)["input_ids"]] * 2)
    resp = torch.randint(0, 300, (2, 5))
    model.set_adapter("policy")
    lp = sampling.token_logprobs(model, ids, torch.ones_like(ids), resp, torch.ones(2, 5), chunk=3)
    lp.sum().backward()
    grads = [p.grad for p in models.adapter_params(model, "policy")]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in models.adapter_params(model, "prm"))


def test_chunked_output_head_gives_the_same_logprobs_and_gradients_as_one_piece(ckpt):
    cfg = cfg_for(gradient_checkpointing=True)
    base, tok = models.load_base(ckpt, "cpu", cfg)
    model = models.add_adapters(base, cfg)
    torch.manual_seed(1)
    for p in models.adapter_params(model, "policy"):  # nonzero LoRA so that gradients reach A and B
        p.data.normal_(0, 0.05)
    ids, resp = torch.randint(0, 300, (3, 6)), torch.randint(0, 300, (3, 7))
    am, mask = torch.ones_like(ids), torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3, [1.0] * 7])
    am[1, :2] = 0  # left padding
    results = []
    for chunk in (10_000, 5):  # one piece (the model's own head) vs 5-token chunks, checkpointed
        model.zero_grad(set_to_none=True)
        lp = sampling.token_logprobs(model, ids, am, resp, mask, chunk=chunk)
        lp.sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in models.adapter_params(model, "policy")]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_generation_in_batches_equals_one_batch_when_greedy(ckpt):
    base, tok = models.load_base(ckpt, "cpu", cfg_for())
    texts = [tasks.prompt_text(tok, r["prompt"], "math") for r in eurus_rows(5)]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    one = sampling.generate(base, tok, ids, am, 6, 1.0, greedy=True)
    two = sampling.generate(base, tok, ids, am, 6, 1.0, greedy=True, batch_size=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("quant", ["fp32", "4bit"])
def test_two_rl_steps_through_the_model_path_with_parquet_data(ckpt, tmp_path, quant):
    train = write_parquet(tmp_path / "train.parquet", eurus_rows(8) + [
        {**eurus_rows(1)[0], "prompt": [{"role": "user", "content": "9+" * 600}]}])  # too long: dropped
    test = write_parquet(tmp_path / "test.parquet", eurus_rows(2, offset=50))
    argv = [sys.executable, "prime_mini.py", "--model", ckpt, "--data", train, "--test-data", test,
            "--out-dir", str(tmp_path / "runs"), "--run-name", quant, "--steps", "2", "--P", "2", "--K", "2",
            "--filter-low", "0", "--filter-high", "1", "--max-new-tokens", "8", "--micro-batch", "2",
            "--gen-batch", "2", "--logprob-chunk", "4", "--prm-minibatches", "2", "--max-prompt-len", "400", "--lora-r", "4",
            "--prm-lora-r", "4", "--eval-n", "2", "--eval-samples", "1", "--no-show-progress"]
    out = subprocess.run(argv + (["--load-in-4bit"] if quant == "4bit" else []), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("4-bit NF4 on cpu, gradient checkpointing on" if quant == "4bit" else "float32 on cpu") in out.stdout
    assert "dropped 1 of 9 prompts longer than --max-prompt-len 400" in out.stdout
    assert "step 2/2 | acc" in out.stdout
    metrics = [json.loads(line) for line in (tmp_path / "runs" / quant / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("prm_loss" in m and "pg_loss" in m for m in metrics)
    assert (tmp_path / "runs" / quant / "adapters" / "prm" / "adapter_config.json").exists()


# --- the planner and presets -----------------------------------------------------------------
def test_planner_counts_the_parameters_of_the_instantiated_model(ckpt):
    from transformers import AutoConfig, AutoModelForCausalLM
    mc = AutoConfig.from_pretrained(ckpt)
    n_quant, n_other, lora_dims, L = models.count_params(mc)
    real = AutoModelForCausalLM.from_pretrained(ckpt)
    assert n_quant + n_other == sum(p.numel() for p in real.parameters())
    assert n_quant == sum(m.weight.numel() for m in real.model.layers.modules() if isinstance(m, torch.nn.Linear))
    # LoRA of rank r adds r·(in + out) per target: compare with what peft builds.
    model = models.add_adapters(real, cfg_for(lora_r=4, prm_lora_r=8))
    assert sum(p.numel() for p in models.adapter_params(model, "policy")) == 4 * sum(i + o for i, o in lora_dims)
    assert sum(p.numel() for p in models.adapter_params(model, "prm")) == 8 * sum(i + o for i, o in lora_dims)


def test_planner_kv_cache_and_4bit_weights_match_hand_values():
    from transformers import Qwen2Config
    mc = Qwen2Config(**models.QWEN25_MATH_7B)
    cfg = config.parse_config(["--preset", "qwen2.5-math-7b", "--plan-memory"])  # P=16 K=4, gen batch 16, micro-batch 1
    gpu, total, info = models.plan_memory(mc, cfg)
    cpu, _, _ = models.plan_memory(mc, cfg, device="cpu")
    # 16 sequences × 4096 tokens × 28 layers × (K and V) × 4 heads × 128 dims, in the compute dtype:
    # 2 bytes (bf16) on a GPU, 4 (fp32) on the CPU.
    assert gpu["[gen] KV cache (generation batch)"] == 16 * 4096 * 28 * 2 * 4 * 128 * 2
    assert cpu["[gen] KV cache (generation batch)"] == 16 * 4096 * 28 * 2 * 4 * 128 * 4
    assert abs(info["params_total"] / 1e9 - 7.62) < 0.01, "Qwen2.5-Math-7B has 7.62B parameters"
    # Embeddings and head (untied): 2 × 152064 × 3584, plus 2 norms a layer and the final one, and
    # the q, k, v biases (3584 + 2 × 4 heads × 128) of each of the 28 layers; not quantized, they
    # stay in the compute dtype.
    n_other = 2 * 152064 * 3584 + (2 * 28 + 1) * 3584 + 28 * (3584 + 2 * 512)
    assert gpu["embeddings, head, norms (bf16)"] == 2 * n_other
    assert cpu["embeddings, head, norms (fp32)"] == 4 * n_other
    # The recomputed layer of one 4096-token micro-batch: 10 H + 4 I values a token in the compute
    # dtype; in bf16, also the fp32 copy of the input of each LoRA target (q, k, v, o, gate, up: H
    # each; down: I).
    H, I = 3584, 18944
    assert gpu["[train] recomputed layer"] == 4096 * ((10 * H + 4 * I) * 2 + (6 * H + I) * 4)
    assert cpu["[train] recomputed layer"] == 4096 * (10 * H + 4 * I) * 4
    # The preset's peak: the weights that live all run, plus the generation phase (it is larger).
    static = sum(v for k, v in gpu.items() if not k.startswith("["))
    assert info["peak_phase"] == "generation"
    assert total == static + gpu["[gen] KV cache (generation batch)"] + gpu["[gen] prefill transients"]
    assert round(total / models.GB, 2) == 12.05


def test_4bit_base_keeps_embeddings_norms_and_head_in_the_compute_dtype_as_the_planner_counts(ckpt, monkeypatch):
    """The GPU's bf16, exercised on the CPU: nothing of a 4-bit base is cast to fp32 behind the
    planner's back, and the KV cache comes out in the compute dtype."""
    monkeypatch.setattr(models, "compute_dtype", lambda device: torch.bfloat16)
    base, tok = models.load_base(ckpt, "cpu", cfg_for(load_in_4bit=True))
    other = [p for p in base.parameters() if type(p).__name__ != "Params4bit"]
    assert other and all(p.dtype == torch.bfloat16 for p in other), "embeddings, norms and head stay bf16"
    from transformers import AutoConfig
    rows, _, _ = models.plan_memory(AutoConfig.from_pretrained(ckpt), cfg_for(load_in_4bit=True), device="cuda")
    assert rows["embeddings, head, norms (bf16)"] == sum(p.numel() * p.element_size() for p in other)
    with torch.no_grad():
        out = base(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.dtype == torch.bfloat16, f"KV cache in {keys.dtype}"


def test_presets_fit_24gb_by_the_planner_and_explicit_flags_win(capsys):
    for preset in ("qwen2.5-0.5b", "qwen2.5-math-7b"):
        cfg = config.parse_config(["--preset", preset, "--plan-memory"])
        total = config.print_memory_plan(cfg)
        assert cfg.load_in_4bit and cfg.model and models.fits(total, 24)
        assert "fits in --gpu-memory-gb 24" in capsys.readouterr().out
    cfg = config.parse_config(["--preset", "qwen2.5-math-7b", "--plan-memory", "--gpu-memory-gb", "16"])
    config.print_memory_plan(cfg)
    assert "fits in --gpu-memory-gb 16" in capsys.readouterr().out, "the 7B preset fits a 16 GB card"
    cfg = config.parse_config(["--preset", "qwen2.5-math-7b", "--max-new-tokens", "64", "--no-load-in-4bit", "--plan-memory"])
    assert cfg.model == "Qwen/Qwen2.5-Math-7B" and cfg.max_new_tokens == 64 and not cfg.load_in_4bit
    assert cfg.gen_batch == 16, "unset fields come from the preset"


# --- scripts/gpu_memory_check.py: what can be checked without a GPU --------------------------
def test_gpu_memory_check_runs_one_generation_batch_a_step_with_the_same_planned_peak(tmp_path):
    from transformers import AutoConfig
    check = load_script("gpu_memory_check")
    preset, keep, extra = check.parse_args(["--preset", "qwen2.5-math-7b", "--max-new-tokens", "512"])
    assert (preset, keep, extra) == ("qwen2.5-math-7b", False, ["--max-new-tokens", "512"])
    model_dir, data = tmp_path / "model", tmp_path / "prompts.jsonl"
    AutoConfig.for_model("qwen2", **models.QWEN25_MATH_7B).save_pretrained(model_dir)  # what build_model saves
    data.write_text("")
    cfg = check.run_config(preset, str(model_dir), str(data), extra)
    assert (cfg.P, cfg.K, cfg.gen_batch, cfg.micro_batch) == (4, 4, 16, 1), "P = gen batch / K: one batch a step"
    assert cfg.load_in_4bit and cfg.steps == 2 and (cfg.filter_low, cfg.filter_high) == (0.0, 1.0)
    assert cfg.max_new_tokens == 512, "a flag given to the script wins"
    # The claim that lets it run 4 prompts instead of 16: the planned peak does not depend on P.
    mc = models.model_config(str(model_dir))
    full = config.parse_config(["--preset", preset, "--max-new-tokens", "512", "--plan-memory"])
    assert full.P == 16 and models.plan_memory(mc, cfg)[1] == models.plan_memory(mc, full)[1]


def test_gpu_memory_check_prompts_are_the_longest_that_fit_and_a_too_short_limit_stops(tmp_path):
    check = load_script("gpu_memory_check")
    tok = check.chat_tokenizer()
    path = tmp_path / "prompts.jsonl"

    def n_tokens(content):
        text = tasks.prompt_text(tok, [{"role": "user", "content": content}], "math")
        return len(tok(text, add_special_tokens=False)["input_ids"])

    shortest = n_tokens("10=")  # one term: the system prompt and task suffix around it
    with pytest.raises(SystemExit) as e:
        check.write_prompts(tok, str(path), shortest - 1, n=2)
    assert f"--max-prompt-len {shortest - 1} is shorter than the shortest prompt" in str(e.value)
    check.write_prompts(tok, str(path), shortest + 40, n=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    term = max(n_tokens("10+" + str(k) + "=") for k in range(10, 100)) - shortest  # most tokens one more term adds
    for r in rows:  # the planner counts full-length prompts: each fits, within one term of the limit
        assert shortest + 40 - term < n_tokens(r["prompt"][0]["content"]) <= shortest + 40


def test_gpu_memory_check_refuses_its_own_flags_and_presets_it_cannot_build(capsys):
    check = load_script("gpu_memory_check")
    with pytest.raises(SystemExit):
        check.parse_args(["--preset", "qwen2.5-math-7b", "--model", "Qwen/Qwen2.5-Math-7B"])
    assert "--model, --data and --test-data are made by this script" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check.parse_args(["--preset", "tiny"])
    assert "argument --preset: invalid choice: 'tiny'" in capsys.readouterr().err


def test_gpu_memory_check_without_cuda_stops_with_a_clear_message(tmp_path):
    out = subprocess.run([sys.executable, "scripts/gpu_memory_check.py", "--preset", "qwen2.5-math-7b"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                                                          "TMPDIR": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.startswith("gpu_memory_check.py: needs a CUDA GPU (torch.cuda.is_available() is False)")
    assert not any(tmp_path.iterdir()), "nothing was built"


# --- bad input stops before training, naming the flag or file ---------------------------------
def test_preset_that_does_not_fit_stops_with_the_planner_figure():
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(["--preset", "qwen2.5-math-7b", "--gpu-memory-gb", "12"])
    assert str(e.value).startswith("--preset qwen2.5-math-7b: the planner estimates a peak of")
    assert "does not fit --gpu-memory-gb 12" in str(e.value)


@pytest.mark.parametrize("model, needle", [
    ("/no/such/model", "--model: /no/such/model is not a local folder, a .gguf file, nor a hub name"),
    ("tests", "--model: tests is a folder without a config.json"),
])
def test_unknown_model_path_is_refused(model, needle):
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(["--model", model])
    assert needle in str(e.value)


def test_4bit_without_bitsandbytes_is_refused(monkeypatch):
    monkeypatch.setattr(models, "bitsandbytes_available", lambda: False)
    with pytest.raises(models.ConfigError) as e:
        config.parse_config(["--load-in-4bit"])
    assert str(e.value).startswith("--load-in-4bit: needs bitsandbytes")


def test_dataset_without_the_needed_columns_is_refused(tmp_path):
    rows = [{"prompt": r["prompt"], "answer": "2"} for r in eurus_rows(2)]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(models.ConfigError) as e:
        tasks.load_rows(path)
    assert f"{path}: missing column(s) ability, reward_model" in str(e.value)


def test_bad_model_stops_the_cli_with_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "prime_mini.py", "--model", "/no/such/model", "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: --model: /no/such/model" in out.stderr
    assert not any(tmp_path.iterdir()), "nothing was written"
