"""The process group of a DistributedDataParallel run of ``lgc-fast train`` (torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT): NCCL on GPUs, gloo on the CPU; a single process needs none."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from lgc_fast.errors import LgcError
from lgc_fast.evaluate import resolve_device


class _OrderedTeardown:
    """Destroys a gloo process group one rank at a time, the highest first, each once every rank above it is done,
    while the ranks below wait with their connections open. Gloo's teardown can deadlock when a peer closes its
    connections at the same moment: seen with torch 2.4.1, rank 1 stuck in destroy_process_group after rank 0 had
    exited (1 run in 25 of tests/test_train.py's DDP test). A count in the rendezvous store orders the ranks."""

    KEY = "lgc_fast/ranks_closed"
    WAIT_S = 60.0  # how long a rank waits for those above it before it closes anyway

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        # Read before any rank can close (closing starts with a barrier of all ranks), so every rank reads the same
        # count; a store that outlives the group (torchrun's agent store, kept across restarts) may hold earlier ones.
        self.base = store.add(self.KEY, 0)

    def destroy(self) -> None:
        above_done = self.base + self.world - 1 - self.rank
        deadline = time.monotonic() + self.WAIT_S
        while self.store.add(self.KEY, 0) < above_done and time.monotonic() < deadline:
            time.sleep(0.005)
        dist.destroy_process_group()
        self.store.add(self.KEY, 1)


class ProcessGroup:
    """The process group: rank, world size and the few collectives the loop needs (no-ops for one process)."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        self._teardown = None
        if self.world > 1:
            want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
            if want_cuda:
                if self.local_rank >= torch.cuda.device_count():
                    raise LgcError(f"LOCAL_RANK {self.local_rank} needs a CUDA device of its own, but "
                                   f"{torch.cuda.device_count()} are visible; start fewer processes or pass "
                                   f"--device cpu")
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
            else:
                self.device = resolve_device(device_arg)
            if not dist.is_initialized():
                # env:// as init_process_group would use it, keeping the store for the teardown
                store, _, _ = next(dist.rendezvous("env://"))
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world)
                self.owned = True
                self._teardown = _OrderedTeardown(store, self.rank, self.world) if backend == "gloo" else None
        else:
            self.device = resolve_device(device_arg)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, model) -> None:
        """Give every rank rank 0's BatchNorm statistics (each rank updates its own during training)."""
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def close(self) -> None:
        if self.owned:
            dist.barrier()
            if self._teardown is not None:
                self._teardown.destroy()
            else:
                dist.destroy_process_group()
