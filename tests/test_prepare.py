"""The Ray Data prepare pipeline: the Parquet contract, rejections, folds, manifest, idempotence and
atomic rebuilds. One Ray pipeline run (module fixture) feeds most tests; the rest are Ray-free."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fers_dist.cli import main as cli_main
from fers_dist.data import prepare as prep
from fers_dist.data.align import AlignBatch, align_serial, truncation
from fers_dist.data.layouts import DATASETS, ckplus, mmi
from fers_dist.data.synthetic import synthesize
from fers_dist.errors import DataError, FersError

SIZE = 40


def add_quirks(root: Path) -> dict[str, str]:
    """Real-world damage in a synthetic CK+ tree; returns {relative path: expected reason fragment}."""
    emotions = sorted((root / "Emotion").rglob("*_emotion.txt"))
    frame = lambda emo, k: sorted(
        (root / "cohn-kanade-images" / emo.parent.parent.name / emo.parent.name).glob("*.png"))[k]
    rel = lambda p: p.relative_to(root).as_posix()
    corrupt, truncated, empty, dup, dup_of = frame(emotions[0], -1), frame(emotions[1], -1), \
        frame(emotions[2], -1), frame(emotions[3], -2), frame(emotions[3], -3)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8 + b"IEND\xaeB`\x82")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    shutil.copyfile(dup_of, dup)
    emotions[4].write_text("not a number")
    # a subject with a single labelled image (a different picture, so not a duplicate)
    src = frame(emotions[5], -1)
    img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    img[0, 0] ^= 0xFF
    lone = root / "cohn-kanade-images" / "S900" / "001" / "S900_001_00000001.png"
    lone.parent.mkdir(parents=True)
    cv2.imwrite(str(lone), img)
    lm_src = root / "Landmarks" / src.parent.parent.name / src.parent.name / f"{src.stem}_landmarks.txt"
    (root / "Landmarks" / "S900" / "001").mkdir(parents=True)
    shutil.copyfile(lm_src, root / "Landmarks" / "S900" / "001" / "S900_001_00000001_landmarks.txt")
    (root / "Emotion" / "S900" / "001").mkdir(parents=True)
    (root / "Emotion" / "S900" / "001" / "S900_001_00000001_emotion.txt").write_text("   5.0000000e+00\n")
    return {rel(corrupt): "cannot decode image", rel(truncated): "truncated PNG", rel(empty): "empty file",
            rel(dup): f"duplicate frame: same image content as {rel(dup_of)}",
            rel(emotions[4]): "cannot parse emotion label"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session):
    base = tmp_path_factory.mktemp("prep")
    raw = base / "raw" / "ckplus"
    synthesize("ckplus", raw, 12, seed=2, size=128, progress=False)
    quirks = add_quirks(raw)
    manifest = prep.prepare("ckplus", raw, base / "data", size=SIZE, n_folds=5, fold_seed=3, log=lambda *_: None)
    return {"raw": raw, "out": base / "data", "quirks": quirks, "manifest": manifest,
            "faces": pq.read_table(base / "data" / "ckplus" / "faces.parquet")}


@pytest.mark.ray
def test_parquet_contract(built):
    faces = built["faces"]
    assert faces.schema.equals(pa.schema([
        ("image", pa.binary()), ("path", pa.string()), ("dataset", pa.string()), ("subject", pa.string()),
        ("sequence", pa.string()), ("frame", pa.int32()), ("label", pa.int8()), ("label_name", pa.string()),
        ("fold", pa.int8())]))
    assert len(pq.ParquetFile(built["out"] / "ckplus" / "faces.parquet").schema_arrow) == 9  # one file
    rows = faces.drop_columns(["image"]).to_pylist()
    names = DATASETS["ckplus"].class_names
    assert all(names[r["label"]] == r["label_name"] and r["dataset"] == "ckplus" for r in rows)
    assert all((built["raw"] / r["path"]).is_file() and not Path(r["path"]).is_absolute() for r in rows)
    assert all(0 <= r["fold"] < 5 for r in rows)
    keys = [(r["subject"], r["sequence"], r["frame"], r["path"]) for r in rows]
    assert keys == sorted(keys)
    for blob in faces["image"].to_pylist()[:20]:
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8


@pytest.mark.ray
def test_every_bad_file_is_a_reported_rejection(built):
    m, faces = built["manifest"], built["faces"]
    why = {r["path"]: r["reason"] for r in m["rejected"]}
    for path, fragment in built["quirks"].items():
        assert fragment in why[path], (path, why.get(path))
    assert set(why).isdisjoint(faces["path"].to_pylist())
    table = pq.read_table(built["out"] / "ckplus" / "rejected.parquet").to_pylist()
    assert {r["path"]: r["reason"] for r in table} == why and m["n_rejected"] == len(why)
    n_read = len(ckplus.read(built["raw"]).records)
    assert faces.num_rows == n_read - 2  # the corrupt and the truncated frame fail in the pipeline


@pytest.mark.ray
def test_folds_are_identity_independent_and_stored(built):
    faces, m = built["faces"], built["manifest"]
    fold_of: dict[str, set] = {}
    for s, f in zip(faces["subject"].to_pylist(), faces["fold"].to_pylist()):
        fold_of.setdefault(s, set()).add(f)
    assert all(len(f) == 1 for f in fold_of.values())
    assert {s: f.pop() for s, f in fold_of.items()} == m["subject_folds"]
    for k in range(5):
        test = {s for s, f in m["subject_folds"].items() if f == k}
        train = set(m["subject_folds"]) - test
        assert test and train and not test & train


@pytest.mark.ray
def test_manifest(built):
    m = built["manifest"]
    assert m["status"] == "built" and m["dataset"] == "ckplus" and len(m["class_names"]) == 7
    assert m["n_images"] == built["faces"].num_rows == sum(m["counts_per_class"].values())
    assert m["n_subjects"] == 13 == len(m["counts_per_subject"])
    assert m["single_image_subjects"] == ["S900"] and m["counts_per_subject"]["S900"] == 1
    assert (m["aligner"], m["size"], m["n_folds"], m["fold_seed"]) == ("landmarks", SIZE, 5, 3)
    assert m["skipped"]["unlabelled sequences (no Emotion file)"] > 0
    assert m["table1"]["paper_images"] == 981 and m["table1"]["paper_sequences"] == 327
    assert len(m["content_hash"]) == 64 and m["created"]
    assert m["pipeline_compute"] == "tasks"  # landmarks: nothing to load, so warm task workers
    on_disk = json.loads((built["out"] / "ckplus" / "manifest.json").read_text())
    assert on_disk["content_hash"] == m["content_hash"] and "status" not in on_disk


@pytest.mark.ray
def test_unchanged_input_is_a_noop_and_changes_change_the_hash(built, tmp_path):
    parquet = built["out"] / "ckplus" / "faces.parquet"
    before = parquet.stat().st_mtime_ns
    again = prep.prepare("ckplus", built["raw"], built["out"], size=SIZE, n_folds=5, fold_seed=3,
                         log=lambda *_: None)
    assert again["status"] == "up-to-date" and parquet.stat().st_mtime_ns == before
    raw = tmp_path / "ck"
    shutil.copytree(built["raw"], raw)
    opts = {"aligner": "landmarks", "size": SIZE}
    h0 = prep.content_hash("ckplus", ckplus.read(raw), opts)
    assert prep.content_hash("ckplus", ckplus.read(raw), opts) == h0
    assert prep.content_hash("ckplus", ckplus.read(raw), {**opts, "size": 41}) != h0
    emo = max((raw / "Emotion").rglob("*_emotion.txt"))
    emo.write_text("   1.0000000e+00\n" if "2.0" in emo.read_text() else "   2.0000000e+00\n")
    assert prep.content_hash("ckplus", ckplus.read(raw), opts) != h0


@pytest.mark.ray
def test_force_rebuilds_and_a_failed_build_keeps_the_previous_dataset(built, tmp_path, monkeypatch):
    out = tmp_path / "data"
    shutil.copytree(built["out"], out)
    table = prep.input_table(ckplus.read(built["raw"]).records, built["raw"])
    aligned = align_serial(table, "landmarks", SIZE)  # stands in for the Ray run: same rows
    monkeypatch.setattr(prep, "align_with_ray", lambda *a, **k: aligned)
    kw = {"size": SIZE, "n_folds": 5, "fold_seed": 3, "log": lambda *_: None}
    (out / ".ckplus.old-dead").mkdir()  # leftovers of an interrupted earlier build
    (out / ".ckplus.tmp-dead").mkdir()
    os.utime(out / ".ckplus.tmp-dead", (1e9, 1e9))
    rebuilt = prep.prepare("ckplus", built["raw"], out, force=True, **kw)
    assert rebuilt["status"] == "built"
    assert pq.read_table(out / "ckplus" / "faces.parquet").equals(built["faces"])
    assert sorted(p.name for p in out.iterdir()) == ["ckplus"]
    before = (out / "ckplus" / "faces.parquet").read_bytes()

    def dies_half_way(folder, faces, rejected, manifest):
        folder.mkdir(parents=True)
        (folder / "faces.parquet").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(prep, "_write_dataset", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        prep.prepare("ckplus", built["raw"], out, force=True, **kw)
    assert (out / "ckplus" / "faces.parquet").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["ckplus"]  # no temporary folder left behind


def test_align_batch_decodes_video_frames_and_image_frames(tmp_path):
    synthesize("mmi", tmp_path / "mmi", 2, size=96, progress=False)
    res = mmi.read(tmp_path / "mmi")
    out = align_serial(prep.input_table(res.records, tmp_path / "mmi"), "center", 32, batch_size=7)
    assert out["reason"].to_pylist() == [""] * len(res.records)
    assert any("#" in p for p in out["path"].to_pylist()) and any("#" not in p for p in out["path"].to_pylist())
    faces, rejected, folds = prep.consolidate(out, "mmi", n_folds=2, seed=0)
    assert faces.num_rows == len(res.records) and not rejected and set(folds.values()) == {0, 1}


@pytest.mark.ray
def test_tasks_and_actor_pool_give_the_serial_loops_faces(built, ray_session):
    """Both Ray Data compute modes align every record exactly as the single-process loop does,
    rejections included; the actor pool is what fan/dlib and GPU runs use."""
    res = ckplus.read(built["raw"])
    table = prep.input_table(res.records, built["raw"])
    serial = align_serial(table, "landmarks", SIZE)
    key = lambda t: sorted(zip(t["path"].to_pylist(), t["image"].to_pylist(), t["reason"].to_pylist()))
    for compute in ("tasks", "actors"):
        out = prep.align_with_ray(table, "landmarks", SIZE, batch_size=16, compute=compute)
        assert out.num_rows == table.num_rows and key(out) == key(serial), compute
    assert any(r for r in serial["reason"].to_pylist())  # the quirks are rejected the same way


def test_compute_auto_picks_actors_for_models_and_gpus():
    assert prep.resolve_compute("auto", "landmarks", None) == prep.resolve_compute("auto", "center", None) == "tasks"
    assert prep.resolve_compute("auto", "dlib", None) == prep.resolve_compute("auto", "fan", None) == "actors"
    assert prep.resolve_compute("auto", "landmarks", 0.5) == "actors"
    assert prep.resolve_compute("tasks", "dlib", None) == "tasks"
    with pytest.raises(FersError, match="--compute: expected one of auto, tasks, actors, got 'threads'"):
        prep.resolve_compute("threads", "landmarks", None)


def test_truncation_and_missing_landmarks_become_reasons(tmp_path):
    ok, jpg = cv2.imencode(".jpg", np.full((20, 20, 3), 90, np.uint8))
    assert ok
    assert truncation(jpg.tobytes()) is None
    assert "truncated JPEG" in truncation(jpg.tobytes()[:-40])
    _ok, png = cv2.imencode(".png", np.zeros((20, 20), np.uint8))
    assert truncation(png.tobytes()) is None and "truncated PNG" in truncation(png.tobytes()[:-20])
    (tmp_path / "f.png").write_bytes(png.tobytes())
    table = pa.table({"src": [str(tmp_path / "f.png"), str(tmp_path / "gone.png")], "video_frame": [-1, -1],
                      "landmarks": [b"", b""], "path": ["f.png", "gone.png"], "dataset": ["x"] * 2,
                      "subject": ["a"] * 2, "sequence": ["s"] * 2, "frame": [1, 2], "label": [0, 0],
                      "label_name": ["anger"] * 2}, schema=prep._schemas()[0])
    out = AlignBatch("landmarks", 16)(table)
    reasons = out["reason"].to_pylist()
    assert "no landmarks" in reasons[0] and "FileNotFoundError" in reasons[1]
    with pytest.raises(DataError, match="no face could be aligned"):
        prep.consolidate(out, "x", 2, 0)


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "CK+" / "cohn-kanade-images").mkdir(parents=True)
    rc = cli_main(["prepare", "--dataset", "ckplus", "--root", str(tmp_path), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"did you mean {tmp_path / 'CK+'} ?" in err
    rc = cli_main(["prepare", "--dataset", "ckplus", "--root", str(tmp_path / "CK+"), "--out", str(tmp_path / "d")])
    assert rc == 2 and "no labelled ckplus faces" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_fers_prepare_cli_on_mmi_then_bench(tmp_path, ray_session, capsys):
    synthesize("mmi", tmp_path / "raw", 3, size=96, progress=False)
    rc = cli_main(["prepare", "--dataset", "mmi", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "d"),
                   "--aligner", "center", "--size", "32", "--n-folds", "3"])
    assert rc == 0
    faces = pq.read_table(tmp_path / "d" / "mmi" / "faces.parquet")
    assert faces.num_rows == 3 * 6 * 3 and set(faces["fold"].to_pylist()) == {0, 1, 2}
    from fers_dist.data import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    result = bench.bench(p.parse_args(["--images", "40", "--image-size", "128", "--batch-size", "8",
                                       "--repeats", "2"]))
    assert result["images"] == 40 and result["serial_images_per_s"] > 0 and result["ray_images_per_s"] > 0
    def ratio_of_rounded(serial_s, ray_s, speedup):  # the times are rounded to 0.01 s in the JSON
        return (serial_s - 0.005) / (ray_s + 0.005) - 0.005 <= speedup <= (serial_s + 0.005) / (ray_s - 0.005) + 0.005

    assert ratio_of_rounded(result["serial_s"], result["ray_s"], result["speedup"])
    assert result["compute"] == "tasks" and len(result["ray_runs_s"]) == 2
    assert ratio_of_rounded(result["serial_runs_s"][0], result["ray_runs_s"][0], result["speedup_first_run"])
    if os.path.exists("/proc/stat"):  # where the CPU went: the loop in the driver, the faces in Ray workers
        # A map task shorter than the sampling interval is only ever seen as an idle worker, so its CPU lands
        # in ray_workers_other rather than map_workers; either way it is off the driver.
        workers = result["ray_cpu_s"][0].get("map_workers", 0) + result["ray_cpu_s"][0].get("ray_workers_other", 0)
        assert result["serial_cpu_s"][0]["driver"] > 0 and workers > 0
    # Several sizes: one entry per size, and the fitted break-even sizes.
    plot = tmp_path / "scaling.png"
    sweep = bench.bench(p.parse_args(["--images", "40", "16", "--image-size", "128", "--batch-size", "8",
                                      "--repeats", "1", "--plot", str(plot)]))
    assert [r["images"] for r in sweep["sizes"]] == [16, 40]
    assert {"ray_fixed_s", "ray_ms_per_image", "serial_ms_per_image", "images_for_1.5x"} <= set(sweep["fit"])
    from fers_dist.data.bench import SCALING_SIZE
    from fers_dist.plotting import png_size

    assert png_size(plot) == SCALING_SIZE


def test_bench_prepare_break_even_fit():
    from fers_dist.data.bench import break_even

    # serial 3 ms/face; Ray 2 s fixed + 1.5 ms/face: 1.5x at 1.5*2/(0.003-0.00225) = 4,000 faces, never 2x.
    fit = break_even([1000, 2000, 4000], [3.0, 6.0, 12.0], [3.5, 5.0, 8.0])
    assert fit["ray_fixed_s"] == pytest.approx(2.0) and fit["ray_ms_per_image"] == pytest.approx(1.5)
    assert fit["images_for_1.5x"] == 4000 and fit["images_for_2x"] is None and fit["speedup_unlimited"] == 2.0
    assert break_even([1000, 2000], [3.0, 6.0], [3.5, 6.5])["images_for_1.5x"] is None  # no faster per face


def test_bench_prepare_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv, says in ((["--images", "0"], "--images must be positive"), (["--repeats", "0"], "--repeats must be"),
                       (["--plot", str(tmp_path / "p.png")], "--plot needs at least two --images sizes")):
        assert cli_main(["bench", "prepare", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and err.count("\n") == 0
