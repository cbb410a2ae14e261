"""The training loop: the full FERSNet objective (eq. 10) or, for FES-DA fine-tuning, L_cls alone.

No framework magic: one generator optimiser over FERSNet (eq. 10 is one loss over the whole network), one
over the conditional discriminator, alternating D and G steps. Data and augmentation stay on the device;
losses are accumulated as tensors and read back once per ``log_every`` steps and at the end of an epoch.

Data parallel (``cv.workers_per_run > 1``: Ray Train starts the workers and the torch.distributed group):
every rank draws the same global batch, augmentation and targets from the same seeded generator, trains
on its own slice ``[rank::world]``, and averages gradients in buckets all-reduced while backward still runs
(``grad_sync.GradBuckets``), so the ranks' weights never drift apart. BatchNorm statistics are per rank and
synced from rank 0 once per epoch; rank 0 alone writes checkpoints. Outside torch.distributed (or with one
worker) nothing changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fers_dist.config import Config
from fers_dist.data.loader import FaceSet, TargetSampler, apply_augmentation, rotation_table, sample_augmentation
from fers_dist.errors import FersError
from fers_dist.model import build_model
from fers_dist.model.discriminator import PatchDiscriminator
from fers_dist.model.losses import cls_loss, cyc_loss, gan_loss, idt_loss, lambda_idt, rec_loss, total_loss
from fers_dist.train.checkpoint import check_stamp, load_checkpoint, save_checkpoint
from fers_dist.train.evaluate import accuracy
from fers_dist.train.grad_sync import GradBuckets
from fers_dist.train.identity import build_identity
from fers_dist.train.schedule import make_scheduler
from fers_dist.train.speed import (
    adam,
    autocast,
    configure_backends,
    nhwc,
    running_stats_frozen,
    to_channels_last,
    use_amp,
)

Report = Callable[[dict, "str | None"], None]


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains ``model`` on ``train`` (a FaceSet already on the device) for one fold.

    ``objective="full"``: L = L_cls + λ1 L_GAN + λ2 L_rec + λ3 L_cyc + λ4 L_idt (eq. 10), for variants
    with a synthesis branch; variants without one (no_mtl) train L_cls alone.
    ``objective="cls"``: L_cls only (FES-DA fine-tuning of the recogniser).
    """

    def __init__(self, cfg: Config, train: FaceSet, generator: torch.Generator, *, model=None,
                 objective: str = "full", epochs: int | None = None, lr: float | None = None,
                 identity: torch.nn.Module | None | str = "build", log: Callable[[str], None] = print):
        self.cfg, self.train_set, self.g, self.log = cfg, train, generator, log
        self.device = train.images.device
        self.E = train.num_classes
        self.epochs = epochs or cfg.train.epochs
        self.rank, self.world = dist_rank_world()
        if self.world > 1 and min(cfg.train.batch_size, len(train)) < 2 * self.world:
            raise ValueError(f"train.batch_size={cfg.train.batch_size}: data parallel over {self.world} "
                             f"workers needs at least 2 faces per worker per batch (BatchNorm)")
        self.model = model if model is not None else build_model(cfg.model, self.E).to(self.device)
        self.full = objective == "full" and getattr(self.model, "has_fes", False)
        self.amp = use_amp(cfg, self.device)
        configure_backends(cfg, self.device)
        # channels_last: faster on CUDA and on CPU (oneDNN), measured in docs/BENCHMARKS.md
        to_channels_last(self.model, cfg.train.channels_last)
        self.angles = rotation_table(cfg.data.rotations, self.device)
        sched = cfg.schedule if lr is None else cfg.schedule.model_copy(update={"lr_start": lr, "lr_end": lr})
        self.opt_g = adam(self.model.parameters(), sched.lr_start, cfg)
        self.sched_g = make_scheduler(self.opt_g, self.epochs, sched)
        self.D = self.opt_d = self.sched_d = self.identity = None
        if self.full:
            self.sampler = TargetSampler(train.labels, train.subjects, self.E)
            if cfg.loss.lam_adv > 0:
                self.D = to_channels_last(PatchDiscriminator(cfg.model, self.E).to(self.device),
                                          cfg.train.channels_last)
                self.opt_d = adam(self.D.parameters(), sched.lr_start, cfg)
                self.sched_d = make_scheduler(self.opt_d, self.epochs, sched)
            self.identity = build_identity(cfg, train, generator, log) if identity == "build" else identity
        self.step_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.grad_sync = {} if self.world == 1 else {  # one bucketed averager per optimiser
            id(opt): GradBuckets([p for group in opt.param_groups for p in group["params"]], self.world)
            for opt in (self.opt_g, self.opt_d) if opt is not None}
        self.history: list[dict] = []

    # -- state ---------------------------------------------------------------------------------
    def modules(self) -> dict:
        return {"model": self.model, "D": self.D, "opt_g": self.opt_g, "opt_d": self.opt_d,
                "sched_g": self.sched_g, "sched_d": self.sched_d}

    def lambdas(self, epoch: int) -> dict[str, float]:
        lo = self.cfg.loss
        lam_idt = lambda_idt(epoch, self.epochs, lo.lam_idt_start, lo.lam_idt_end) if self.identity else 0.0
        return {"cls": 1.0, "adv": lo.lam_adv, "rec": lo.lam_rec, "cyc": lo.lam_cyc, "idt": lam_idt}

    # -- one step ------------------------------------------------------------------------------
    def step(self, idx: torch.Tensor, lam: dict[str, float], sums: dict[str, torch.Tensor]) -> None:
        cfg, tr, crop = self.cfg, self.train_set, self.cfg.model.input_size
        aff = sample_augmentation(idx.numel(), tr.images.shape[-1], crop, self.angles,
                                  cfg.data.mirror, self.g, self.device)  # for the global batch
        if self.full:
            y_t, t_idx = self.sampler.sample(idx, self.g)
            y_t, t_idx = self._shard(y_t), self._shard(t_idx)
        idx, aff = self._shard(idx), self._shard(aff)
        x, y = self._input(tr.images[idx], aff), tr.labels[idx]
        if not self.full:
            with autocast(self.device, self.amp):
                logits = self.step_model(x).logits
                loss = terms_total = cls_loss(logits.float(), y)
            self._update(self.opt_g, loss)
            self._accumulate(sums, {"cls": loss}, terms_total, logits, y)
            return
        x_t = self._input(tr.images[t_idx], aff)  # same crop/rotation/mirror as the source
        onehot, onehot_t = F.one_hot(y, self.E).float(), F.one_hot(y_t, self.E).float()
        with autocast(self.device, self.amp):
            out = self.step_model(x, onehot_t)
        fake = out.image
        terms = {"cls": cls_loss(out.logits.float(), y)}  # eq. 5
        if self.D is not None:
            real, z_real = (x_t, onehot_t) if cfg.loss.real_pair == "target" else (x, onehot)  # eq. 6: (I^t, z^t)
            for _ in range(cfg.train.d_steps):
                with autocast(self.device, self.amp):
                    d_loss = 0.5 * (gan_loss(self.D(real, z_real).float(), True, cfg.loss.gan)
                                    + gan_loss(self.D(fake.detach(), onehot_t).float(), False, cfg.loss.gan))
                self._update(self.opt_d, d_loss)
            sums["d_loss"] = sums.get("d_loss", 0) + d_loss.detach()
            self.D.requires_grad_(False)
            with autocast(self.device, self.amp):
                terms["adv"] = gan_loss(self.D(fake, onehot_t).float(), True, cfg.loss.gan)  # eq. 6
        with autocast(self.device, self.amp):
            terms["rec"] = rec_loss(fake.float(), x_t)  # eq. 7
            with running_stats_frozen(self.model):  # test faces are real: keep fakes out of BN statistics
                terms["cyc"] = cyc_loss(self.step_model(fake, onehot).image.float(), x)  # eq. 8
            if self.identity is not None and lam["idt"] > 0:
                terms["idt"] = idt_loss(self.identity(fake).float(), self.identity(x_t).float())  # eq. 9
        loss = total_loss(terms, lam)  # eq. 10
        self._update(self.opt_g, loss)
        if self.D is not None:
            self.D.requires_grad_(True)
        self._accumulate(sums, terms, loss, out.logits, y)

    def _input(self, images: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
        return nhwc(apply_augmentation(images, aff, self.cfg.model.input_size), self.cfg.train.channels_last)

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world == 1 else t[self.rank::self.world]

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        sync = self.grad_sync.get(id(opt))
        if sync:  # data parallel: the mean gradient over the global batch, reduced while backward runs
            sync.begin()
        loss.backward()
        if sync:
            sync.finish()
        opt.step()

    def _sync_buffers(self) -> None:
        """BatchNorm running statistics from rank 0, so every rank evaluates and saves the same model."""
        for module in (self.model, self.D):
            for buf in (module.buffers() if module is not None else ()):
                dist.broadcast(buf, src=0)

    @staticmethod
    def _accumulate(sums, terms, loss, logits, y) -> None:
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v.detach()
        sums["loss"] = sums.get("loss", 0) + loss.detach()
        sums["correct"] = sums.get("correct", 0) + (logits.detach().argmax(1) == y).sum()

    # -- epochs --------------------------------------------------------------------------------
    def fit(self, checkpoint: str | Path | None = None, report: Report | None = None,
            val: FaceSet | None = None, config_hash: str | None = None,
            save_now: Callable[[], bool] | None = None) -> int:
        """Train to ``self.epochs``, resuming from ``checkpoint`` if it exists (and was made under
        ``config_hash``; checkpoints are stamped with it). Returns epochs run. A resumed run's first epoch
        records ``resumed_from`` (the epoch it started again at) in its history.

        Checkpoints are written every ``train.checkpoint_every`` epochs, at the last epoch, and after any
        epoch at which ``save_now()`` is true (the caller's preemption notice; every rank calls it once per
        epoch, so it may be a collective).

        Data parallel: rank 0 decides whether to resume, and every rank loads that same checkpoint, so
        the ranks can never start from different epochs."""
        cfg = self.cfg
        start, best, waited = 0, -1.0, 0
        if self._resume_decided_by_rank0(checkpoint):
            if not Path(checkpoint).exists():
                raise FersError(f"{checkpoint}: rank {self.rank} cannot see rank 0's checkpoint; the checkpoint "
                                f"folder must be shared by a run's workers")
            check_stamp(checkpoint, config_hash)
            state = load_checkpoint(checkpoint, modules=self.modules(), generator=self.g)
            start, self.history = state["epoch"] + 1, state["history"]
            best, waited = state["extra"].get("best", -1.0), state["extra"].get("waited", 0)
            if state["extra"].get("stopped"):
                return start
            self.log(f"resumed from {checkpoint} at epoch {start}")
        resumed = start if start else None
        self.model.train()
        for epoch in range(start, self.epochs):
            metrics = self.run_epoch(epoch)
            stop = False
            if val is not None and len(val):
                metrics["val_accuracy"] = accuracy(self.model, val, cfg.model.input_size, self.amp)
                if metrics["val_accuracy"] > best:
                    best, waited = metrics["val_accuracy"], 0
                else:
                    waited += 1
                stop = cfg.train.early_stopping_patience is not None and waited >= cfg.train.early_stopping_patience
            if resumed is not None:
                metrics["resumed_from"], resumed = resumed, None
            self.history.append(metrics)
            last = stop or epoch == self.epochs - 1
            saved = None
            urgent = bool(save_now and save_now())
            if checkpoint and self.rank == 0 and (last or urgent or (epoch + 1) % cfg.train.checkpoint_every == 0):
                save_checkpoint(checkpoint, epoch=epoch, modules=self.modules(), generator=self.g,
                                history=self.history, extra={"best": best, "waited": waited, "stopped": stop,
                                                             "config_hash": config_hash})
                saved = str(checkpoint)
            if report:
                report(metrics, saved)
            if stop:
                self.log(f"early stop at epoch {epoch}: inner validation accuracy did not improve "
                         f"for {waited} epochs")
                return epoch + 1
        return self.epochs

    def _resume_decided_by_rank0(self, checkpoint) -> bool:
        found = bool(checkpoint) and Path(checkpoint).exists()
        if self.world == 1:
            return found
        flag = torch.tensor([int(found)], device=self.device)
        dist.broadcast(flag, src=0)  # once per fit, before the first step
        return bool(flag.item())

    def run_epoch(self, epoch: int) -> dict:
        """One pass over the training faces in full batches; returns the epoch's mean metrics."""
        cfg, n = self.cfg, len(self.train_set)
        bs = min(cfg.train.batch_size, n)
        t0, lam, sums = time.perf_counter(), self.lambdas(epoch), {}
        perm = torch.randperm(n, generator=self.g, device=self.device)
        n_steps = max(1, n // bs)  # full batches only (BatchNorm needs > 1 sample)
        for s in range(n_steps):
            self.step(perm[s * bs:(s + 1) * bs], lam, sums)
            if cfg.train.log_every and (s + 1) % cfg.train.log_every == 0:
                self.log(f"epoch {epoch} step {s + 1}/{n_steps} loss {float(sums['loss']) / (s + 1):.4f}")
        if self.world > 1:
            self._sync_buffers()
        lr = self.opt_g.param_groups[0]["lr"]
        for sch in (self.sched_g, self.sched_d):
            if sch is not None:
                sch.step()
        return self._epoch_metrics(epoch, lr, lam, sums, n_steps * bs, n_steps, t0)

    def _epoch_metrics(self, epoch, lr, lam, sums, n_images, n_steps, t0) -> dict:
        keys = [k for k in sums if k != "correct"] + ["correct"]
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in keys])
        if self.world > 1:  # losses: mean over ranks; correct: summed over the global batch
            dist.all_reduce(values)
            values[:-1] /= self.world
        *values, correct = values.tolist()  # the epoch's one host sync: its queued device work counts below
        seconds = time.perf_counter() - t0
        keys = keys[:-1]
        m = {"epoch": epoch, "lr": lr, "lam_idt": lam["idt"],
             "train_accuracy": correct / n_images, "epoch_s": seconds,
             "images_per_s": n_images / seconds}
        m.update({f"loss_{k}" if k not in ("loss", "d_loss") else k: v / n_steps for k, v in zip(keys, values)})
        return m
