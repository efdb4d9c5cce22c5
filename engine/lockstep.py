"""Tensor-parallel lockstep: every rank runs the same rounds. Rank 0, fed by the HTTP process, sends
each round's plan (its arrivals and cancels, or None to stop) to the others over a CPU (gloo) group,
and every rank then runs that round, whose forwards all-reduce between them."""

from __future__ import annotations

import torch

from config.settings import Settings


class Lockstep:
    def __init__(self, settings: Settings):
        import deepspeed  # slow to import: only tensor-parallel ranks need it here

        backend = "nccl" if settings.resolved_device().startswith("cuda") else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=settings.rank,
                                   world_size=settings.world_size)  # MASTER_ADDR and MASTER_PORT: the launcher's
        self.group = torch.distributed.new_group(backend="gloo")

    def share(self, plan):
        """Rank 0's `plan`, on every rank."""
        box = [plan]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
