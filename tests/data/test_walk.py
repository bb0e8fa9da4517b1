"""The one directory walk behind image folders, unlabelled folders and ``pand predict``: link loops refused, every
file once, links kept inside their root, pand's own output folders skipped, the same matches as glob."""

from __future__ import annotations

import glob as pyglob
import logging
import os
from pathlib import Path

import pytest

from pand.data import get_dataset
from pand.data.unlabelled import unlabelled_folder
from pand.data.walk import glob, walk
from pand.errors import ConfigError, DatasetNotFoundError, PandError
from pand.io import mark_output_folder
from pand.predict import find_images
from tests.fixtures.datasets import make_cub, make_imagefolder, write_image


def _tree(folder: Path, *rels: str) -> Path:
    for rel in rels:
        write_image(folder / rel, 0, 3, size=8)
    return folder


# -- link loops: refused, naming the link and the folder it points to ------------------------------------------------


@pytest.mark.parametrize("target", ["..", ".", "../.."])
def test_a_link_to_a_folder_on_the_path_is_a_loop_for_every_listing(tmp_path, target):
    folder = _tree(tmp_path / "photos", "a.jpg", "sub/deeper/b.jpg")
    link = folder / "sub" / "deeper" / "back"
    link.symlink_to(target)
    pointed = os.path.realpath(link)
    expected = f"{link} is a link to {pointed}, a folder that contains it"
    for listing in (lambda: walk(folder), lambda: unlabelled_folder(folder, ["a"], "x"), lambda: find_images(folder),
                    lambda: find_images(f"{folder}/**/*.jpg")):
        with pytest.raises(PandError) as e:
            listing()
        assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_a_loop_inside_an_image_folder_class_is_refused(tmp_path):
    make_imagefolder(tmp_path, per_class=2, test_per_class=1)
    link = tmp_path / "train" / "red_square" / "again"
    link.symlink_to(tmp_path / "train" / "red_square")
    with pytest.raises(PandError, match=f"^{link} is a link to {tmp_path / 'train' / 'red_square'}, a folder that"):
        get_dataset("imagefolder", tmp_path, "train")


def test_links_to_folders_are_followed_once_and_every_file_is_listed_once(tmp_path):
    folder = _tree(tmp_path / "photos", "real/a.jpg", "real/b.png", "c.jpg")
    (folder / "also").symlink_to("real")  # a second name for a folder already listed
    (folder / "zz").symlink_to("real")
    (folder / "d.jpg").symlink_to("c.jpg")  # a second name for a file
    outside = _tree(tmp_path / "elsewhere", "e.jpg")
    (folder / "linked").symlink_to(outside)
    listing = walk(folder)
    # "also" sorts before "real": the folder is listed under that name, and only once
    assert listing.files == ["also/a.jpg", "also/b.png", "c.jpg", "linked/e.jpg"]
    assert len(set(listing.real)) == len(listing.files)


def test_hidden_entries_are_skipped_and_the_listing_is_sorted(tmp_path):
    folder = _tree(tmp_path / "photos", "b.jpg", "A.JPG", "a/z.png", ".hidden/x.jpg", ".y.jpg", "a/.z.jpg")
    (folder / "notes.txt").write_text("x")
    listing = walk(folder)
    assert listing.files == sorted(["A.JPG", "a/z.png", "b.jpg"])
    assert listing.others == ["notes.txt"]


