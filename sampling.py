"""Sampling responses and their log-probabilities: the model-facing half of the loop.

`generate` samples K responses per prompt with the KV cache (from a merged copy of the policy
adapter, `merged_copy`); `response_mask` marks the valid tokens, through the first end token;
`token_logprobs` gives log π(y_t | x, y_<t) of each response token, the quantity every PRIME
formula starts from (π_θ, π_φ or π_ref, depending on which adapter is active); `Rollout` carries
one step's batch. Shapes: B rows (= P prompts × K samples), Tp prompt tokens (left-padded),
T response tokens, V vocabulary.

It must not touch: optimizers, rewards or the config object (it takes plain values).
"""
import weakref
from dataclasses import dataclass, field

import torch

import decoding
import models

def encode_prompts(tok, texts, device):
    """Left-padded prompt ids (B, Tp) and attention mask, so that generation continues each row."""
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def end_tokens(model, tok):
    """Every token id that ends a response: the tokenizer's EOS and each EOS of the model's
    generation config (Qwen2.5-Instruct ends a turn with <|im_end|> or <|endoftext|>)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return sorted({i for i in [tok.eos_token_id, *ids] if i is not None})


def response_mask(resp, eos_ids):
    """1 on valid response tokens: up to and including the first end token (ALGORITHM.md §8).

    `eos_ids`: one id or a list (`end_tokens`). Everything after the first end token is padding
    from `generate`, even when the pad token is itself an end token (SmolLM2, Qwen); a pad token
    sampled *before* it is a real (if odd) token and stays valid.
    """
    eos = torch.as_tensor(eos_ids, device=resp.device).flatten()  # (n_eos,)
    is_eos = torch.isin(resp, eos).int()  # (B, T)
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # (B, T) strictly after the first EOS
    return (~after_eos).to(torch.float32)  # (B, T)


_MERGED = weakref.WeakKeyDictionary()  # peft model -> its plain copy for sampling (merged_copy)


@torch.no_grad()
def merged_copy(model):
    """A plain copy of the base (no LoRA layers) whose linear weights are W + s·B·A of the active
    adapter: the same π_θ up to float rounding, built once per model and refreshed on each call
    (a copy of the weights, microseconds for the tiny model). Sampling with it skips peft's
    per-layer Python work and the two extra LoRA matmuls at every new token: 21% less time per
    `generate` call on the CPU (BENCHMARKS.md). The adapters, the base and π_ref are left untouched. Returns the
    model itself when there is nothing to merge or a base layer is not a plain nn.Linear (4-bit)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    if not isinstance(model, PeftModel):
        return model
    lora = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    if not all(type(m.base_layer) is torch.nn.Linear for m in lora.values()):
        return model
    plain = _MERGED.get(model)
    if plain is None:
        import copy
        plain = copy.deepcopy(model.get_base_model())
        for name in lora:  # swap each LoRA wrapper in the copy for its own base nn.Linear
            parent, _, child = name.rpartition(".")
            target = plain.get_submodule(parent) if parent else plain
            setattr(target, child, getattr(target, child).base_layer)
        plain.requires_grad_(False).eval()
        _MERGED[model] = plain
    for name, m in lora.items():
        w = m.base_layer.weight
        for adapter in ([] if m.disable_adapters else m.active_adapters):  # as peft's forward: a sum
            if adapter in m.lora_A:
                w = w + m.get_delta_weight(adapter)  # (out, in) the merged weight W + s·B·A
        plain.get_submodule(name).weight.copy_(w)
    return plain


@torch.no_grad()
def generate(model, tok, prompt_ids, prompt_mask, max_new_tokens, temperature, greedy=False, merged=True, batch_size=0,
             decode="static"):
    """Sample responses with the KV cache, `batch_size` rows at a time (0 = all at once), so the
    cache's size does not grow with the rollout. Returns response ids (B, T) and their mask (B, T).
    `merged`: sample from merged_copy(model), the same policy without LoRA's per-token overhead.
    `decode`: "static" samples with our decode loop (decoding.py: the same tokens as transformers'
    generate, faster) when it knows the model, else (and with "hf") with transformers' generate."""
    models.set_train_mode(model, False)  # no checkpointing while generating: it would drop the cache
    sampler = merged_copy(model) if merged else model
    eos = end_tokens(model, tok)  # all of them: one id alone would override the model's own list
    ours = decode == "static" and static_decoding(sampler)
    resps = []
    n = batch_size or prompt_ids.shape[0]
    for i in range(0, prompt_ids.shape[0], n):
        ids, am = prompt_ids[i:i + n], prompt_mask[i:i + n]  # (n, Tp)
        if ours:
            resps.append(decoding.sample(sampler, ids, am, max_new_tokens, temperature, greedy, eos, tok.pad_token_id,
                                         prompt_groups(ids, am)))
            continue
        out = sampler.generate(input_ids=ids, attention_mask=am, past_key_values=shared_prefill(sampler, ids, am),
                               max_new_tokens=max_new_tokens, do_sample=not greedy,
                               temperature=temperature if not greedy else None, top_k=0 if not greedy else None,
                               top_p=1.0 if not greedy else None, pad_token_id=tok.pad_token_id,
                               eos_token_id=eos, use_cache=True)
        resps.append(out[:, prompt_ids.shape[1]:])  # (n, T_i)
    resp = pad_cat(resps, left=False, value=tok.pad_token_id)  # (B, T)
    return resp, response_mask(resp, eos)


