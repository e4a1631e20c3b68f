"""Our decode loop (decoding.py) against transformers' generate: the same tokens for the same seed,
on the shipped tiny SFT model (a Qwen2: q/k/v biases, tied head) and on a tiny random Llama-shaped
model (grouped-query attention, no biases, its own head, another rotary base); sampled, at another
temperature, with top-p, greedy; left-padded prompts of several lengths, K rows per prompt, rows
that end at different steps; and the models it does not know fall back to generate, saying why."""
import glob
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

import config
import decoding
import models
import sampling
import tasks
from test_model import make_model, tiny_cfg

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sft():
    """The shipped SFT model of the default task and its tokenizer."""
    path = sorted(glob.glob(os.path.join(HERE, "data", "sft", "*", "done")))[0]
    folder = os.path.dirname(path)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), models.load_tokenizer(folder)


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama: 4 query heads sharing 2 key/value heads, no biases, untied head."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=500.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    net = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        net.lm_head.weight.mul_(8)  # peaked next-token distributions, so that some rows end early
    return net


def hf_tokens(net, ids, am, n, temperature, greedy, eos, pad, top_p=1.0):
    """transformers' generate as sampling.generate calls it (shared prompt prefill included)."""
    out = net.generate(input_ids=ids, attention_mask=am, past_key_values=sampling.shared_prefill(net, ids, am),
                       max_new_tokens=n, do_sample=not greedy, temperature=None if greedy else temperature,
                       top_k=None if greedy else 0, top_p=None if greedy else top_p, pad_token_id=pad,
                       eos_token_id=eos, use_cache=True)
    return out[:, ids.shape[1]:]


def both(net, ids, am, n, temperature=1.0, greedy=False, eos=(2,), pad=0, top_p=1.0, seed=0):
    torch.manual_seed(seed)
    want = hf_tokens(net, ids, am, n, temperature, greedy, list(eos), pad, top_p)
    after_hf = torch.rand(3)
    torch.manual_seed(seed)
    got = decoding.sample(net, ids, am, n, temperature, greedy, list(eos), pad, sampling.prompt_groups(ids, am), top_p=top_p)
    after_ours = torch.rand(3)
    return want, got, torch.equal(after_hf, after_ours)


def arith_prompts(tok, K=4):
    rows = tasks.load_rows(os.path.join(HERE, "data", "arith_test.jsonl"))[:6]
    texts = [tasks.prompt_text(tok, r["prompt"]) for r in rows for _ in range(K)]
    return sampling.encode_prompts(tok, texts, "cpu")


@pytest.mark.parametrize("temperature,greedy,top_p", [(1.0, False, 1.0), (0.7, False, 1.0), (1.3, False, 0.8),
                                                      (1.0, True, 1.0)])
def test_tiny_sft_model_same_tokens_as_generate(sft, temperature, greedy, top_p):
    net, tok = sft
    ids, am = arith_prompts(tok)
    assert not bool(am.all()), "left padding in the batch"
    for seed in range(3):
        want, got, same_stream = both(net, ids, am, 64, temperature, greedy, sampling.end_tokens(net, tok),
                                      tok.pad_token_id, top_p, seed)
        assert torch.equal(want, got), f"seed {seed}"
        assert same_stream, "the random stream is left where generate leaves it"
    mask = sampling.response_mask(got, sampling.end_tokens(net, tok))
    assert len(set(mask.sum(1).tolist())) > 1, "rows end at different steps (the ended ones leave the batch)"


@pytest.mark.parametrize("temperature,greedy,top_p", [(1.0, False, 1.0), (0.8, False, 0.9), (1.0, True, 1.0)])
def test_tiny_llama_with_grouped_queries_same_tokens_as_generate(llama, temperature, greedy, top_p):
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 2, 7]  # left padding of several lengths, 3 rows per prompt
    ids = torch.zeros(12, max(lens), dtype=torch.long)
    am = torch.zeros(12, max(lens), dtype=torch.long)
    for p, n in enumerate(lens):
        row = torch.randint(3, 40, (n,), generator=g)
        ids[3 * p:3 * p + 3, -n:], am[3 * p:3 * p + 3, -n:] = row, 1
    for seed in range(3):
        want, got, same_stream = both(llama, ids, am, 40, temperature, greedy, (2, 5), 0, top_p, seed)
        assert torch.equal(want, got) and same_stream, f"seed {seed}"
    if not greedy:  # (greedy rows of this random model never pick an end token)
        assert sampling.response_mask(got, [2, 5]).sum(1).min() < got.shape[1], "some rows end early"


