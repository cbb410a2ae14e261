"""The GPU path prepared on CPU (issue 20): `fers bench gpu` rehearsed end to end at toy scale, its JSON
feeding `fers cv --dry-run --bench`, the memory estimate and the planner's refusal of runs that cannot fit
their GPU share, and `fers bench train` refusing a run this machine cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fers_dist.cli import main
from fers_dist.config import load_config
from fers_dist.cv.resources import check_gpu_memory, gpu_memory_gb, max_batch
from fers_dist.errors import FersError

ROOT = Path(__file__).resolve().parents[1]
H100 = [{"CPU": 16, "GPU": 8, "accelerator_type:H100": 1}]
H200 = [{"CPU": 16, "GPU": 8, "accelerator_type:H200": 1}]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`fers bench gpu --tiny --device cpu`: every section, in its own processes, as on the GPU."""
    out = tmp_path_factory.mktemp("gpu") / "bench.json"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fers_dist.cli", "bench", "gpu", "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


@pytest.mark.slow
def test_bench_gpu_rehearsal_runs_every_section(rehearsal):
    result, out = rehearsal
    assert json.loads(out.read_text()) == result  # --out holds the same JSON as the last stdout line
    sections = result["sections"]
    ran = {"step_bf16", "step_fp32", "step_bf16_compiled", "packed", "fold"}
    assert ran <= set(sections)
    for name in ran:
        assert "error" not in sections[name] and "skipped" not in sections[name], (name, sections[name])
    assert sections["packed_mps"] == {"skipped": "CUDA only"}
    assert sections["step_bf16_compiled"]["compile"] is True and sections["step_fp32"]["amp_bf16"] is False
    assert all(sections[s]["identity"] == "lightcnn9" for s in ("step_bf16", "step_fp32"))
    assert sections["packed"]["processes"] == 2 and sections["packed"]["total_images_per_s"] > 0
    fold = sections["fold"]
    assert fold["epochs"] == 2 and fold["projected_500_epoch_min"] > 0 and fold["train_images"] < fold["images"]
    summary = result["summary"]
    assert summary["step_bf16_images_per_s"] == sections["step_bf16"]["images_per_s"]
    assert set(summary["targets"]) == {"images_per_s>=1000", "mfu>=0.35", "reserved<=18GB", "fold<=10min"}


