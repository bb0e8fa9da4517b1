"""The dataset registry: every dataset is one registered module plus one config, and the registry alone decides
which names exist and how their splits are served."""

from importlib import resources

import pytest
import yaml

from pand.data import DATASET_NAMES, get_dataset, get_dataset_kind, list_datasets, register_dataset
from pand.data.splits import SPLITS
from pand.errors import ConfigError
from tests.fixtures import datasets as fx


def _config_names():
    folder = resources.files("pand.configs") / "data"
    return {p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_")}


def test_dataset_names_come_from_the_registry_in_their_listed_order():
    assert DATASET_NAMES == list_datasets()
    assert DATASET_NAMES == ("cub", "aircraft", "pets", "dogs", "fashion_mnist", "cifar100", "imagenet", "imagefolder",
                             "captions", "shards")


def test_every_registered_dataset_has_one_config_naming_it_and_every_config_a_dataset():
    assert _config_names() == set(DATASET_NAMES)
    folder = resources.files("pand.configs") / "data"
    for name in DATASET_NAMES:
        assert yaml.safe_load((folder / f"{name}.yaml").read_text())["name"] == name


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_registered_dataset_has_a_fixture_and_serves_every_split(name, tmp_path):
    getattr(fx, f"make_{name}")(tmp_path)
    for split in SPLITS:
        ds = get_dataset(name, tmp_path, split)
        assert ds.name == name and ds.split == split and len(ds) > 0


def test_the_module_convention_decides_val_and_class_names_file(tmp_path):
    assert get_dataset_kind("aircraft").has_official_val(tmp_path)
    assert not get_dataset_kind("cub").has_official_val(tmp_path)
    assert not get_dataset_kind("imagefolder").has_official_val(tmp_path)
    # a folder-dependent has_official_val receives the dataset's own settings it names
    assert not get_dataset_kind("shards").has_official_val(tmp_path, shards={"val": None})
    assert get_dataset_kind("shards").has_official_val(tmp_path, shards={"val": "wds:v/{0..1}.tar"})
    (tmp_path / "val").mkdir()
    assert get_dataset_kind("imagefolder").has_official_val(tmp_path)
    takers = [n for n in DATASET_NAMES if get_dataset_kind(n).takes_class_names_file]
    assert takers == ["imagenet", "imagefolder", "shards"]
    assert get_dataset_kind("shards").options == ("shards", "skip_bad") and get_dataset_kind("cub").options == ()


def test_unknown_name_lists_the_registered_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'; valid names: cub, aircraft, pets, dogs, "
                                          "fashion_mnist, cifar100, imagenet, imagefolder, captions, shards$"):
        get_dataset_kind("cifar")


def test_a_name_registers_once_and_a_module_must_follow_the_protocol():
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset("cub")(lambda root, split, *, download=False: None)
    with pytest.raises(TypeError, match="lacks TITLE, LAYOUT, HAS_OFFICIAL_VAL"):
        register_dataset("not_a_dataset")(lambda root, split, *, download=False: None)
    assert "not_a_dataset" not in list_datasets()
