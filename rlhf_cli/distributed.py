"""Several processes (`torchrun --nproc_per_node N`, `accelerate launch`): which one this is, and
the few things they do together. In a single process every function here is a no-op, so the stage
loops read the same with one process or many.

How a step is split: every rank walks the same data stream with a micro-batch of
`batch_size x world` rows and takes its own contiguous `batch_size` of them (an epoch's last,
shorter micro-batch is split as evenly as it goes, so no row is left out; a rank may get none). Losses are sums
normalised by the whole step's count across ranks, and the trainable (LoRA) gradients are summed
with one all-reduce each after backward. So N processes with `train.batch_size=b` train exactly like
one process with `b x N`. We all-reduce the LoRA gradients ourselves instead of wrapping the model
in DistributedDataParallel: they are a few MB, the PEFT + 4-bit model needs no wrapper, and the
sum-then-normalise rule stays visible in the loop.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import torch
import torch.distributed as dist


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that prints, logs and writes files."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group torchrun / accelerate set up in the environment (NCCL on CUDA, gloo
    on CPU); nothing in a single process."""
    if world() == 1 or dist.is_initialized():
        return
    # NCCL for GPU tensors, gloo for the few CPU ones (counts, RNG states)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")


def local_device(device: torch.device) -> torch.device:
    """A CUDA device becomes this rank's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(rows: list) -> list:
    """This rank's contiguous share of a global micro-batch: the rows cut in rank order into
    shares whose sizes differ by at most one, so every row is trained on. A full micro-batch of
    `batch_size x world` rows gives each rank `batch_size`; an epoch's shorter last one gives
    fewer, and none to some ranks when there are fewer rows than ranks (a stage skips an empty
    share's forward pass, and still takes part in every collective of the step)."""
    n, size, me = len(rows), world(), rank()
    return rows[me * n // size : (me + 1) * n // size]


def total(value: float | torch.Tensor) -> float:
    """The sum of a number over all ranks."""
    if world() == 1:
        return float(value)
    tensor = torch.as_tensor(value, dtype=torch.float64).reshape(1)
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor summed over the ranks (a new tensor; the argument is left as it was). This is the
    `reduce` that losses.masked_mean / masked_whiten take to compute over every rank's values."""
    if world() == 1:
        return tensor
    summed = tensor.detach().clone()
    dist.all_reduce(summed)
    return summed


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor (the same shape on each), concatenated in rank order along dim 0: the
    whole step's per-row values, as one process with the whole batch would have them."""
    if world() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_rows(
    parts: list[dict[str, torch.Tensor] | None], device: torch.device
) -> dict[str, torch.Tensor]:
    """A step's per-row values from every rank, key by key, in the order one process with the
    whole batch has them: micro-batch by micro-batch, each in rank order. `parts` has one entry
    per micro-batch on every rank, None where this rank's share was empty (`shard`). The values
    travel as they are (`gather_objects`), so the result is the same to the bit whatever the
    number of processes, and a rank with no rows still takes part."""
    if world() == 1:  # nothing to send: no copy to the CPU and back
        every = [[None if p is None else {k: v.detach() for k, v in p.items()} for p in parts]]
    else:
        local = [None if p is None else {k: v.detach().cpu() for k, v in p.items()} for p in parts]
        every = gather_objects(local)
    ordered = [mine[i] for i in range(len(parts)) for mine in every if mine[i] is not None]
    return {key: torch.cat([p[key] for p in ordered]).to(device) for key in ordered[0]}


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every trainable gradient over the ranks (one flat all-reduce)."""
    if world() == 1:
        return
    for p in params:  # a parameter no loss reached on this rank still takes part
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def agree(value: int) -> int:
    """The largest of an integer over the ranks (e.g. a signal one of them received)."""
    if world() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_objects(value) -> list:
    """Every rank's picklable value, in rank order (on every rank)."""
    if world() == 1:
        return [value]
    values = [None] * world()
    dist.all_gather_object(values, value)
    return values


def map_batches(items: list, size: int, fn: Callable[[int, list], list]) -> list:
    """`fn(index, batch)` over `items` cut into batches of `size`, the batches dealt round-robin to
    the ranks; every rank gets all the results, in the order of `items`. Each batch holds exactly
    the items it would hold in a single process, so the results do not depend on the number of
    processes (used where nothing is trained: held-out generation, scoring, KL, perplexity)."""
    batches = [items[start : start + size] for start in range(0, len(items), size)]
    mine = {i: fn(i, batches[i]) for i in range(rank(), len(batches), world())}
    done: dict[int, list] = {}
    for part in gather_objects(mine):
        done |= part
    return [result for i in range(len(batches)) for result in done[i]]


def seed_this_rank(seed: int) -> None:
    """Give each process its own random stream (dropout, sampling) once the model is built the
    same way on all of them: seed + rank x a large prime. Nothing in a single process."""
    if world() > 1:
        torch.manual_seed(seed + rank() * 1_000_003)
        random.seed(seed + rank() * 1_000_003)


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def finish() -> None:
    if world() > 1 and dist.is_initialized():
        dist.destroy_process_group()
