import json

from pand.cli import main

KEYS = ("student_only_ms", "online_teacher_ms", "cached_teacher_ms", "pand_cached_ms", "ratio_online_vs_student",
        "ratio_cached_vs_student", "kd_cached_ms", "dkd_cached_ms", "ratio_kd_cached_vs_student")


def test_bench_json_has_every_figure_and_the_configuration(capsys):
    code = main(["bench", "--teacher", "pand-tiny-vit", "--student", "resnet18", "--image-size", "32", "--batch", "4",
                 "--classes", "5", "--steps", "2", "--warmup", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in KEYS:
        assert result[key] > 0, key
    assert result["ratio_cached_vs_student"] == round(result["cached_teacher_ms"] / result["student_only_ms"], 3)
    cfg = result["config"]
    assert cfg["teacher"] == "pand-tiny-vit" and cfg["image_size"] == 32 and cfg["batch"] == 4
    assert cfg["device"] == "cpu" and cfg["threads"] >= 1 and cfg["teacher_image_size"] == 32


def test_integrity_benchmark_prints_every_row():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "integrity_checks.py"
    out = subprocess.run([sys.executable, str(script), "--images", "4", "--cache-images", "16", "--views", "2",
                          "--dim", "8"], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 1 + 10 and "pand's atomic save" in out and "verify again" in out


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
