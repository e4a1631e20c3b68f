"""Our own decode loop: sampling responses from a Qwen2- or Llama-shaped causal LM without
transformers' `generate`, the same tokens for the same seed.

Why: the tiny default has 0.8M parameters, so a decode step is bound by per-token framework
work (generate's Python loop, the cache objects that concatenate every key and value again at
each token, the masks rebuilt each step, the logits processors), not by arithmetic. This loop
does one step as a few dozen tensor operations on a preallocated (static) KV cache:

    prefill     the model's own forward on every prompt position but the last, once per distinct
                prompt (a rollout's K samples share it), its cache copied into the static one
    step        embed the row's last token, each decoder layer (RMSNorm, q/k/v, rotary, write
                this position's k/v, attention over the valid positions, o_proj, SwiGLU MLP),
                final norm, output head: logits (B, V) in fp32
    sample      exactly as `generate` with do_sample: logits / temperature, top-p if below 1,
                softmax, torch.multinomial over all B rows (so the random stream is consumed
                the same way); finished rows get the pad token; stop when every row has ended
                or after max_new_tokens
    greedy      argmax of the logits

Positions, masks and padding follow `generate`: left-padded prompts, each row's positions
count its valid tokens only, every generated position (pads after a row's end included) is
attended. tests/test_decode.py checks that the tokens equal `generate`'s on the tiny model and
on a tiny Llama-shaped model (grouped-query attention, no biases), sampled, greedy, with top-p,
temperature and left padding. `--decode hf` switches back to `generate`; a model this loop does
not know (other architectures, sliding windows, 4-bit layers, a generation config that asks
for extra logits processors) uses `generate`, and `unsupported` says why.

It must not touch: optimizers, rewards or the config object (it takes plain values).
"""
import torch
import torch.nn.functional as F

KNOWN_TYPES = ("qwen2", "llama")  # decoder layers: RMSNorm, q/k/v(+bias)/o, rotary, SwiGLU
# generation-config fields whose non-default value makes generate add a logits processor or a
# stopping rule this loop does not have (it would then sample something else)
UNHANDLED_GENERATION = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                        "bad_words_ids", "force_words_ids", "suppress_tokens", "begin_suppress_tokens",
                        "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
                        "sequence_bias", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p",
                        "exponential_decay_length_penalty", "renormalize_logits", "stop_strings",
                        "max_time", "num_beams", "watermarking_config", "top_h")


def unsupported(net):
    """Why this loop cannot sample from `net` (a plain causal LM, not a peft wrapper), or ""."""
    if type(net).__name__.startswith("Peft"):  # a peft wrapper
        return "LoRA layers not merged into the weights (--no-merged-rollout, or a 4-bit base)"
    cfg = getattr(net, "config", None)
    kind = getattr(cfg, "model_type", type(net).__name__)
    if kind not in KNOWN_TYPES:
        return f"model type {kind!r} (the loop knows {', '.join(KNOWN_TYPES)})"
    layers = getattr(getattr(net, "model", None), "layers", None)
    if layers is None or getattr(net, "lm_head", None) is None:
        return f"{type(net).__name__} has no .model.layers and .lm_head"
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "sliding-window attention"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (the loop has SwiGLU with silu)"
    for name, m in net.named_modules():
        if name.endswith(("_proj", "lm_head")) and type(m) is not torch.nn.Linear:
            return f"{name} is a {type(m).__name__}, not a plain nn.Linear (4-bit or adapter layers)"
    if not hasattr(net.model, "rotary_emb"):
        return f"{type(net.model).__name__} has no rotary_emb"
    gen = getattr(net, "generation_config", None)
    if gen is not None:
        from transformers import GenerationConfig
        default = GenerationConfig()
        odd = [k for k in UNHANDLED_GENERATION if getattr(gen, k, None) != getattr(default, k, None)]
        if odd:
            return f"its generation config sets {', '.join(odd)} (logits processors the loop does not have)"
    return ""


def rms_norm(norm, h):
    """The model's RMSNorm in fp32 and its weight, as transformers computes it (Qwen2RMSNorm)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


def rotate(x, cos, sin):
    """Rotary embedding of x (B, H, 1, d) at cos, sin (B, 1, 1, d): x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def attend(q, kt, v, bias, scale):
    """Attention of the new position's queries q (A, h, g, d) over the cache's keys kt (A, h, d, L),
    transposed, and values v (A, h, L, d), `bias` (A, 1, 1, L) (−inf where masked) or None: softmax(q·kᵀ·scale + bias)·v
    as plain matmuls, faster on the CPU for one query position than scaled_dot_product_attention,
    whose flash kernel is built for long queries (BENCHMARKS.md)."""
    scores = torch.matmul(q, kt) * scale  # (A, h, g, L)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(-1), v)  # (B, h, g, d)


