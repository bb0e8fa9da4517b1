"""download_file / download_and_extract, and download=True for datasets via file:// fixture archives."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile

import pytest

from pand.data import aircraft, cub, dogs, fashion_mnist, get_dataset, pets
from pand.data.download import download_and_extract, download_file, md5sum
from pand.errors import PandError
from tests.fixtures.datasets import make_archive, make_cub, make_dogs, make_fashion_mnist, make_pets


def _entry(path, md5):
    return {"url": path.as_uri(), "md5": md5, "filename": path.name}


def test_cub_download(tmp_path, monkeypatch):
    src = make_cub(tmp_path / "src")
    archive = tmp_path / "server" / "CUB_200_2011.tgz"
    md5 = make_archive(src, archive)
    monkeypatch.setitem(cub.SOURCES, "archive", _entry(archive, md5))
    root = tmp_path / "data"
    ds = get_dataset("cub", root, "train", download=True)
    assert len(ds) + len(get_dataset("cub", root, "val")) == 12
    assert (root / "CUB_200_2011" / "images.txt").exists()
    assert (root / "CUB_200_2011.tgz").exists() and not list(root.glob("*.part"))
    assert ds.load_image(0).size == (32, 32)
    # already present: nothing is fetched again (the server copy is gone)
    archive.unlink()
    assert len(get_dataset("cub", root, "test", download=True)) == 6


def test_pets_download_torchvision_sourced(tmp_path, monkeypatch):
    src = make_pets(tmp_path / "src", per_class=1, test_per_class=1)
    md5_img = make_archive(src / "images", tmp_path / "server" / "images.tar.gz")
    md5_ann = make_archive(src / "annotations", tmp_path / "server" / "annotations.tar.gz")
    monkeypatch.setitem(pets.SOURCES, "images", _entry(tmp_path / "server" / "images.tar.gz", md5_img))
    monkeypatch.setitem(pets.SOURCES, "annotations", _entry(tmp_path / "server" / "annotations.tar.gz", md5_ann))
    ds = get_dataset("pets", tmp_path / "data", "test", download=True)
    assert len(ds) == 37 and len(ds.classes) == 37
    assert (tmp_path / "data" / "oxford-iiit-pet" / "annotations" / "trainval.txt").exists()


def test_dogs_download(tmp_path, monkeypatch):
    src = make_dogs(tmp_path / "src")
    md5_img = make_archive(src / "Images", tmp_path / "server" / "images.tar")
    md5_lst = make_archive(src / "lists", tmp_path / "server" / "lists.tar", contents_only=True)
    monkeypatch.setitem(
        dogs.SOURCES, "images", {**dogs.SOURCES["images"], **_entry(tmp_path / "server/images.tar", md5_img)}
    )
    monkeypatch.setitem(
        dogs.SOURCES, "lists", {**dogs.SOURCES["lists"], **_entry(tmp_path / "server/lists.tar", md5_lst)}
    )
    ds = get_dataset("dogs", tmp_path / "data", "test", download=True)
    assert len(ds) == 6 and ds.classes[0] == "Chihuahua"
    assert (tmp_path / "data" / "stanford_dogs" / "lists" / "test_list.mat").exists()


def test_fashion_mnist_download(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "none")
    server = make_fashion_mnist(tmp_path / "server", gz=True)
    for key in list(fashion_mnist.SOURCES):
        p = server / key
        monkeypatch.setitem(fashion_mnist.SOURCES, key, _entry(p, md5sum(p)))
    ds = get_dataset("fashion_mnist", tmp_path / "data", "train", download=True)
    assert len(ds) + len(get_dataset("fashion_mnist", tmp_path / "data", "val")) == 60
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists()


def test_sources_come_from_torchvision(monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")
    monkeypatch.setattr(pets, "SOURCES", {"images": None, "annotations": None})
    got = {(s["url"], s["md5"]) for s in pets.sources().values()}
    assert got == set(tv.OxfordIIITPet._RESOURCES)
    monkeypatch.setattr(aircraft, "SOURCES", {"archive": None})
    assert aircraft.sources()["archive"]["url"] == tv.FGVCAircraft._URL
    assert aircraft.sources()["archive"]["md5"] is None  # torchvision publishes none: checksum skipped
    monkeypatch.setattr(fashion_mnist, "SOURCES", {k: None for k in fashion_mnist.SOURCES})
    fm = fashion_mnist.sources()
    for filename, md5 in tv.FashionMNIST.resources:
        assert fm[filename]["md5"] == md5 and fm[filename]["url"].endswith(filename)


def test_wrong_md5_leaves_nothing(tmp_path):
    f = tmp_path / "payload.bin"
    f.write_bytes(b"x" * 5000)
    dest = tmp_path / "out" / "payload.bin"
    with pytest.raises(PandError) as e:
        download_file(f.as_uri(), dest, "0" * 32)
    msg = str(e.value)
    assert f.as_uri() in msg and "0" * 32 in msg and md5sum(f) in msg
    assert not dest.exists() and not (tmp_path / "out" / "payload.bin.part").exists()


def test_wrong_md5_via_dataset(tmp_path, monkeypatch):
    src = make_cub(tmp_path / "src", n_classes=2, per_class=1, test_per_class=1)
    archive = tmp_path / "server" / "CUB_200_2011.tgz"
    real = make_archive(src, archive)
    monkeypatch.setitem(cub.SOURCES, "archive", _entry(archive, "f" * 32))
    with pytest.raises(PandError) as e:
        get_dataset("cub", tmp_path / "data", "train", download=True)
    assert real in str(e.value) and "f" * 32 in str(e.value)
    assert not list((tmp_path / "data").glob("*"))


def test_network_error_message(tmp_path):
    url = (tmp_path / "missing.tgz").as_uri()
    with pytest.raises(PandError) as e:
        download_and_extract(url, tmp_path / "root", None, layout="  CUB_200_2011/\n    images.txt")
    msg = str(e.value)
    assert url in msg and "extracted dataset" in msg and "images.txt" in msg
    assert not list((tmp_path / "root").glob("*.part"))


def test_existing_archive_skips_download(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    dest = tmp_path / "d" / "a.bin"
    download_file(f.as_uri(), dest, md5sum(f))
    # the url is dead now, but the archive is present with the right md5
    assert download_file((tmp_path / "gone").as_uri(), dest, md5sum(f)) == dest
    # a present file with the wrong md5 is fetched again
    dest.write_bytes(b"tampered")
    download_file(f.as_uri(), dest, md5sum(f))
    assert dest.read_bytes() == b"hello"


def test_zip_gz_and_remove_archive(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "f.txt").write_text("hi")
    md5 = make_archive(tmp_path / "pkg", tmp_path / "server" / "pkg.zip")
    out = tmp_path / "out"
    download_and_extract((tmp_path / "server" / "pkg.zip").as_uri(), out, md5, remove_archive=True)
    assert (out / "pkg" / "sub" / "f.txt").read_text() == "hi" and not (out / "pkg.zip").exists()
    gz = tmp_path / "server" / "blob.bin.gz"
    with gzip.open(gz, "wb") as g:
        g.write(b"data")
    download_and_extract(gz.as_uri(), out, md5sum(gz))
    assert (out / "blob.bin").read_bytes() == b"data"


def _evil_tar(path, name):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))


@pytest.mark.parametrize("member", ["../escape.txt", "/tmp/abs-escape.txt", "a/../../escape.txt"])
def test_tar_members_escaping_root_are_rejected(tmp_path, member):
    archive = tmp_path / "server" / "evil.tar"
    archive.parent.mkdir()
    _evil_tar(archive, member)
    with pytest.raises(PandError, match="outside"):
        download_and_extract(archive.as_uri(), tmp_path / "root" / "x", None)
    assert not (tmp_path / "root" / "escape.txt").exists()


def test_zip_member_escaping_root_is_rejected(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "evil")
    with pytest.raises(PandError, match="outside"):
        download_and_extract(archive.as_uri(), tmp_path / "root", None)
    assert not (tmp_path / "escape.txt").exists()


def test_download_shows_a_progress_bar(tmp_path, capsys):
    f = tmp_path / "payload.bin"
    f.write_bytes(b"x" * 300_000)
    download_file(f.as_uri(), tmp_path / "out" / "payload.bin", md5sum(f))
    err = capsys.readouterr().err
    assert "payload.bin" in err and "100%" in err  # tqdm's bar, named after the file, run to the end


def test_interrupted_download_leaves_no_file_under_the_real_name(tmp_path, monkeypatch):
    import urllib.request

    from pand.data import download

    class Dropping(io.BytesIO):
        headers = {"Content-Length": "10000"}
        reads = 0

        def read(self, n=-1):
            self.reads += 1
            if self.reads > 1:
                raise ConnectionResetError("connection reset by peer")
            return b"y" * 1000

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Dropping())
    dest = tmp_path / "out" / "big.tgz"
    with pytest.raises(PandError, match="connection reset"):
        download.download_file("https://example.invalid/big.tgz", dest, None)
    assert not dest.exists() and not list(dest.parent.glob("*"))
