"""Data-parallel training (cv.workers_per_run > 1) in plain torch.distributed: two gloo processes on this
machine stand in for the Ray Train workers, which set up the same process group."""

from __future__ import annotations

import os
import socket
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import decode_index, tagged_faces

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, cfg_dict: dict, out: str) -> None:
    from fers_dist.config import parse_config
    from fers_dist.train.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        class Recording(Trainer):
            calls: ClassVar[list] = []

            def _input(self, images, aff):
                self.calls.append(sorted(decode_index(images)))
                return super()._input(images, aff)

        cfg = parse_config(cfg_dict, source="test")
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        trainer = Recording(cfg, tagged_faces(), g, log=lambda m: None)
        trainer.fit(checkpoint=os.path.join(out, f"r{rank}", "main.pt"))
        torch.save({"model": trainer.model.state_dict(), "D": trainer.D.state_dict(),
                    "history": trainer.history, "sources": Recording.calls[0::2]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, demo_cfg):
    cfg = demo_cfg.with_overrides({"train.epochs": 2, "train.checkpoint_every": 1, "train.batch_size": 16,
                                   "identity.backbone": "none"})
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_rank_main, args=(_free_port(), cfg.model_dump(mode="json"), str(out)),
                       nprocs=WORLD, start_method="spawn", join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)], cfg


def test_ranks_train_disjoint_halves_of_each_global_batch(ranks):
    _, (r0, r1), cfg = ranks
    assert len(r0["sources"]) == len(r1["sources"]) > 0
    for a, b in zip(r0["sources"], r1["sources"]):
        assert len(a) == len(b) == cfg.train.batch_size // WORLD
        assert not set(a) & set(b)


def test_ranks_end_with_identical_weights_and_buffers(ranks):
    _, (r0, r1), _ = ranks
    for net in ("model", "D"):
        assert r0[net].keys() == r1[net].keys()
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs between ranks"


def test_epoch_metrics_are_global_and_agree(ranks):
    _, (r0, r1), _cfg = ranks
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    assert [h["train_accuracy"] for h in r0["history"]] == [h["train_accuracy"] for h in r1["history"]]
    n = len(tagged_faces())
    assert all(h["images_per_s"] * h["epoch_s"] == pytest.approx((n // 16) * 16) for h in r0["history"])


def test_only_rank_zero_writes_checkpoints(ranks):
    out, _, _ = ranks
    assert (out / "r0" / "main.pt").exists() and not (out / "r1" / "main.pt").exists()


def _decide_main(rank: int, port: int, out: str) -> None:
    from types import SimpleNamespace

    from fers_dist.train.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        me = SimpleNamespace(world=WORLD, device=torch.device("cpu"))
        seen = os.path.join(out, "exists.pt")
        gone = os.path.join(out, "missing.pt")
        # rank 0 sees a checkpoint that rank 1 does not, then the other way round
        a = Trainer._resume_decided_by_rank0(me, seen if rank == 0 else gone)
        b = Trainer._resume_decided_by_rank0(me, gone if rank == 0 else seen)
        torch.save({"a": a, "b": b}, os.path.join(out, f"decided{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_rank_zero_decides_the_resume_for_every_rank(tmp_path):
    """The ranks of a data-parallel run can never resume at different epochs: whatever a rank sees, it
    resumes exactly when rank 0 resumes (and fails loudly if it cannot read rank 0's checkpoint)."""
    (tmp_path / "exists.pt").write_bytes(b"x")
    mp.start_processes(_decide_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn",
                       join=True)
    decided = [torch.load(tmp_path / f"decided{r}.pt", weights_only=True) for r in range(WORLD)]
    assert decided == [{"a": True, "b": False}] * WORLD


def _buckets_main(rank: int, port: int, out: str) -> None:
    from fers_dist.train.grad_sync import GradBuckets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same weights on both ranks
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        unused = torch.nn.Parameter(torch.ones(4))
        params = [*net.parameters(), unused]
        sync = GradBuckets(params, WORLD, bucket_bytes=64)  # 64 B: a bucket per one or two tensors
        launched, phase = [], []
        real_launch = sync._launch

        def launch(bucket):  # when each bucket starts its all-reduce: during backward, or in finish()
            launched.append((phase[-1], sync.next if phase[-1] == "backward" else -1))
            real_launch(bucket)

        sync._launch = launch
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))  # each rank its own data
        for step in range(2):  # step 0 records the gradient order; step 1 reduces during backward
            net.zero_grad(set_to_none=True)
            sync.begin()
            phase.append("backward")
            net(x).square().sum().backward()
            phase.append("finish")
            sync.finish()
            if step == 0:
                first, launched = launched, []
        torch.save({"grads": [p.grad for p in net.parameters()], "unused": unused.grad, "x": x,
                    "buckets": len(sync.buckets), "first": first, "launched": launched},
                   os.path.join(out, f"b{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_bucketed_gradient_average_equals_the_global_batch_gradient(tmp_path):
    """GradBuckets: every rank ends with the mean of the ranks' gradients (what one process would compute
    on the concatenated batch); buckets start reducing during backward, in order; a parameter that got no
    gradient keeps none."""
    mp.start_processes(_buckets_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn",
                       join=True)
    got = [torch.load(tmp_path / f"b{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    per_rank = []
    for r in range(WORLD):
        net.zero_grad()
        net(got[r]["x"]).square().sum().backward()
        per_rank.append([p.grad.clone() for p in net.parameters()])
    expected = [torch.stack(gs).mean(0) for gs in zip(*per_rank)]
    for r in range(WORLD):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got[r]["grads"], expected))
        assert got[r]["unused"] is None
    first, launched = got[0]["first"], got[0]["launched"]
    assert {p for p, _ in first} == {"finish"}  # step 1 records the order, reduces at the end
    assert got[0]["buckets"] >= 3 and launched == [("backward", i) for i in range(got[0]["buckets"])]
    assert got[1]["launched"] == launched  # both ranks issue the same collectives in the same order