def top_p_filter(scores, top_p):
    """Nucleus filtering as generate does it: drop the least likely tokens whose probabilities sum
    to at most 1 − top_p (their scores become −inf), always keeping the most likely one."""
    sorted_scores, order = torch.sort(scores, descending=False)  # (B, V) ascending
    drop_sorted = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p  # (B, V)
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)  # (B, V) back in vocabulary order
    return scores.masked_fill(drop, -float("inf"))


def fused(*linears):
    """One weight (and bias, or None) for several nn.Linear layers that read the same input: their
    rows stacked, so that one matrix product replaces several (q, k, v; gate, up)."""
    w = torch.cat([m.weight for m in linears])
    b = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return w, b


class StaticDecoder:
    """The rows still being decoded, token by token, on a preallocated KV cache of L = Tp +
    max_new positions per layer. Rows that have ended are dropped from the cache (`keep`), so
    the work of a step follows the rows still running, not the longest one's batch."""

    def __init__(self, net, B, length, prompt_mask):
        self.net, self.model = net, net.model
        cfg = net.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        p = next(net.parameters())
        # this call's weights (the merged policy changes between calls): q/k/v and gate/up fused
        self.qkv = [fused(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj) for l in self.model.layers]
        self.gate_up = [fused(l.mlp.gate_proj, l.mlp.up_proj) for l in self.model.layers]
        # keys transposed, (B, nkv, d, L), values (B, nkv, L, d): both products of attention are
        # then plain matrix products on a prefix of each row's block, which reads the cache once
        # at memory speed (a transposed key slice costs 1.5x, BENCHMARKS.md)
        self.keys = [torch.zeros(B, self.n_kv, self.d, length, dtype=p.dtype, device=p.device) for _ in self.model.layers]
        self.values = [torch.zeros(B, self.n_kv, length, self.d, dtype=p.dtype, device=p.device) for _ in self.model.layers]
        # additive attention bias (B, 1, 1, L): −inf on left padding, 0 on prompt and generated
        # positions (generate attends every generated one, a finished row's pads included)
        self.bias = torch.zeros(B, 1, 1, length, dtype=torch.float32, device=p.device)
        self.bias[:, 0, 0, :prompt_mask.shape[1]].masked_fill_(~prompt_mask.bool(), -float("inf"))
        self.padded = not bool(prompt_mask.all())
        # rotary tables of every position a row will reach: its last prompt token's position + j
        Tp = prompt_mask.shape[1]
        pos = prompt_mask.long().sum(1, keepdim=True) - 1 + torch.arange(length - Tp + 1, device=p.device)  # (B, n)
        cos, sin = self.model.rotary_emb(torch.zeros(1, dtype=p.dtype, device=p.device), pos)  # (B, n, d)
        self.cos, self.sin = cos[:, None], sin[:, None]  # (B, 1, n, d)

    def fill(self, cache, run):
        """Copy a transformers cache of U distinct prompts into positions [0, n) of every row
        (`run`: the distinct prompt of each row, sampling.prompt_groups)."""
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[2]
            self.keys[i][..., :n] = layer.keys[run].transpose(-1, -2)
            self.values[i][:, :, :n] = layer.values[run]

    def keep(self, rows):
        """Keep only the cache rows `rows` (indices into the current rows)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.bias, self.cos, self.sin = self.bias[rows], self.cos[rows], self.sin[rows]

    def step(self, ids, j, t):
        """Logits (A, V) in fp32 of the token after `ids` (A,) of the current rows: the j-th token
        of the loop (0: the last prompt token), at cache position t."""
        A, d, nkv = ids.shape[0], self.d, self.n_kv
        h = self.model.embed_tokens(ids)[:, None]  # (A, 1, H)
        cos, sin = self.cos[:, :, j:j + 1], self.sin[:, :, j:j + 1]  # (A, 1, 1, d)
        bias = self.bias[..., :t + 1] if self.padded else None  # (A, 1, 1, t+1)
        g = self.n_heads // nkv  # query heads per key/value head
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            a = rms_norm(layer.input_layernorm, h)  # (A, 1, H)
            qkv = F.linear(a, *self.qkv[i]).view(A, 1, -1, d).transpose(1, 2)  # (A, nh + 2·nkv, 1, d)
            q, k, v = qkv.split([self.n_heads, nkv, nkv], 1)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.keys[i][..., t] = k[:, :, 0]
            self.values[i][:, :, t] = v[:, :, 0]
            if g > 1:  # grouped queries: (A, nkv, g, d), the g query heads of each key/value head
                q = q.reshape(A, nkv, g, d)
            o = attend(q, self.keys[i][..., :t + 1], self.values[i][:, :, :t + 1], bias, att.scaling)  # (A, ·, ·, d)
            h = h + F.linear(o.reshape(A, 1, -1), att.o_proj.weight, att.o_proj.bias)
            m = rms_norm(layer.post_attention_layernorm, h)
            gate, up = F.linear(m, *self.gate_up[i]).chunk(2, -1)  # (A, 1, I) each
            h = h + F.linear(F.silu(gate) * up, layer.mlp.down_proj.weight, layer.mlp.down_proj.bias)
        h = rms_norm(self.model.norm, h)
        return F.linear(h[:, 0], self.net.lm_head.weight, self.net.lm_head.bias).float()  # (A, V)


@torch.no_grad()
def sample(net, prompt_ids, prompt_mask, max_new_tokens, temperature, greedy, eos_ids, pad_id, groups, top_p=1.0):
    """Response ids (B, n ≤ max_new_tokens) of `net` for left-padded prompts (B, Tp), the tokens
    `net.generate` gives for the same random state (do_sample unless greedy, top_k 0). `groups`:
    (first, run) of sampling.prompt_groups, the rows that share a prompt.

    The random stream: generate draws the next tokens of all B rows with one torch.multinomial
    call per step, finished rows included, and multinomial consumes the same random numbers
    whatever the probabilities are. So the rows that have ended are dropped from the model's
    work (when a quarter of the rows being decoded have ended: each drop copies the cache), and
    multinomial still gets B rows a step, uniform ones for the rows not decoded.
    """
    B, Tp = prompt_ids.shape
    dev = prompt_ids.device
    dec = StaticDecoder(net, B, Tp + max_new_tokens, prompt_mask)
    if Tp > 1:  # every prompt position but the last, once per distinct prompt
        first, run = groups
        pos = (prompt_mask.cumsum(1) - 1).clamp_min(0)  # (B, Tp) positions that skip left padding
        out = net(input_ids=prompt_ids[first, :-1], attention_mask=prompt_mask[first, :-1],
                  position_ids=pos[first, :-1], use_cache=True, logits_to_keep=1)
        dec.fill(out.past_key_values, run)
    eos = torch.as_tensor(eos_ids, device=dev).flatten()
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=dev)  # (B, max_new)
    rows = torch.arange(B, device=dev)  # (A,) the rows in the decoder, a superset of those running
    running = torch.ones(B, dtype=torch.bool, device=dev)  # (A,) which of them have not ended
    ids, n = prompt_ids[:, -1], 0  # (A,) each row's last token
    for n in range(1, max_new_tokens + 1):
        logits = dec.step(ids, n - 1, Tp - 2 + n)  # (A, V)
        if greedy:
            nxt = logits.argmax(-1)  # (A,)
        else:
            scores = logits / temperature if temperature != 1.0 else logits
            if top_p < 1.0:
                scores = top_p_filter(scores, top_p)
            if len(rows) < B:  # all B rows, as generate draws them: uniform rows for those not decoded
                full = scores.new_zeros(B, scores.shape[1])
                full[rows] = scores
                scores = full
            nxt = torch.multinomial(scores.softmax(-1), 1).squeeze(1)  # (B,) or (A,)
            nxt = nxt[rows] if len(rows) < B else nxt
        nxt = torch.where(running, nxt, torch.full_like(nxt, pad_id))
        tokens[rows, n - 1] = nxt
        running &= ~torch.isin(nxt, eos)
        alive = int(running.sum())
        if alive == 0:
            break
        ids = nxt
        if alive <= 3 * len(rows) // 4:  # drop the ended rows from the cache
            keep = running.nonzero().squeeze(1)
            dec.keep(keep)
            rows, running, ids = rows[keep], running[keep], ids[keep]
    return tokens[:, :n]  # (B, n)
