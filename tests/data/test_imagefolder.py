"""Image-folder datasets: sorted class folders, class_names_file, optional val folder."""

from __future__ import annotations

from collections import Counter

import pytest

from pand.data import get_dataset
from pand.errors import ConfigError, DatasetNotFoundError, PandError
from tests.fixtures.datasets import make_imagefolder, write_image


def test_classes_and_carved_val(tmp_path):
    make_imagefolder(tmp_path, classes=("red_square", "001.green_circle", "blue_triangle"), per_class=5)
    tr = get_dataset("imagefolder", tmp_path, "train", val_fraction=0.2)
    va = get_dataset("imagefolder", tmp_path, "val", val_fraction=0.2)
    te = get_dataset("imagefolder", tmp_path, "test")
    # sorted folder order, underscores to spaces, prefixes kept
    assert tr.classes == ["001.green circle", "blue triangle", "red square"]
    assert len(tr) + len(va) == 15 and Counter(va.targets) == {0: 1, 1: 1, 2: 1}
    assert len(te) == 6
    for ds in (tr, va, te):
        for i in range(len(ds)):
            folder = ds.sample_id(i).split("/")[1]
            assert ds.classes[ds.targets[i]] == folder.replace("_", " ")


def test_official_val_folder(tmp_path):
    make_imagefolder(tmp_path, per_class=4, val_per_class=2)
    tr = get_dataset("imagefolder", tmp_path, "train")
    va = get_dataset("imagefolder", tmp_path, "val")
    assert len(tr) == 12 and len(va) == 6
    assert all(va.sample_id(i).startswith("val/") for i in range(len(va)))


def test_extensions_and_non_images(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), per_class=1, test_per_class=1)
    write_image(tmp_path / "train" / "a" / "x.PNG", 0, 2)
    write_image(tmp_path / "train" / "b" / "y.webp", 1, 2)
    write_image(tmp_path / "train" / "b" / "z.bmp", 1, 2)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    ds = get_dataset("imagefolder", tmp_path, "train", val_fraction=0.0)
    assert len(ds) == 5
    assert all(ds.load_image(i).mode == "RGB" for i in range(len(ds)))


@pytest.mark.parametrize("style", ["positional", "tab", "comma"])
def test_class_names_file(tmp_path, style):
    make_imagefolder(tmp_path, classes=("red_square", "green_circle", "blue_triangle"))
    f = tmp_path / "names.txt"
    if style == "positional":  # sorted folder order: blue_triangle, green_circle, red_square
        f.write_text("a blue triangle\na green circle\na red square\n")
    elif style == "tab":
        f.write_text("red_square\ta red square\nblue_triangle\ta blue triangle\ngreen_circle\ta green circle\n")
    else:
        f.write_text("green_circle,a green circle\nred_square, a red square\nblue_triangle,a blue triangle\n")
    ds = get_dataset("imagefolder", tmp_path, "test", class_names_file=f)
    assert ds.classes == ["a blue triangle", "a green circle", "a red square"]


def test_class_names_file_wrong_length(tmp_path):
    make_imagefolder(tmp_path)
    f = tmp_path / "names.txt"
    f.write_text("one\ntwo\n")
    with pytest.raises(ConfigError, match="2 names but there are 3"):
        get_dataset("imagefolder", tmp_path, "train", class_names_file=f)
    with pytest.raises(DatasetNotFoundError, match="nope.txt"):
        get_dataset("imagefolder", tmp_path, "train", class_names_file=tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="imagefolder"):
        get_dataset("cub", tmp_path, "train", class_names_file=f)


