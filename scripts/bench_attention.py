"""How fast decoding.py's attention reads the KV cache, against a plain sum over the same bytes:
one decode step's two products for one layer of the tiny 16-step-chain model (64 rows, 4 heads
of 32, L cache positions, keys stored transposed as the loop stores them), and other ways to
write the first product. Prints a table of medians (microseconds, GB/s of cache read).

    python scripts/bench_attention.py                 # L = 140, 1 thread
    python scripts/bench_attention.py --length 256 --threads 2

BENCHMARKS.md item 9 quotes it: the products are what keeps our loop from 3x `generate`.
"""
import argparse
import statistics
import time

import torch


def timed(f, repeats, inner):
    """Median over `repeats` of the mean time of `inner` calls of f, in microseconds."""
    f()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            f()
        out.append((time.perf_counter() - t) / inner * 1e6)
    return statistics.median(out)


def operations(A, h, d, L, capacity, seed=0):
    """The timed operations [(name, f)] on random tensors of the loop's layout, and the MB of keys
    they read. The first product's three ways compute the same scores (A, h, 1, L)."""
    g = torch.Generator().manual_seed(seed)
    kt = torch.randn(A, h, d, capacity, generator=g)[..., :L]  # (A, h, d, L) a prefix of each row's block
    v = torch.randn(A, h, capacity, d, generator=g)[:, :, :L]  # (A, h, L, d)
    q = torch.randn(A, h, 1, d, generator=g)
    p = torch.randn(A, h, 1, L, generator=g).softmax(-1)
    flat = torch.randn(A * h * d * L, generator=g)
    cases = [
        ("q·kᵀ, matmul (the loop)", lambda: torch.matmul(q, kt)),
        ("p·v, matmul (the loop)", lambda: torch.matmul(p, v)),
        ("q·kᵀ, broadcast multiply and sum", lambda: (q.transpose(-1, -2) * kt).sum(-2, keepdim=True)),
        ("q·kᵀ, einsum", lambda: torch.einsum("ahd,ahdl->ahl", q[:, :, 0], kt)[:, :, None]),
        ("plain sum of the same bytes", lambda: flat.sum()),
    ]
    return cases, A * h * d * L * 4 / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--length", type=int, default=140, help="cache positions attended")
    ap.add_argument("--capacity", type=int, default=256, help="positions the cache is allocated for")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=50)
    a = ap.parse_args(argv)
    if not 0 < a.length <= a.capacity:
        ap.error(f"--length {a.length} must be in 1..--capacity ({a.capacity})")
    torch.set_num_threads(a.threads)
    cases, mb = operations(a.rows, a.heads, a.head_dim, a.length, a.capacity)
    print(f"{a.rows} rows x {a.heads} heads x {a.head_dim} dims x {a.length} positions: {mb:.2f} MB of keys (as much of values), "
          f"{a.threads} thread(s), median of {a.repeats}")
    print("| operation | us | GB/s |\n|---|---|---|")
    for name, f in cases:
        us = timed(f, a.repeats, a.inner)
        print(f"| {name} | {us:.0f} | {mb / us * 1e3:.1f} |")


if __name__ == "__main__":
    main()
