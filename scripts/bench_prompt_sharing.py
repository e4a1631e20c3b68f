"""What sharing a prompt between its K rows saves in `sampling.token_logprobs`: each row run whole
(B·(Tp + T) positions) against each distinct prompt run once with its KV cache serving the K
responses (P·Tp + B·T positions), without gradients (π_ref, the PRM's re-scoring) and with
forward + backward (the PRM's and the policy's updates). Prints a table of medians.

    python scripts/bench_prompt_sharing.py                       # SmolLM2-135M's shape, random weights
    python scripts/bench_prompt_sharing.py --model DIR --threads 1  # a local checkpoint instead
    python scripts/bench_prompt_sharing.py --layers 2 --repeats 1   # a quick look

Defaults are the SmolLM2 preset's batch: P = 4 prompts × K = 4 samples, 71-token prompts,
40-token responses, LoRA r = 8 on every linear layer. The two ways alternate, so a busy machine
slows both alike; read the CPU-seconds column when it is busy.
"""
import argparse
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sampling  # noqa: E402


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:  # SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M-Instruct config.json)
        base = LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                            tie_word_embeddings=True, attn_implementation="sdpa"))
    base.eval()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero adapters, as after a few updates
            torch.nn.init.normal_(p, std=0.02)
    return model


def batch(args, vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab - 5, (args.P, args.prompt_len), generator=g)
    am = torch.ones_like(ids)
    ids[0, :5], am[0, :5] = 0, 0  # one left-padded prompt
    ids, am = ids.repeat_interleave(args.K, 0), am.repeat_interleave(args.K, 0)  # (B, Tp): K rows per prompt
    resp = torch.randint(5, vocab - 5, (args.P * args.K, args.resp_len), generator=g)
    mask = torch.ones(resp.shape)
    mask[1, args.resp_len // 2:] = 0  # one response that ended early
    return ids, am, resp, mask


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="a local checkpoint (default: SmolLM2-135M's shape, random weights)")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers of the random model (SmolLM2-135M: 30)")
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=71)
    ap.add_argument("--resp-len", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each way and mode")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    ids, am, resp, mask = batch(args, model.config.vocab_size)
    shared = sampling.predicting_outputs

    def whole(net, p, pm, r, m, key, per_row=False):
        return shared(net, p, pm, r, m, key, True)

    def call(way, grad):
        with mock.patch.object(sampling, "predicting_outputs", shared if way == "shared" else whole):
            if grad:
                model.zero_grad(set_to_none=True)
                lp = sampling.token_logprobs(model, ids, am, resp, mask)
                lp.sum().backward()
                return lp.detach()
            with torch.no_grad():
                return sampling.token_logprobs(model, ids, am, resp, mask)

    diff = (call("whole", False) - call("shared", False)).abs().max().item()  # also a warm-up of both
    times = {(w, g): [] for w in ("whole", "shared") for g in (False, True)}
    for _ in range(args.repeats):
        for g in (False, True):
            for w in ("whole", "shared"):
                t, c = time.perf_counter(), time.process_time()
                call(w, g)
                times[(w, g)].append((time.perf_counter() - t, time.process_time() - c))
    B = args.P * args.K
    print(f"{'model ' + args.model if args.model else f'SmolLM2-135M shape, {args.layers} layers, random weights'}; "
          f"P={args.P} x K={args.K}, prompt {args.prompt_len} + response {args.resp_len} tokens, "
          f"threads {torch.get_num_threads()}, {args.repeats} timed calls each; max |Δ log-prob| {diff:.1e}\n")
    print("| forward | each row whole: s (CPU s) | prompt shared: s (CPU s) | speed-up |\n|---|---|---|---|")
    for g, name in ((False, "no gradient"), (True, "forward + backward")):
        (wt, wc), (st, sc) = ([statistics.median(x[i] for x in times[(w, g)]) for i in (0, 1)]
                              for w in ("whole", "shared"))
        print(f"| {name} | {wt:.2f} ({wc:.2f}) | {st:.2f} ({sc:.2f}) | {wt / st:.2f}x |")
    print(f"\npositions through the decoder: {B * (args.prompt_len + args.resp_len)} whole, "
          f"{args.P * args.prompt_len + B * args.resp_len} shared")


if __name__ == "__main__":
    main()
