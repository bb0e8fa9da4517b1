import json

from pand.cli import main

KEYS = ("student_only_ms", "online_teacher_ms", "cached_teacher_ms", "pand_cached_ms", "ratio_online_vs_student",
        "ratio_cached_vs_student")


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