def test_test_class_not_in_train(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"))
    write_image(tmp_path / "test" / "c" / "x.jpg", 0, 2)
    with pytest.raises(ConfigError, match="c"):
        get_dataset("imagefolder", tmp_path, "test")


def test_missing_folders(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("imagefolder", tmp_path, "train")
    assert str(tmp_path / "train") in str(e.value) and "test/<class_a>" in str(e.value)
    make_imagefolder(tmp_path, test_per_class=0)
    with pytest.raises(DatasetNotFoundError, match="test"):
        get_dataset("imagefolder", tmp_path, "test")


@pytest.mark.parametrize("style", ["positional", "tab"])
def test_class_names_file_duplicate_display_name(tmp_path, style):
    make_imagefolder(tmp_path, classes=("red_square", "green_circle", "blue_triangle"))
    f = tmp_path / "names.txt"
    if style == "positional":  # sorted folder order: blue_triangle, green_circle, red_square
        f.write_text("# display names\na shape\nGreen circle\nA  shape\n")
    else:
        f.write_text("red_square\tA shape\nblue_triangle\ta shape\ngreen_circle\tgreen\n")
    with pytest.raises(ConfigError) as e:
        get_dataset("imagefolder", tmp_path, "train", class_names_file=f)
    line, first, name = (4, 2, "A  shape") if style == "positional" else (2, 1, "a shape")
    assert str(e.value) == (
        f"line {line} of {f}: display name {name!r} is already used at line {first}; every class needs its own name"
    )


def test_class_names_file_folder_named_twice(tmp_path):
    make_imagefolder(tmp_path, classes=("red_square", "green_circle", "blue_triangle"))
    f = tmp_path / "names.txt"
    f.write_text("red_square,a red square\nblue_triangle,a blue triangle\nred_square,a crimson square\n")
    with pytest.raises(ConfigError) as e:
        get_dataset("imagefolder", tmp_path, "train", class_names_file=f)
    assert str(e.value) == f"line 3 of {f}: class folder 'red_square' is already named at line 1"


# -- nothing silently empty: image files pand does not read are named, not dropped -----------------------------------


def _save(path, fmt="GIF"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format=fmt)
    return path


def test_a_class_with_no_usable_training_image_is_named_with_what_it_holds(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), per_class=2, test_per_class=1)
    for i in range(12):
        _save(tmp_path / "train" / "cat" / f"{i:02d}.gif")
    for i in range(3):
        _save(tmp_path / "train" / "cat" / "deep" / f"{i}.tif", "TIFF")
    with pytest.raises(PandError) as e:
        get_dataset("imagefolder", tmp_path, "val")  # carved from train
    assert str(e.value) == (f"class 'cat' ({tmp_path / 'train' / 'cat'}) has no usable image: it holds 12 .gif, 3 .tif "
                            "files; pand reads .jpg .jpeg .png .bmp .webp")
    (tmp_path / "train" / "empty").mkdir()
    for f in (tmp_path / "train" / "cat").rglob("*.*"):
        f.unlink()
    with pytest.raises(PandError, match=r"^class 'cat' \(.*\) has no usable image: it holds no file; pand reads"):
        get_dataset("imagefolder", tmp_path, "train")


def test_the_display_name_is_the_one_named(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b_c"), per_class=1, test_per_class=1)
    for f in (tmp_path / "train" / "b_c").iterdir():
        f.rename(f.with_suffix(".txt"))
    with pytest.raises(PandError, match=r"^class 'b c' \(.*b_c\) has no usable image: it holds 1 .txt file;"):
        get_dataset("imagefolder", tmp_path, "train")


@pytest.mark.parametrize("split", ["test", "val", "train"])
def test_a_split_folder_holding_images_pand_skips_is_refused(tmp_path, split):
    make_imagefolder(tmp_path, classes=("a", "b"), per_class=2, test_per_class=2, val_per_class=1)
    skipped = [_save(tmp_path / split / "a" / "x.gif"), _save(tmp_path / split / "b" / "sub" / "y.TIFF", "TIFF")]
    with pytest.raises(PandError) as e:
        get_dataset("imagefolder", tmp_path, split)
    assert str(e.value) == (f"2 image files in {tmp_path / split} are of a type pand does not read: {skipped[0]}, "
                            f"{skipped[1]}; pand reads .jpg .jpeg .png .bmp .webp: convert them (e.g. to .png) or move "
                            "them out, so that every image of the split counts")


def test_other_files_next_to_the_images_are_still_ignored(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), per_class=1, test_per_class=1)
    (tmp_path / "test" / "a" / "labels.csv").write_text("x")
    (tmp_path / "test" / "a" / "README").write_text("x")
    assert len(get_dataset("imagefolder", tmp_path, "test")) == 2
