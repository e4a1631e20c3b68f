"""Several processes on one machine (`torchrun --nproc-per-node N prime_mini.py`): the collectives.

Every rank holds the same prompt stream, buffer and kept batch, so the loop's decisions (the
filter, `batch_norm`, leave-one-out returns, whitening, the PRM's accuracy EMA and the gate) are
made on the global batch exactly as by one process. Only the expensive per-row work is shared
out: each rank samples and verifies its share of a round's prompts, and computes the log-probs
and gradients of its share of each mini-batch's rows (`my_micro_batches`). What each rank computed is put together here:

    gather_rows   rows of different lengths (B_r, T_r) from every rank -> (B, T), in rank order
    sum_rows      a (B, ...) tensor of which each rank filled its own rows, the rest zeros
    sum_grads     each adapter's gradients summed over ranks, before clipping
    broadcast     rank 0's tensors (new adapters, --prm-init) to every rank

The micro-batch loss weights stay those of the global mini-batch, so the summed gradient is the
one of the whole mini-batch; with two ranks a gradient is a sum of two floats, which is the same
in either order, so N = 2 gives bit-identical updates to one process doing the same micro-batches
(tests/test_parallel.py). Rank 0 alone evaluates, logs and writes files. Plain `python
prime_mini.py` (no torchrun) is one rank: every function here returns its input.

Peft's `set_adapter` flips `requires_grad` between the two adapters, which DDP's wrapper does not
expect, so gradients are all-reduced explicitly after each mini-batch's backward passes.
"""
import datetime
import functools
import os
import time

import torch
import torch.distributed as dist

_RANK, _WORLD = 0, 1
_DEVICE = "cpu"  # where the collectives' tensors live: the CPU for gloo, this rank's GPU for nccl
_COMM_S = 0.0  # seconds this rank spent in the collectives below (waiting for slower ranks included)


def _timed(f):
    @functools.wraps(f)
    def wrapper(*a, **kw):
        global _COMM_S
        t = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            _COMM_S += time.perf_counter() - t
    return wrapper


def comm_seconds():
    """Seconds spent in collectives so far by this rank (the loop logs each step's as t_comm)."""
    return _COMM_S


def setup(device_kind):
    """Join the torchrun job when there is one (WORLD_SIZE > 1): gloo on the CPU, nccl on GPUs.
    Returns this rank's device: `device_kind` itself, or cuda:LOCAL_RANK for CUDA."""
    global _RANK, _WORLD, _DEVICE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = device_kind.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # rank 0 evaluates alone while the others wait at the next collective: a long timeout
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    if dist.is_initialized():
        _RANK, _WORLD = dist.get_rank(), dist.get_world_size()
    if _WORLD > 1 and device_kind.startswith("cuda"):
        _DEVICE = f"cuda:{torch.cuda.current_device()}"
        return _DEVICE
    return device_kind


def rank():
    return _RANK


def world():
    return _WORLD


def is_main():
    """Rank 0: the one that evaluates, prints, logs and writes."""
    return _RANK == 0


def seed_rank(seed):
    """Seed this rank's sampling draws: `seed` offset by the rank, so that ranks sampling their
    shares do not draw the same random numbers (rank 0 keeps `seed`)."""
    torch.manual_seed(seed + 100003 * _RANK)


@_timed
def barrier():
    if _WORLD > 1:
        dist.barrier()


def share(n, r=None, w=None):
    """This rank's contiguous share [start, end) of n items, as even as possible (sizes differ by
    at most one; the first n % world ranks get one more). Example: share(5) on 2 ranks -> (0, 3), (3, 5)."""
    r, w = (_RANK if r is None else r), (_WORLD if w is None else w)
    start = r * (n // w) + min(r, n % w)
    return start, start + n // w + (1 if r < n % w else 0)


def my_micro_batches(i0, i1, micro):
    """This rank's micro-batches (start, end) of the rows [i0, i1) of a mini-batch: its share of
    those rows, `micro` rows at a time. One process: range(i0, i1, micro), as the loop always did.
    Example: rows (0, 16), micro 4, on 2 ranks -> rank 0 (0, 4), (4, 8); rank 1 (8, 12), (12, 16)."""
    a, b = share(i1 - i0)
    return [(i0 + k, min(i0 + k + micro, i0 + b)) for k in range(a, b, micro)]


@_timed
def gather_objects(xs):
    """Every rank's list, concatenated in rank order."""
    if _WORLD == 1:
        return list(xs)
    out = [None] * _WORLD
    dist.all_gather_object(out, list(xs))
    return [x for part in out for x in part]


@_timed
def broadcast_object(x):
    """Rank 0's picklable value, on every rank."""
    if _WORLD == 1:
        return x
    box = [x]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@_timed
def gather_rows(x, value):
    """Every rank's rows (B_r, T_r) (or (B_r,)) concatenated in rank order as (ΣB_r, max T_r), the
    time axis right-padded with `value`: what one process's `pad_cat` of the same rows gives."""
    if _WORLD == 1:
        return x
    shapes = [None] * _WORLD
    dist.all_gather_object(shapes, tuple(x.shape))
    rows = max(s[0] for s in shapes)
    full = torch.full((rows, *[max(s[d] for s in shapes) for d in range(1, x.dim())]), value, dtype=x.dtype, device=_DEVICE)
    full[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(full) for _ in range(_WORLD)]
    dist.all_gather(parts, full)
    return torch.cat([p[:s[0]] for p, s in zip(parts, shapes)]).to(x.device)


@_timed
def sum_rows(x):
    """The sum over ranks of x: with each rank's own rows filled and the others zero, the whole
    tensor (x + 0 is exact, so the rows are the ones their rank computed, bit for bit)."""
    if _WORLD > 1:
        y = x.to(_DEVICE)
        dist.all_reduce(y)
        x.copy_(y)
    return x


@_timed
def sum_values(values):
    """A list of floats summed over ranks (statistics of each rank's micro-batches)."""
    if _WORLD == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_DEVICE)
    dist.all_reduce(t)
    return t.tolist()


@_timed
def sum_grads(params):
    """Sum each parameter's gradient over ranks, in one flat buffer (a rank without a micro-batch
    in this mini-batch contributes zeros); every rank then clips and steps with the same sum."""
    params = list(params)
    if _WORLD == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


@torch.no_grad()
@_timed
def broadcast(tensors):
    """Rank 0's values of these tensors (an adapter's weights) on every rank."""
    if _WORLD == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=0)


@torch.no_grad()
def check_same(tensors, what):
    """Stop when the ranks' copies of these tensors differ: the same batch and the same summed
    gradients keep every rank's adapters identical, so a difference is a bug, not noise. Compares
    three checksums of the flattened values (sum, sum of squares, index-weighted sum) exactly."""
    if _WORLD == 1:
        return
    flat = torch.cat([t.detach().flatten().to(_DEVICE, torch.float64) for t in tensors])
    sums = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(len(flat), device=_DEVICE)).sum()])
    every = [torch.empty_like(sums) for _ in range(_WORLD)]
    dist.all_gather(every, sums)
    if any(not torch.equal(every[0], s) for s in every[1:]):
        raise RuntimeError(f"parallel: the ranks' {what} differ (checksums {[s.tolist() for s in every]}); "
                           "every rank must hold the same batch and apply the same summed gradients")


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