def test_an_unreadable_folder_is_an_error_not_a_silent_gap(tmp_path, monkeypatch):
    folder = _tree(tmp_path / "photos", "a.jpg", "locked/b.jpg")
    scandir = os.scandir

    def refuse(path):  # what a folder without read permission gives (chmod cannot show it to root)
        if str(path) == str(folder / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(PandError, match=f"^cannot list folder {folder / 'locked'}: Permission denied$"):
        walk(folder)


def test_a_dangling_link_to_an_image_names_the_link_and_its_target(tmp_path):
    folder = _tree(tmp_path / "photos", "a.jpg")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(DatasetNotFoundError, match=f"{folder / 'gone.jpg'} is a link to {tmp_path / 'nowhere.jpg'}, "
                                                   "which does not exist"):
        walk(folder)


# -- inputs stay inside their roots ------------------------------------------------------------------------------------


def test_a_link_out_of_the_unlabelled_folder_is_refused_with_both_paths(tmp_path):
    folder = _tree(tmp_path / "photos", "a.jpg")
    outside = _tree(tmp_path / "other", "b.jpg", "sub/c.jpg")
    (folder / "b.jpg").symlink_to(outside / "b.jpg")
    with pytest.raises(PandError) as e:
        unlabelled_folder(folder, ["a"], "x")
    assert str(e.value).startswith(f"{folder / 'b.jpg'} is a link to {outside / 'b.jpg'}, outside {folder}:")
    (folder / "b.jpg").unlink()
    (folder / "more").symlink_to(outside / "sub")
    with pytest.raises(PandError, match=f"^{folder / 'more'} is a link to {outside / 'sub'}, outside {folder}:"):
        unlabelled_folder(folder, ["a"], "x")


def test_a_link_from_a_training_class_into_the_test_folder_is_refused(tmp_path):
    make_imagefolder(tmp_path, per_class=2, test_per_class=1)
    test_file = tmp_path / "test" / "red_square" / "red_square_000.jpg"
    link = tmp_path / "train" / "red_square" / "borrowed.jpg"
    link.symlink_to(test_file)
    with pytest.raises(PandError) as e:
        get_dataset("imagefolder", tmp_path, "train")
    assert str(e.value) == (f"{link} is a link to {test_file}, inside another split's folder {tmp_path / 'test'}: the "
                            "same image would be in two splits; remove the link")
    link.unlink()
    # a whole class folder of the test split linked into train, and a link out of the dataset root
    (tmp_path / "train" / "red_square" / "more").symlink_to(tmp_path / "test" / "red_square")
    with pytest.raises(PandError, match="inside another split's folder"):
        get_dataset("imagefolder", tmp_path, "train")
    (tmp_path / "train" / "red_square" / "more").unlink()
    elsewhere = _tree(tmp_path.parent / f"{tmp_path.name}-elsewhere", "x.jpg")
    (tmp_path / "test" / "red_square" / "x.jpg").symlink_to(elsewhere / "x.jpg")
    with pytest.raises(PandError, match=f"is a link to {elsewhere / 'x.jpg'}, outside {tmp_path}:"):
        get_dataset("imagefolder", tmp_path, "test")


def test_links_inside_the_dataset_root_but_outside_the_splits_are_fine(tmp_path):
    make_imagefolder(tmp_path, per_class=2, test_per_class=1)
    pool = _tree(tmp_path / "pool", "extra.jpg")
    (tmp_path / "train" / "red_square" / "extra.jpg").symlink_to(pool / "extra.jpg")
    assert len(get_dataset("imagefolder", tmp_path, "train", val_fraction=0.0)) == 7


def test_split_folders_that_are_one_folder_are_refused(tmp_path):
    make_imagefolder(tmp_path, per_class=2, test_per_class=1)
    (tmp_path / "val").symlink_to("train")
    with pytest.raises(PandError, match=f"^{tmp_path / 'train'} and {tmp_path / 'val'} are one folder"):
        get_dataset("imagefolder", tmp_path, "train")


def test_one_file_in_two_class_folders_is_refused(tmp_path):
    make_imagefolder(tmp_path, per_class=2, test_per_class=1)
    shared = tmp_path / "train" / "red_square" / "red_square_000.jpg"
    (tmp_path / "train" / "blue_triangle" / "twin.jpg").symlink_to(shared)
    with pytest.raises(PandError, match=f"^{shared} and {shared.parent.parent / 'blue_triangle' / 'twin.jpg'} are one "
                                        f"file \\({shared}\\), in two class folders"):
        get_dataset("imagefolder", tmp_path, "train")


def test_a_listed_file_must_resolve_inside_the_dataset_folder(tmp_path):
    d = make_cub(tmp_path / "data", n_classes=2, per_class=2, test_per_class=1)
    listed = next((d / "images").rglob("*.jpg"))
    outside = tmp_path / "outside.jpg"
    listed.rename(outside)
    listed.symlink_to(outside)
    with pytest.raises(PandError) as e:
        get_dataset("cub", d, "train")
    assert f"lists {listed}, which resolves to {outside}, outside the dataset folder {d}" in str(e.value)
    listed.unlink()
    outside.rename(listed)
    (d / "images").rename(tmp_path / "moved")
    (d / "images").symlink_to(tmp_path / "moved")  # a folder link out of the root: every file resolves outside
    with pytest.raises(PandError, match="outside the dataset folder"):
        get_dataset("cub", d, "test")
    (d / "images").unlink()
    (tmp_path / "moved").rename(d / "images")
    lines = (d / "images.txt").read_text().splitlines()
    lines[0] = lines[0].split()[0] + " ../../../outside.jpg"  # from images/: tmp_path/outside.jpg
    write_image(tmp_path / "outside.jpg", 0, 2, size=8)
    (d / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(PandError, match="outside the dataset folder"):
        get_dataset("cub", d, "train")


# -- pand's outputs are never inputs ---------------------------------------------------------------------------------


def test_an_output_folder_met_by_a_walk_is_skipped_with_one_warning(tmp_path, caplog):
    folder = _tree(tmp_path / "photos", "a.jpg", "runs/r1/plot.png", "runs/r1/sub/b.jpg")
    mark_output_folder(folder / "runs" / "r1", "run")
    with caplog.at_level(logging.WARNING, logger="pand"):
        assert walk(folder).files == ["a.jpg"]
        assert walk(folder).files == ["a.jpg"]
        assert [p.name for p in find_images(folder)] == ["a.jpg"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"skipping {folder / 'runs' / 'r1'}: a folder pand wrote (run output), not input images"]


def test_an_input_root_that_pand_wrote_is_refused(tmp_path):
    run = _tree(tmp_path / "run", "plot.png", "images/a.jpg")
    mark_output_folder(run, "run")
    with pytest.raises(ConfigError, match=f"^data.unlabelled={run} is a folder pand wrote \\(run output;"):
        unlabelled_folder(run, ["a"], "x")
    with pytest.raises(ConfigError, match=f"^images={run / 'images'} lies inside {run}, a folder pand wrote"):
        find_images(run / "images")
    make_imagefolder(run / "data", per_class=1, test_per_class=1)
    with pytest.raises(ConfigError, match="^data.root=.* lies inside .*, a folder pand wrote"):
        get_dataset("imagefolder", run / "data", "train")


# -- globs -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["*.jpg", "**/*.jpg", "*/*", "a/**", "**/b*.png", "a/*/*.jpg", "[ab]/*.JPG",
                                     "?.jpg", "**"])
