"""Downstream readers on tiny replicas written in each dataset's exact layout."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from data_prep.datasets import load, resolved_split
from data_prep.write_ffcv import convert


def _img(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)


def make_inat(root, year):
    cats = [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}, {"id": 11, "name": "c"}]
    for split, n in (("train", 6), ("val", 3)):
        images, annos = [], []
        for i in range(n):
            cat = cats[i % 3]["id"]
            name = f"train_val{year}/Plantae/{cat}/{split}{i}.jpg"
            _img(root / name, i)
            images.append({"id": 100 + i, "file_name": name, "width": 16, "height": 12})
            annos.append({"id": i, "image_id": 100 + i, "category_id": cat})
        (root / f"{split}{year}.json").write_text(
            json.dumps({"images": images, "annotations": annos, "categories": cats})
        )


def make_cub(root):
    rows = [(1, "001.Albatross/a_1.jpg", 1, 1), (2, "001.Albatross/a_2.jpg", 1, 0), (3, "002.Auklet/b_1.jpg", 2, 1)]
    for i, rel, _, _ in rows:
        _img(root / "images" / rel, i)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")


def make_cars(root):
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([["Audi", "BMW", "Fiat"]], dtype=object)})
    for name, folder, labels in (
        ("devkit/cars_train_annos.mat", "cars_train", [1, 3]),
        ("cars_test_annos_withlabels.mat", "cars_test", [2]),
    ):
        recs = np.zeros((1, len(labels)), dtype=[("fname", object), ("class", object)])
        for k, c in enumerate(labels):
            recs[0, k] = (f"{k:05d}.jpg", np.array([[c]], dtype=np.uint8))
            _img(root / folder / f"{k:05d}.jpg", k)
        savemat(root / name, {"annotations": recs})


def make_aircraft(root):
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\nFalcon 2000\n")
    for split, rows in (("trainval", [("0001", "707-320"), ("0002", "Falcon 2000")]), ("test", [("0003", "A300B4")])):
        for i, _ in rows:
            _img(data / "images" / f"{i}.jpg")
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))


def make_flowers(root):
    for i in range(1, 7):
        _img(root / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 102, 1, 2, 5]])})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[4, 5, 6]])})


def make_pets(root):
    rows = {"trainval": ["Abyssinian_1 1 1 1", "beagle_3 2 2 1"], "test": ["Abyssinian_7 1 1 1"]}
    for split, lines in rows.items():
        for line in lines:
            _img(root / "images" / f"{line.split()[0]}.jpg")
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


MAKERS = {
    "inat18": lambda r: make_inat(r, 2018),
    "inat19": lambda r: make_inat(r, 2019),
    "cub": make_cub,
    "cars": make_cars,
    "aircraft": make_aircraft,
    "flowers": make_flowers,
    "pets": make_pets,
}
EXPECTED = {  # (train labels, eval labels, number of classes)
    "inat18": ([1, 0, 2, 1, 0, 2], [1, 0, 2], 3),
    "inat19": ([1, 0, 2, 1, 0, 2], [1, 0, 2], 3),
    "cub": ([0, 1], [0], 2),
    "cars": ([0, 2], [1], 3),
    "aircraft": ([0, 2], [1], 3),
    "flowers": ([0, 1, 101], [0, 1, 4], 102),
    "pets": ([0, 1], [0], 37),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_reader_labels_and_classes(name, tmp_path):
    MAKERS[name](tmp_path)
    train_split, eval_split = ("train", "val") if name.startswith("inat") else ("trainval", "test")
    train, evaluation = load(name, tmp_path, train_split), load(name, tmp_path, eval_split)
    want_train, want_eval, classes = EXPECTED[name]
    assert train.labels == want_train and evaluation.labels == want_eval
    assert len(train.classes) == classes and all(p.is_file() for p in train.paths)
    if name.startswith("inat"):
        assert train.classes == ["3", "7", "11"]  # contiguous labels in sorted category-id order
    if name in ("cub", "cars", "pets"):  # no validation split: val is the held-out test split, never training
        assert load(name, tmp_path, "val").paths == evaluation.paths and resolved_split(name, "val") == "test"


def test_reader_errors(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "images" / "002.Auklet" / "b_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="CUB trainval: 1 listed images are absent"):
        load("cub", tmp_path, "trainval")
    make_aircraft(tmp_path / "air")
    (tmp_path / "air" / "data" / "images_variant_test.txt").write_text("0003 Concorde\n")
    with pytest.raises(ValueError, match="variant 'Concorde' not in variants.txt"):
        load("aircraft", tmp_path / "air", "test")
    make_pets(tmp_path / "pets")
    (tmp_path / "pets" / "annotations" / "test.txt").write_text("Abyssinian_7 40 1 1\n")
    with pytest.raises(ValueError, match=r"class index 39 \(0-based; valid 0..36\)"):
        load("pets", tmp_path / "pets", "test")
    with pytest.raises(FileNotFoundError, match="val2018.json not found"):
        load("inat18", tmp_path, "val")
    with pytest.raises(ValueError, match="unknown dataset 'birds'"):
        load("birds", tmp_path, "train")


def test_named_dataset_converts_to_ffcv(tmp_path):
    make_flowers(tmp_path / "flowers")
    summary = convert(
        str(tmp_path / "flowers"), str(tmp_path / "f.beton"), split="trainval", dataset="flowers", workers=1
    )
    assert summary["written"] == 3 and summary["classes"] == 102