_SAID = set()  # the reasons already printed by static_decoding
_WHY = weakref.WeakKeyDictionary()  # model -> decoding.unsupported(model), found once


def static_decoding(net):
    """Whether our decode loop can sample from `net`; when not, say why once per reason."""
    why = _WHY.get(net)
    if why is None:
        why = _WHY[net] = decoding.unsupported(net)
    if why and why not in _SAID:
        _SAID.add(why)
        print(f"--decode static: sampling with transformers' generate instead, because of {why}")
    return not why


def shared_prefill(net, prompt_ids, prompt_mask):
    """The KV cache of every prompt position but the last, computed once per run of rows with the
    same prompt (a rollout's K samples) and repeated for its rows, or None when no two rows share
    one. `generate` then runs only each row's last prompt token and the new ones: the prefill costs
    U·(Tp − 1) positions instead of B·(Tp − 1) (SmolLM2's 72-token prompts with K = 4: the prefill
    was 4.1 of a 10 s rollout of 16 rows, one thread). The same numbers up to float rounding."""
    first, run = prompt_groups(prompt_ids, prompt_mask)
    if len(first) == prompt_ids.shape[0] or prompt_ids.shape[1] < 2:
        return None
    pos = (prompt_mask.cumsum(1) - 1).clamp_min(0)  # (B, Tp) positions that skip left padding
    with torch.no_grad():
        return repeated_prompt_cache(net, prompt_ids[:, :-1], prompt_mask[:, :-1], pos[:, :-1], first, run,
                                     logits_to_keep=1)[1]


def decode_responses(tok, resp, mask):
    """Response texts for the verifier: valid tokens only (through the first EOS), no specials."""
    valid = resp * mask.long() + tok.pad_token_id * (1 - mask.long())  # (B, T) pads after EOS
    return tok.batch_decode(valid, skip_special_tokens=True)


def token_logprobs(model, prompt_ids, prompt_mask, resp, mask, chunk=8192):
    """log π(y_t | x, y_<t) of each response token (B, T), at temperature 1 (ALGORITHM.md §2.2).

    Logits are computed only for the response positions. When the batch has more than `chunk`
    response tokens, the output head runs on `chunk` tokens at a time and each chunk's fp32
    logits are recomputed in the backward pass instead of stored, so (B, T, V) never exists: a
    7B model's 152k-token vocabulary makes it gigabytes per sequence. Rows that share a prompt
    run it once (`predicting_outputs`).
    """
    per_row = models.set_train_mode(model, torch.is_grad_enabled())  # checkpointing, LoRA dropout: gradient forwards only
    B, T = resp.shape
    parts = models.output_head(model) if B * T > chunk else None
    if parts is None:  # small enough: the model's own head, in one piece
        logits = predicting_outputs(model, prompt_ids, prompt_mask, resp, mask, "logits", per_row)  # (B, T, V)
        return torch.cat([head_logprobs(None, logits[i:i + 64], resp[i:i + 64]) for i in range(0, B, 64)]) * mask
    decoder, head = parts
    h = predicting_outputs(decoder, prompt_ids, prompt_mask, resp, mask, "last_hidden_state", per_row)  # (B, T, H)
    h, y = h.reshape(B * T, -1), resp.reshape(B * T)  # (B*T, H), (B*T,)
    out = []
    for i in range(0, B * T, chunk):
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(head_logprobs, head, h[i:i + chunk], y[i:i + chunk],
                                                         use_reentrant=False))  # (n,)
        else:
            out.append(head_logprobs(head, h[i:i + chunk], y[i:i + chunk]))  # (n,)
    return torch.cat(out).view(B, T) * mask  # (B, T)


