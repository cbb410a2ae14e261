"""Data-parallel gradient averaging, bucketed and overlapped with backward: what DDP's reducer does,
written out because FERSNet's step does not fit DDP's one-forward-one-backward model (the generator runs
twice before its backward, and the discriminator alternates between trained and frozen).

Each parameter's post-accumulate-grad hook marks it ready. The first backward records the order in which
gradients arrive (deterministic, so the same on every rank) and reduces everything at its end; buckets of
~25 MB are then cut from that order, as DDP rebuilds its buckets after its first iteration. From the second
step on, a bucket is all-reduced asynchronously as soon as it is complete, strictly in bucket order, so
every rank issues the same collectives in the same order. Parameters that got no gradient in the first
step (the decoder under the L_cls-only objective) are in no bucket; ``finish()`` (after ``backward``)
launches what is left, reduces any such gradient that does appear, waits, and copies the averages back.
NCCL averages in the collective (``ReduceOp.AVG``); gloo, which has no AVG, sums and divides.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


class GradBuckets:
    def __init__(self, params, world: int, bucket_bytes: int = BUCKET_BYTES):
        self.world, self.bucket_bytes = world, bucket_bytes
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] | None = None  # cut after the first backward
        self.order: list[torch.nn.Parameter] = []
        self.avg = dist.get_backend() == "nccl"
        self.active = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._ready)

    def begin(self) -> None:
        """Call before ``backward``."""
        self.next, self.inflight, self.active = 0, [], True
        if self.buckets is not None:
            self.missing = [len(b) for b in self.buckets]

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self.active:
            return
        if self.buckets is None:
            self.order.append(p)
            return
        b = self.index.get(id(p))
        if b is not None:
            self.missing[b] -= 1
            while self.next < len(self.buckets) and self.missing[self.next] == 0:
                self._launch(self.buckets[self.next])
                self.next += 1

    def _cut_buckets(self) -> None:
        self.buckets, size = [[]], 0
        for p in self.order:
            if self.buckets[-1] and size + p.numel() * p.element_size() > self.bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.index = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}

    def _launch(self, params) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        op = dist.ReduceOp.AVG if self.avg else dist.ReduceOp.SUM
        self.inflight.append((grads, flat, dist.all_reduce(flat, op=op, async_op=True)))

    def finish(self) -> None:
        """Call after ``backward``: every gradient is then the mean over the ranks."""
        if self.buckets is None:
            self._cut_buckets()
        while self.next < len(self.buckets):
            self._launch(self.buckets[self.next])
            self.next += 1
        strays = [p for p in self.params if id(p) not in self.index and p.grad is not None]
        if strays:  # gradients of parameters in no bucket (the same on every rank: same graph)
            self._launch(strays)
        for grads, flat, work in self.inflight:
            work.wait()
            if not self.avg:
                flat /= self.world
            torch._foreach_copy_(grads, [part.view_as(g) for g, part in zip(grads, flat.split([g.numel() for g in grads]))])
        self.inflight, self.active = [], False