def test_a_one_token_prompt_and_a_batch_without_padding(llama):
    ids, am = torch.full((4, 1), 1), torch.ones(4, 1, dtype=torch.long)
    want, got, _ = both(llama, ids, am, 10)
    assert torch.equal(want, got)
    ids = torch.randint(3, 40, (4, 6), generator=torch.Generator().manual_seed(2))
    want, got, _ = both(llama, ids, torch.ones_like(ids), 10, seed=4)
    assert torch.equal(want, got)


def test_top_p_filter_equals_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper
    scores = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9, 0.999):
        torch.testing.assert_close(decoding.top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores), rtol=0, atol=0)
    one = decoding.top_p_filter(scores, 1e-9)
    assert ((one > -float("inf")).sum(1) == 1).all(), "the most likely token always stays"


def test_sampling_generate_same_responses_either_way_through_the_merged_policy(capsys):
    """sampling.generate on a LoRA policy (the merged copy), in generation batches that cut the
    groups: --decode static and --decode hf give the same responses and masks."""
    tok = models.build_char_tokenizer()
    cfg = tiny_cfg()
    model = make_model(tok, cfg)
    torch.manual_seed(3)
    for p in models.adapter_params(model, "policy"):
        p.data.normal_(0, 0.1)
    texts = [tasks.prompt_text(tok, [{"role": "user", "content": c}]) for c in ("12+3-4=", "7+8=", "1+22+333-4=")
             for _ in range(4)]
    ids, am = sampling.encode_prompts(tok, texts, "cpu")
    for batch_size in (0, 5):
        out = {}
        for decode in ("hf", "static"):
            torch.manual_seed(11)
            out[decode] = sampling.generate(model, tok, ids, am, 16, 1.0, batch_size=batch_size, decode=decode)
        assert all(torch.equal(a, b) for a, b in zip(out["hf"], out["static"])), f"batch size {batch_size}"
    assert "--decode static" not in capsys.readouterr().out, "the tiny model is one the loop knows"


def test_unsupported_models_fall_back_to_generate_and_say_why(llama, capsys):
    tok = models.build_char_tokenizer()
    model = make_model(tok, tiny_cfg())
    assert "LoRA layers not merged" in decoding.unsupported(model)
    assert decoding.unsupported(sampling.merged_copy(model)) == "", "its merged copy is a plain Qwen2"
    assert decoding.unsupported(llama) == ""
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    assert "model type 'gpt2'" in decoding.unsupported(gpt2)
    penalised = LlamaForCausalLM(llama.config).eval()
    penalised.generation_config = GenerationConfig(repetition_penalty=1.1)
    assert "repetition_penalty" in decoding.unsupported(penalised)
    ids, am = torch.full((2, 3), 4), torch.ones(2, 3, dtype=torch.long)
    torch.manual_seed(0)
    want = hf_tokens(penalised, ids, am, 6, 1.0, False, [2], 0)
    for _ in range(2):
        torch.manual_seed(0)
        got, _ = sampling.generate(penalised, tok, ids, am, 6, 1.0, merged=False, decode="static")
        assert torch.equal(got, want[:, :got.shape[1]]) and (want[:, got.shape[1]:] == tok.pad_token_id).all()
    said = capsys.readouterr().out
    assert said.count("sampling with transformers' generate instead, because of its generation config sets "
                      "repetition_penalty") == 1, "said once"


def test_decode_flag_choices():
    assert config.Config().decode == "static"
    assert config.parse_config(["--decode", "hf"]).decode == "hf"
    with pytest.raises(SystemExit):
        config.parse_config(["--decode", "fast"])