def prompt_groups(prompt_ids, prompt_mask):
    """(first, run): the first row of each run of consecutive rows with the same prompt (U,), and
    the run each row belongs to (B,). A rollout's K samples of a prompt are consecutive rows.
    Example: prompts [a, a, b, b, a] -> first [0, 2, 4], run [0, 0, 1, 1, 2]."""
    new = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)  # (B,)
    new[1:] = (prompt_ids[1:] != prompt_ids[:-1]).any(1) | (prompt_mask[1:] != prompt_mask[:-1]).any(1)
    return new.nonzero().squeeze(1), new.long().cumsum(0) - 1


def predicting_outputs(net, prompt_ids, prompt_mask, resp, mask, key, per_row=False):
    """The output `key` ("logits" of a causal LM, "last_hidden_state" of its decoder) at the
    position before each response token, the one that predicts it: (B, T, ·).

    When rows share a prompt, each distinct prompt goes through the net once and its KV cache,
    repeated for its rows, serves their responses: the same numbers up to float rounding from
    U·Tp + B·T positions instead of B·(Tp + T) (SmolLM2's 71-token prompts and 40-token responses
    with K = 4: about half the work, forward and backward). `per_row` (a gradient forward with
    checkpointed layers, which drop the cache, or LoRA dropout, which must draw a mask per row)
    runs every row whole.
    """
    B, Tp = prompt_ids.shape
    T = resp.shape[1]
    attn = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)  # (B, Tp+T)
    pos = (attn.cumsum(1) - 1).clamp_min(0)  # (B, Tp+T) positions that skip left padding
    keep = {"logits_to_keep": T + 1} if key == "logits" else {}
    first, run = prompt_groups(prompt_ids, prompt_mask)
    if per_row or len(first) == B or T == 0:
        ids = torch.cat([prompt_ids, resp], 1)  # (B, Tp+T)
        return net(input_ids=ids, attention_mask=attn, position_ids=pos, **keep)[key][:, -T - 1:-1]
    head, cache = repeated_prompt_cache(net, prompt_ids, prompt_mask, pos[:, :Tp], first, run,
                                        **({"logits_to_keep": 1} if keep else {}))
    tail = net(input_ids=resp, attention_mask=attn, position_ids=pos[:, Tp:], past_key_values=cache, use_cache=True)
    return torch.cat([head[key][run, -1:], tail[key][:, :-1]], 1)  # (B, T, ·)


def repeated_prompt_cache(net, prompt_ids, prompt_mask, pos, first, run, **kw):
    """Run the distinct prompts (rows `first`, prompt_groups) through the net once and repeat
    their KV cache for every row (`run`): (the net's output for the distinct prompts, the cache of
    all B rows). Shared by predicting_outputs and shared_prefill."""
    Tp = prompt_ids.shape[1]
    head = net(input_ids=prompt_ids[first], attention_mask=prompt_mask[first], position_ids=pos[first], use_cache=True, **kw)
    cache = head.past_key_values
    if cache is None or cache.get_seq_length() != Tp:
        raise RuntimeError(f"{type(net).__name__} returned no KV cache of the {Tp} prompt positions; "
                           "sampling needs one to share prompts between rows")
    cache.batch_select_indices(run)  # (U, ...) -> (B, ...): each row's prompt
    return head, cache


def head_logprobs(head, h, y):
    """log-softmax of the logits head(h) (or of h itself when head is None), in fp32, at the tokens y."""
    logits = (h if head is None else head(h)).float()  # (..., V)
    return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (...)


def logprobs_nograd(model, batch, micro, chunk=8192):
    """token_logprobs over micro-batches without gradients."""
    with torch.no_grad():
        return torch.cat([token_logprobs(model, *batch.slice(i, i + micro), chunk=chunk) for i in range(0, batch.B, micro)])


@dataclass
class Rollout:
    """One step's responses. Rows are grouped: the K samples of a prompt are consecutive."""
    prompt_ids: torch.Tensor  # (B, Tp) left-padded
    prompt_mask: torch.Tensor  # (B, Tp)
    resp: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) valid response tokens incl. first EOS
    r_o: torch.Tensor  # (B,) outcome scores
    rows: list  # the P data rows, one per group
    texts: list = field(default_factory=list)  # (B,) decoded responses

    @property
    def B(self):
        return self.resp.shape[0]

    def slice(self, i, j):
        return self.prompt_ids[i:j], self.prompt_mask[i:j], self.resp[i:j], self.mask[i:j]


def pad_cat(tensors, left, value):
    """Concatenate (b, t) tensors along rows, padding the time axis to the longest."""
    T = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = torch.full((t.shape[0], T - t.shape[1]), value, dtype=t.dtype, device=t.device)
        padded.append(torch.cat([pad, t] if left else [t, pad], 1))
    return torch.cat(padded)