@pytest.mark.slow
def test_dry_run_plans_with_the_bench_figures(rehearsal, capsys):
    result, out = rehearsal
    paper = str(ROOT / "jobs/configs/paper.yaml")
    assert main(["cv", "--config", paper, "--dry-run", "--bench", str(out), "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    packed = result["summary"]["packed_total_images_per_s"]  # paper.yaml packs runs (gpus_per_run < 1)
    assert f"throughput: {packed:.0f} training images/s per full GPU (measured by fers bench gpu on cpu" in text
    assert "tiny scale, NOT the paper's" in text
    assert main(["cv", "--config", paper, "--dry-run", "--bench", str(out), "--set", "cv.gpus_per_run=1",
                 "--set", "train.compile=true"]) == 0
    assert f"throughput: {result['summary']['step_bf16_compiled_images_per_s']:.0f} training" in capsys.readouterr().out
    assert main(["cv", "--config", paper, "--dry-run"]) == 0
    assert "projected from counted FLOPs at 35% MFU: no GPU figure given (--bench)" in capsys.readouterr().out


def test_dry_run_bench_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    assert main(["cv", "--config", str(ROOT / "jobs/configs/paper.yaml"), "--dry-run", "--bench", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fers cv: error: --bench {bad}: not a fers bench gpu JSON") and "\n" not in err


@pytest.fixture(scope="module")
def paper():
    return load_config(ROOT / "jobs/configs/paper.yaml")


def test_gpu_memory_comes_from_the_accelerator_type_or_the_config(paper):
    assert gpu_memory_gb(paper.cv, H100) == (80, "accelerator type H100")
    assert gpu_memory_gb(paper.cv, H100 + H200) == (80, "accelerator type H100/H200")  # the smallest card
    assert gpu_memory_gb(paper.cv, [{"GPU": 1}])[0] is None
    cv = paper.cv.model_copy(update={"gpu_memory_gb": 24.0})
    assert gpu_memory_gb(cv, H100) == (24.0, "cv.gpu_memory_gb")


def test_planner_refuses_a_gpu_share_the_run_cannot_fit(paper):
    """The paper's run (batch 64, LightCNN-9) at a quarter of an 80 GB H100 (20 GB) is refused; half an H100
    and a quarter of a 141 GB H200 are accepted."""
    cfg = paper.with_overrides({"identity.checkpoint": "weights/lightcnn9.pth"})
    with pytest.raises(FersError, match=r"^cv.gpus_per_run=0.25 GPU of 80 GB \(accelerator type H100\) gives a "
                                        r"run 20.0 GB, but one run needs an estimated ~2\d\.\d GB") as e:
        check_gpu_memory(cfg, H100, 0.25, 64, "cv.gpus_per_run")
    assert "\n" not in str(e.value)
    check_gpu_memory(cfg, H100, 0.5, 64, "cv.gpus_per_run")
    check_gpu_memory(cfg, H200, 0.25, 64, "cv.gpus_per_run")
    notes = []
    check_gpu_memory(cfg, [{"GPU": 1}], 0.25, 64, "cv.gpus_per_run", log=notes.append)
    assert notes == [("fers: GPU memory check skipped: accelerator type not reported has no known memory size; "
                      "set cv.gpu_memory_gb")]
    check_gpu_memory(cfg.with_overrides({"train.device": "cpu"}), H100, 0.01, 64, "cv.gpus_per_run")  # CPU run


@pytest.mark.parametrize("bf16", [False, True])
def test_memory_probe_on_fake_tensors_counts_what_a_real_step_saves(bf16):
    """The planner's probe runs its step on fake tensors (seconds, where a real bf16 step of the paper's model
    took 299 s on this CPU). On the demo model it must count the bytes a real step saves: measured equal in
    fp32 and 0.09% apart in bf16 (the paper's model: equal, and 0.009%)."""
    from fers_dist.train.memory import _probe, probe_key

    key = probe_key(load_config(ROOT / "jobs/configs/demo.yaml"))
    fake, real = _probe(key, 7, bf16), _probe(key, 7, bf16, fake=False)
    assert fake[1:] == real[1:] and fake[0] == pytest.approx(real[0], rel=0.005), (fake, real)
    assert probe_key(load_config(ROOT / "jobs/configs/demo.yaml").with_overrides({"train.batch_size": 8})) == key


def test_memory_probe_of_a_float32_run_stays_float32_whatever_cpu_amp_says(monkeypatch):
    """The probe steps on the CPU: a config with ``train.cpu_amp`` on (a float32 CUDA run when ``train.amp`` is
    off) must still count float32 activations on a CPU with bf16 units; only the probe's ``bf16`` flag decides."""
    from fers_dist.train import speed
    from fers_dist.train.memory import _probe, probe_key

    monkeypatch.setattr(speed, "cpu_has_bf16", lambda: True)
    demo = load_config(ROOT / "jobs/configs/demo.yaml")
    f32, mixed = (_probe(probe_key(demo.with_overrides({"train.cpu_amp": v})), 7, False) for v in (False, True))
    assert mixed == f32


def test_planner_refuses_a_tune_space_whose_largest_batch_cannot_fit():
    cfg = load_config(ROOT / "jobs/configs/tune.yaml")
    assert max_batch(cfg) == 64
    check_gpu_memory(cfg, H100, cfg.tune.gpus_per_trial, max_batch(cfg), "tune.gpus_per_trial", tuning=True)
    wide = cfg.with_overrides({"tune.space": {**{k: v.model_dump() for k, v in cfg.tune.space.items()},
                                              "train.batch_size": {"type": "categorical", "choices": [64, 128]}}})
    assert max_batch(wide) == 128
    with pytest.raises(FersError, match=r"^tune.gpus_per_trial=0.5 GPU of 80 GB .* gives a run 40.0 GB, but one "
                                        r"run needs an estimated ~\d\d\.\d GB .*activations at batch 128"):
        check_gpu_memory(wide, H100, 0.5, max_batch(wide), "tune.gpus_per_trial", tuning=True)


def test_fers_cv_refuses_before_any_run_starts(tiny_cfg, tmp_path, ray_session, capsys):
    from fers_dist.cv.cli import run_cv

    cfg = tiny_cfg.with_overrides({"cv.gpus_per_run": 0.25, "cv.gpu_memory_gb": 1.0, "train.device": "auto",
                                   "cv.storage": str(tmp_path / "results"), "data.root": str(tmp_path)})
    (tmp_path / "ckplus").mkdir()
    (tmp_path / "ckplus" / "faces.parquet").write_bytes(b"")
    with pytest.raises(FersError, match=r"cv.gpus_per_run=0.25 GPU of 1 GB \(cv.gpu_memory_gb\) gives a run "
                                        r"0.2 GB, but one run needs"):
        run_cv(cfg.with_overrides({"cv.datasets": ["ckplus"], "cv.variants": ["original"], "cv.folds": [0]}))
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("folds.parquet"))


def test_bench_train_defaults_fit_a_cpu_and_refuses_what_cannot(monkeypatch, capsys):
    import argparse

    from fers_dist.train import bench, memory

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.scale(p.parse_args([]), "cpu") == (bench.CPU_SCALE, "CPU scale")
    assert bench.scale(p.parse_args([]), "cuda") == (bench.PAPER_SCALE, "paper scale")
    for flags, want in (([], False), (["--cpu-amp"], True)):  # the flag reaches the config the step runs
        args = p.parse_args(flags)
        assert bench.bench_config(args, bench.scale(args, "cpu")[0], "cpu").train.cpu_amp is want
    monkeypatch.setattr(memory, "available_memory_gb", lambda: 1.5)
    assert main(["bench", "train", "--device", "cpu", "--batch", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fers bench train: custom scale (width 64, 48x48, batch 64) on cpu; memory estimate")
    assert err[1].startswith("fers bench: error: this run needs an estimated ~") and \
        err[1].endswith("but this machine has 1.5 GB available; lower --batch, --width or --input-size")
