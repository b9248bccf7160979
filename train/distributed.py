"""Distributed plumbing: the losses' one collective, and the process-group set-up the loop runs.

`gather_features` is the only distributed code the losses use (as open_clip's loss does: every rank
computes its local rows against the features gathered from all ranks). `init_distributed` is what
`train.loop` calls once at start-up to join the torchrun process group; no loss touches it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn


def gather_features(*tensors: torch.Tensor, gather_with_grad: bool = True, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, ...]:
    """All ranks' tensors concatenated along dim 0, in rank order: (n, ...) -> (world_size * n, ...).

    Every rank must pass tensors of the same shapes (equal local batches). With world_size == 1 the
    tensors come back unchanged. Detached tensors (teacher features) gather the same way.

    gather_with_grad=True: torch.distributed.nn.functional.all_gather, whose backward SUMS over the
        ranks the gradient every rank's loss sends to this rank's slice. So after backward, rank r
        holds d(sum_r' L_r')/d(x_r): the exact gradient of the summed (or, after DDP's averaging of
        parameter gradients, the mean) loss.
    gather_with_grad=False: a plain all_gather (no backward), with this rank's slice replaced by the
        local tensor so its gradient still flows through the local loss. Cheaper, but rank r then
        only sees d(L_r)/d(x_r): the other ranks' use of x_r as negatives is dropped.
    """
    if world_size == 1:
        return tensors
    gathered = []
    for tensor in tensors:
        if gather_with_grad:
            parts = list(torch.distributed.nn.functional.all_gather(tensor.contiguous()))
        else:
            parts = [torch.empty_like(tensor) for _ in range(world_size)]
            dist.all_gather(parts, tensor.contiguous())
            parts[rank] = tensor  # the local slice keeps its autograd history
        gathered.append(torch.cat(parts, dim=0))
    return tuple(gathered)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (a decision only rank 0 could make, e.g. after validating)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); one process without it.

    gloo on the CPU, NCCL on GPUs. device "auto" is cuda:LOCAL_RANK when CUDA is available, else cpu.
    """
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
