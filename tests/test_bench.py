import json

import pytest
import torch

from pand.cli import main

KEYS = ("student_only_ms", "student_unfused_optimizer_ms", "online_teacher_ms", "cached_teacher_ms", "pand_cached_ms", "ratio_online_vs_student",
        "ratio_cached_vs_student", "kd_cached_ms", "dkd_cached_ms", "ratio_kd_cached_vs_student")


def test_bench_json_has_every_figure_and_the_configuration(capsys):
    code = main(["bench", "--teacher", "pand-tiny-vit", "--student", "resnet18", "--image-size", "32", "--batch", "4",
                 "--classes", "5", "--steps", "2", "--warmup", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in KEYS:
        assert result[key] > 0, key
    # the ratio is of the unrounded times; the printed ms are rounded to 0.01, so compare to that precision
    ratio = result["cached_teacher_ms"] / result["student_only_ms"]
    assert abs(result["ratio_cached_vs_student"] - ratio) <= 1e-3 + ratio * 0.01 / result["student_only_ms"]
    cfg = result["config"]
    assert cfg["teacher"] == "pand-tiny-vit" and cfg["image_size"] == 32 and cfg["batch"] == 4
    assert cfg["device"] == "cpu" and cfg["threads"] >= 1 and cfg["teacher_image_size"] == 32


def test_integrity_benchmark_prints_every_row():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "integrity_checks.py"
    out = subprocess.run([sys.executable, str(script), "--images", "4", "--cache-images", "16", "--views", "2",
                          "--dim", "8", "--decoded-images", "8"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 1 + 20 and "pand's atomic save" in out and "verify again" in out
    assert "1 shards of 16 rows: as used" in out  # the open time as the same rows come in more shards
    assert "content digests again" in out and "DecodedImageCache.open" in out and "run folder's lock" in out


def test_bench_zoo_rows_time_every_method_live_and_the_logit_methods_cached(capsys):
    code = main(["bench", "--teacher", "pand-tiny-vit", "--student", "resnet18", "--image-size", "32", "--batch", "4",
                 "--classes", "5", "--steps", "1", "--warmup", "1", "--zoo", "--zoo-teacher", "test_resnet", "--json"])
    assert code == 0
    zoo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["zoo"]
    for row in ("kd", "kd_ls", "dkd", "ofa", "nrkd", "nrkd_response", "pat"):
        assert zoo[f"{row}_live_ms"] > 0 and zoo[f"ratio_{row}_live_vs_student"] > 0, row
    for row in ("kd", "kd_ls", "dkd", "ofa", "nrkd_response"):
        assert zoo[f"{row}_cached_ms"] > 0, row
    assert "nrkd_cached_ms" not in zoo and "pat_cached_ms" not in zoo


# At its own 32 px pand-tiny-vit (3.9 MFLOPs per image) is cheaper than ResNet-18 even at 16 px (31.1); at 128 px
# (257 tokens) the counter gives it 90.6 MFLOPs against 74.0 for ResNet-18 at 32 px, so the test can tell them apart.
LATENCY_STUDENT, LATENCY_SIDE, LATENCY_TEACHER_SIDE = "resnet18", 32, 128


def _within_rounding(images_per_s: float, batch: int, ms: float) -> bool:
    # ms is rounded to 3 decimals and images/s to 1: the exact value lies between these bounds.
    return batch * 1000 / (ms + 5e-4) - 0.05 <= images_per_s <= batch * 1000 / (ms - 5e-4) + 0.05


def test_bench_latency_times_student_and_teacher_at_each_batch_size(capsys, monkeypatch):
    from pand.bench.measure import print_result
    from pand.students import build_student
    from pand.teachers import load_clip_teacher

    code = main(["bench", "--latency", "--teacher", "pand-tiny-vit", "--teacher-image-size", str(LATENCY_TEACHER_SIDE),
                 "--student", LATENCY_STUDENT, "--image-size", str(LATENCY_SIDE), "--classes", "5", "--steps", "2",
                 "--warmup", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "student_only_ms" not in result and "zoo" not in result, "--latency alone runs only the latency part"
    lat = result["latency"]
    assert lat["batches"] == [1, 32]
    assert lat["student"]["name"] == LATENCY_STUDENT and lat["teacher"]["name"] == "pand-tiny-vit"
    assert lat["student"]["image_size"] == LATENCY_SIDE and lat["teacher"]["image_size"] == LATENCY_TEACHER_SIDE
    for role in ("student", "teacher"):
        for batch in (1, 32):
            row = lat[role]["per_batch"][str(batch)]
            assert row["ms"] > 0, (role, batch)
            assert _within_rounding(row["images_per_s"], batch, row["ms"]), (role, batch, row)
        assert lat[role]["flops_per_image"] > 0
    for batch in (1, 32):
        t, s = (lat[role]["per_batch"][str(batch)]["ms"] for role in ("teacher", "student"))
        ratio = lat["ratio_teacher_vs_student"][str(batch)]
        # the ratio comes from the unrounded medians and is rounded to 3 decimals
        assert (t - 5e-4) / (s + 5e-4) - 5e-4 <= ratio <= (t + 5e-4) / (s - 5e-4) + 5e-4
    student = build_student(LATENCY_STUDENT, 5, pretrained=False, image_size=LATENCY_SIDE)
    teacher = load_clip_teacher("pand-tiny-vit", "random", image_size=LATENCY_TEACHER_SIDE)
    assert lat["student"]["params"] == sum(p.numel() for p in student.parameters())
    assert lat["teacher"]["params"] == sum(p.numel() for p in teacher.model.visual.parameters())
    assert lat["teacher"]["params_with_text_tower"] == sum(p.numel() for p in teacher.model.parameters())
    assert lat["teacher"]["flops_per_image"] > lat["student"]["flops_per_image"]

    # the student as it ships: exported, quantized and timed in the run, next to PyTorch with the same threads
    ex = lat["exported"]
    assert ex["batches"] == [1, 32] and ex["repeats"] == 2 and ex["threads"] == torch.get_num_threads()
    assert list(ex["models"]) == ["PyTorch eager float32", "ONNX Runtime float32", "ONNX Runtime int8"]
    for name, m in ex["models"].items():
        for batch in ("1", "32"):
            assert m["ms"][batch] > 0 and _within_rounding(m["images_per_s"][batch], int(batch), m["ms"][batch])
        assert m["megabytes"] > 0
    assert ex["models"]["PyTorch eager float32"]["speedup"] == {"1": 1.0, "32": 1.0}
    floats, int8 = (ex["models"][f"ONNX Runtime {k}"]["megabytes"] for k in ("float32", "int8"))
    assert int8 < floats / 2  # int8 weights: a quarter of the float ones, plus scales and zero points
    assert ex["int8"]["int8_mac_share"] == 1.0 and isinstance(ex["isa"], list)

    monkeypatch.setenv("COLUMNS", "250")
    print_result(result)
    printed = capsys.readouterr().out
    assert f"student: {LATENCY_STUDENT}" in printed and "teacher: pand-tiny-vit" in printed
    assert "teacher / student" in printed and "ms, batch 32" in printed and "training step" not in printed
    assert "the student as it ships" in printed and "ONNX Runtime int8" in printed and "vs PyTorch" in printed


def test_instruction_sets_are_read_from_the_cpu_flags(tmp_path):
    from pand.bench.exported import instruction_sets

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni amx_int8\nprocessor : 1\n"
                    "flags : fpu sse avx2 avx512f avx512_vnni amx_int8\n")
    assert instruction_sets(info) == ["avx2", "avx512f", "avx512_vnni", "amx_int8"]
    assert instruction_sets(tmp_path / "missing") == []


def test_latency_flops_of_the_tiny_vit_teacher_count_every_product():
    import torch

    from pand.bench.measure import _forward_flops
    from pand.teachers import load_clip_teacher

    # On CPU torch's plain counter misses the attention blocks (MHA fast path, CPU attention kernel) and gives 2/3 of
    # this. pand-tiny-vit: 8 px patches, width 64, 2 layers, MLP 4x, embedding 32 (model_configs/pand-tiny-vit.json).
    side, patch, width, layers, embed = 32, 8, 64, 2, 32
    patches = (side // patch) ** 2
    tokens = patches + 1
    per_layer = 2 * tokens * width * (3 * width + width + 2 * 4 * width) + 2 * 2 * tokens * tokens * width
    expected = 2 * patches * 3 * patch * patch * width + layers * per_layer + 2 * width * embed
    teacher = load_clip_teacher("pand-tiny-vit", "random", image_size=side)
    with torch.inference_mode():
        assert _forward_flops(teacher.encode_images, torch.randn(1, 3, side, side)) == expected


def test_bench_loader_reports_each_view_path_next_to_the_student(capsys):
    code = main(["bench", "--teacher", "pand-tiny-vit", "--student", "resnet18", "--image-size", "32", "--batch", "4",
                 "--classes", "5", "--steps", "1", "--warmup", "1", "--loader", "--loader-images", "8",
                 "--loader-workers", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loader = result["loader"]
    assert loader["image_size"] == 32 and loader["batch_size"] == 4
    assert [(r["mode"], r["workers"]) for r in loader["rows"]] == [("load", 0), ("augment", 0), ("device", 0)]
    assert all(r[f"{source}_img_per_s"] > 0 for r in loader["rows"] for source in ("jpeg", "shard", "cache"))
    # the same JPEGs from a folder and from tar shards, per core, side by side
    assert [(r["mode"], r["cores"]) for r in loader["shards"]["rows"]] == [("load", 1), ("augment", 1), ("device", 1)]
    assert all(r["shard_vs_folder"] > 0 for r in loader["shards"]["rows"]) and loader["shards"]["shards"] == 1
    assert loader["device_augment"]["device"] == "cpu" and loader["device_augment"]["img_per_s"] > 0
    # the student's rate is the training table's student-alone step of the same run
    assert abs(loader["student_train_img_per_s"] - 4000 / result["student_only_ms"]) <= 0.1 + 1e-3 * 4000 / (
        result["student_only_ms"] - 0.005)
    paths = {(e["augment_on"], e["source"]) for e in loader["estimates"]}
    assert paths == {("cpu", "jpeg"), ("cpu", "cache"), ("device", "jpeg"), ("device", "cache")}
    for e in loader["estimates"]:
        assert e["run_img_per_s"] == min(e["loader_img_per_s"], e["device_side_img_per_s"])
        assert e["limited_by"] == "loader" if e["loader_img_per_s"] < e["device_side_img_per_s"] else \
            e["limited_by"].startswith("student step")
        if e["augment_on"] == "device":  # the batched augmentation shares the device with the training step
            # (<=: both are rounded to 0.1 image/s, and a slow student makes the two equal after rounding)
            assert e["device_side_img_per_s"] <= loader["student_train_img_per_s"]


def test_loader_estimates_name_the_slower_side():
    from pand.bench.loader import run_estimates

    loader = {"rows": [{"mode": "augment", "workers": 8, "jpeg_img_per_s": 900.0, "cache_img_per_s": 1500.0},
                       {"mode": "device", "workers": 8, "jpeg_img_per_s": 2500.0, "cache_img_per_s": 20000.0}],
              "device_augment": {"img_per_s": 12000.0}}
    rows = {(e["augment_on"], e["source"]): e for e in run_estimates(loader, student_img_per_s=4000.0)}
    assert rows["cpu", "jpeg"]["run_img_per_s"] == 900.0 and rows["cpu", "jpeg"]["limited_by"] == "loader"
    assert rows["device", "cache"]["device_side_img_per_s"] == 3000.0  # 1 / (1/4000 + 1/12000)
    assert rows["device", "cache"]["limited_by"] == "student step + views"
    assert rows["device", "jpeg"]["run_img_per_s"] == 2500.0 and rows["device", "jpeg"]["limited_by"] == "loader"


def test_bench_loader_with_latency_times_the_student_step_itself(capsys):
    code = main(["bench", "--teacher", "pand-tiny-vit", "--student", "resnet18", "--image-size", "32", "--batch", "4",
                 "--classes", "5", "--steps", "1", "--warmup", "1", "--latency", "--latency-batches", "1", "--loader",
                 "--loader-images", "4", "--loader-workers", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "student_only_ms" not in result and result["loader"]["student_train_img_per_s"] > 0
    assert {e["augment_on"] for e in result["loader"]["estimates"]} == {"cpu", "device"}


def test_bench_refuses_values_out_of_range_and_a_missing_device_before_measuring(capsys, monkeypatch):
    import torch

    monkeypatch.setattr("pand.bench.measure.run_bench", lambda args: (_ for _ in ()).throw(AssertionError("measured")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = {
        ("--batch", "0"): "invalid option: --batch=0 is not allowed: expected an integer >= 1",
        ("--warmup", "-1"): "invalid option: --warmup=-1 is not allowed: expected an integer >= 0",
        ("--threads", "0"): "invalid option: --threads=0 is not allowed: expected an integer >= 1",
        ("--teacher-image-size", "0"): "invalid option: --teacher-image-size=0 is not allowed: expected an "
                                       "integer >= 1",
        ("--device", "tpu"): "invalid option: --device='tpu' is not allowed: expected auto, cpu, cuda, cuda:N or mps",
        ("--device", "cuda:1"): "invalid option: --device='cuda:1' is not available: this machine has no CUDA GPU",
        ("--loader", "--image-size", "1"): "invalid option: --image-size=1 is too small for --loader",
        ("--steps", "0", "--loader-workers", "-2"): "2 invalid options:\n  --steps=0 is not allowed: expected an "
                                                    "integer >= 1\n  --loader-workers=-2 is not allowed",
    }
    for argv, message in cases.items():
        assert main(["bench", *argv]) == 2
        assert capsys.readouterr().err.startswith(f"pand bench: error: {message}"), argv


def test_bench_parallel_times_one_process_against_one_per_core(capsys, monkeypatch):
    from pand.bench import measure

    monkeypatch.setattr(measure, "available_cores", lambda: 2)  # two workers whatever this machine has
    code = main(["bench", "--latency", "--parallel", "--teacher", "pand-tiny-vit", "--student", "resnet18",
                 "--image-size", "16", "--batch", "2", "--steps", "1", "--warmup", "0", "--latency-batches", "1",
                 "--json"])
    assert code == 0
    par = json.loads(capsys.readouterr().out)["parallel"]
    assert (par["cores"], par["workers"], par["threads_per_worker"]) == (2, 2, 1)
    assert len(par["per_worker_img_per_s"]) == 2 and all(v > 0 for v in par["per_worker_img_per_s"])
    assert par["side_by_side_img_per_s"] == pytest.approx(sum(par["per_worker_img_per_s"]), abs=0.2)
    assert par["speedup"] == pytest.approx(par["side_by_side_img_per_s"] / par["one_process_img_per_s"], rel=0.1)


def test_the_timed_steps_use_the_optimizer_pand_train_builds():
    from contextlib import nullcontext

    import torch

    from pand.bench.measure import _student_step

    step = _student_step("resnet18", 3, 32, torch.device("cpu"), nullcontext, False)
    assert isinstance(step.optimizer, torch.optim.AdamW) and step.optimizer.defaults["fused"] is True