def test_globs_match_what_python_glob_matches(tmp_path, pattern):
    folder = _tree(tmp_path / "photos", "x.jpg", "y.png", "a/b1.png", "a/c.jpg", "a/d/e.jpg", "a/d/f/g.jpg",
                   "b/h.JPG", "b/i.bmp")
    (folder / "a" / "notes.txt").write_text("x")
    expected = sorted(Path(p) for p in pyglob.glob(f"{folder}/{pattern}", recursive=True)
                      if os.path.isfile(p) and p.lower().endswith((".jpg", ".png", ".bmp")))
    found, unread = glob(f"{folder}/{pattern}")
    assert sorted(found) == expected and unread == []


def test_find_images_names_the_files_it_cannot_read(tmp_path, caplog):
    from PIL import Image

    folder = _tree(tmp_path / "photos", "a.jpg")
    Image.new("RGB", (4, 4)).save(folder / "b.gif")
    with caplog.at_level(logging.WARNING, logger="pand"):
        assert [p.name for p in find_images(folder)] == ["a.jpg"]
    assert f"1 image file of a type pand does not read (it reads .jpg .jpeg .png .bmp .webp) left out: " \
           f"{folder / 'b.gif'}" in caplog.text
    with pytest.raises(ConfigError, match=f"matches only image files of a type pand does not read: {folder / 'b.gif'}"):
        find_images(f"{folder}/*.gif")
    (folder / "a.jpg").unlink()
    with pytest.raises(ConfigError, match="the folder holds no image file pand reads .* it holds 1 .gif file$"):
        find_images(folder)


def test_a_link_above_the_walked_folder_is_a_loop_found_at_once(tmp_path, monkeypatch):
    folder = _tree(tmp_path / "home" / "me" / "photos", "a.jpg")
    _tree(tmp_path / "home" / "aaa", "big.jpg")  # sorts before "me": would be listed first if the link were followed
    (folder / "up").symlink_to(tmp_path / "home")
    entered = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: entered.append(str(p)) or scandir(p))
    with pytest.raises(PandError, match=f"^{folder / 'up'} is a link to {tmp_path / 'home'}, a folder that contains"):
        find_images(folder)
    assert entered == [str(folder)]
