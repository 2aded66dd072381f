import json

import numpy as np
import pytest
import torch
from ffcv.fields.decoders import SimpleRGBImageDecoder
from ffcv.loader import Loader
from PIL import Image

from data_prep.sources import detect, fashion_mnist, load_rgb, select
from data_prep.write_ffcv import convert
from dtm_ds.data import LoaderSpec, PretrainLoader, epoch_order
from tests.conftest import texture, write_class_folder


def _read_raw(path):
    loader = Loader(str(path), batch_size=1, num_workers=1, pipelines={"image": [SimpleRGBImageDecoder()]})
    return [(img[0].copy(), int(lbl[0])) for img, lbl in loader]  # FFCV reuses its output buffers


def test_odd_and_bad_images(odd_images, tmp_path):
    root, good, bad = odd_images
    out = tmp_path / "odd.beton"
    with pytest.raises(RuntimeError, match=r"3 of 12 images are unreadable .*max_bad"):
        convert(str(root), str(out), workers=1)
    assert not out.exists() and not list(tmp_path.glob(".odd.beton.tmp*"))  # nothing half-written
    summary = convert(str(root), str(out), workers=1, max_bad=0.5, max_side=256)
    assert summary["written"] == len(good) == 9 and summary["skipped_bad"] == 3
    report = (tmp_path / "odd.beton.bad.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in report) == [str(p) for p in bad]
    assert json.loads((tmp_path / "odd.beton.classes.json").read_text())["classes"] == ["bad", "good"]


def test_odd_formats_decode_to_rgb(odd_images):
    _, good, _ = odd_images
    images = {p.name: load_rgb(p) for p in good}
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in images.values())
    assert images["rotated.jpg"].shape == (40, 30, 3)  # EXIF orientation applied
    assert images["rgb.jpg"].shape == (30, 40, 3) and images["tiny.png"].shape == (1, 1, 3)
    grey = images["grey.png"]
    assert np.array_equal(grey[..., 0], grey[..., 1])
    assert np.array_equal(images["grey16.png"][..., 0], texture(30, 40, 1)[..., 0])  # top 8 of 16 bits
    for name in ("cmyk.jpg", "palette.png", "alpha.png"):  # colours survive (a wrong decode is off by ~100)
        assert np.abs(images[name].astype(int) - texture(30, 40, 1)).mean() < 20, name


def test_raw_mode_pixels_equal_source(tmp_path):
    paths = write_class_folder(tmp_path / "src", {"a": 3, "b": 2}, size=(24, 20), suffix=".png")
    out = tmp_path / "raw.beton"
    convert(str(tmp_path / "src"), str(out), write_mode="raw", workers=1)
    rows = _read_raw(out)
    assert [lbl for _, lbl in rows] == [0, 0, 0, 1, 1]
    for (img, _), path in zip(rows, paths, strict=True):
        assert np.array_equal(img, np.asarray(Image.open(path).convert("RGB")))


def test_imagenet_layouts_and_subsets(tmp_path):
    root = tmp_path / "imagenet"
    write_class_folder(root / "train", {"n02": 3, "n01": 4}, size=(20, 20), suffix=".JPEG")
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n02", "n01", "n02"], 1):
        name = f"ILSVRC2012_val_{i:08d}"
        Image.fromarray(texture(20, 20, i)).save(root / "val" / f"{name}.JPEG")
        rows.append(f"{name},{wnid} 1 2 3 4 {wnid} 5 6 7 8")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    train, val = detect(root, "train"), detect(root, "val")
    assert train.classes == ["n01", "n02"] and train.labels == [0] * 4 + [1] * 3
    assert val.labels == [1, 0, 1] and [p.name for p in val.paths][0] == "ILSVRC2012_val_00000001.JPEG"
    assert select(train, per_class=2).labels == [0, 0, 1, 1]
    assert select(train, fraction=0.5, seed=1).labels == select(train, fraction=0.5, seed=1).labels
    (root / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match="lists ILSVRC2012_val_00000002"):
        detect(root, "val")


def test_list_file_and_errors(tmp_path):
    write_class_folder(tmp_path / "imgs", {"x": 2}, size=(16, 16))
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/x/000.jpg 3\nimgs/x/001.jpg 1\n")
    assert detect(listing, "train").labels == [3, 1]
    listing.write_text("imgs/x/000.jpg three\n")
    with pytest.raises(ValueError, match=r"list.txt:1: expected '<path> <label >= 0>'"):
        detect(listing, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="write_mode must be one of"):
        convert(str(tmp_path / "imgs"), str(tmp_path / "o.beton"), write_mode="png")


def test_fashion_mnist_from_debian_package(tmp_path):
    listing = fashion_mnist("test")
    assert len(listing) == 10000 and listing.arrays.shape == (10000, 28, 28)
    summary = convert("fashion_mnist", str(tmp_path / "fm.beton"), split="test", per_class=3, write_mode="raw")
    assert summary["written"] == 30
    rows = _read_raw(tmp_path / "fm.beton")
    first = select(listing, per_class=3)
    assert np.array_equal(rows[0][0][..., 1], first.arrays[0]) and rows[0][1] == first.labels[0]


def _spec(path, **kw):
    return LoaderSpec(path=str(path), **{"batch_size": 4, "image_size": 32, "patch_size": 8, "num_masked": 6} | kw)


def test_ffcv_batches_and_exact_restart(small_beton):
    loader = PretrainLoader(_spec(small_beton, workers=1))
    assert loader.batches_per_epoch == 6
    epoch2 = list(loader.epoch(2))
    batch = epoch2[0]
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["masks"].shape == (4, 16) and batch["masks"].dtype == torch.bool
    assert (batch["masks"].sum(1) == 6).all() and batch["labels"].dtype == torch.long
    assert -2.2 < batch["images"].min() < batch["images"].max() < 2.7  # normalised
    restarted = list(PretrainLoader(_spec(small_beton, workers=1)).epoch(2, start_batch=4))
    for a, b in zip(epoch2[4:], restarted, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = list(loader.epoch(3))
    assert not torch.equal(other[0]["images"], batch["images"])


def test_two_rank_split_is_disjoint_and_complete():
    spec0 = LoaderSpec(path="x", batch_size=5, rank=0, world=2, seed=3)
    spec1 = LoaderSpec(path="x", batch_size=5, rank=1, world=2, seed=3)
    a, b = epoch_order(20, spec0, 1), epoch_order(20, spec1, 1)
    assert len(a) == len(b) == 10 and set(a).isdisjoint(b) and set(a) | set(b) == set(range(20))
    assert not np.array_equal(a, epoch_order(20, spec0, 2))
    assert len(epoch_order(23, spec0, 0)) == 10  # drop_last: 2 full global batches of 10


def test_chunks_do_not_depend_on_how_the_global_batch_is_split():
    """2 ranks x accumulation 1 run the same micro-batches as 1 rank x accumulation 2 (elastic resume)."""
    two = [epoch_order(41, LoaderSpec(path="x", batch_size=4, rank=r, world=2, seed=3), 0) for r in (0, 1)]
    one = epoch_order(41, LoaderSpec(path="x", batch_size=4, world=1, accum=2, seed=3), 0)
    by_step = np.stack([t.reshape(5, 4) for t in two], 1).reshape(-1)  # step-major: rank 0's chunk, rank 1's
    assert len(one) == 40 and np.array_equal(by_step, one)


def test_torchvision_backend_matches_shapes(tmp_path):
    write_class_folder(tmp_path / "src", {"a": 6, "b": 6}, size=(40, 56))
    spec = _spec(tmp_path / "src", backend="torchvision", workers=0)
    loader = PretrainLoader(spec)
    first = list(loader.epoch(0))
    assert len(first) == loader.batches_per_epoch == 3
    assert first[0]["images"].shape == (4, 3, 32, 32) and first[0]["labels"].tolist()[0] in (0, 1)
    again = list(PretrainLoader(spec).epoch(0, start_batch=1))
    assert torch.equal(again[0]["images"], first[1]["images"])


def test_loader_errors(tmp_path, small_beton):
    with pytest.raises(FileNotFoundError, match="nope.beton does not exist"):
        PretrainLoader(_spec(tmp_path / "nope.beton"))
    corrupt = tmp_path / "corrupt.beton"
    corrupt.write_bytes(small_beton.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt.beton is not a readable FFCV .beton"):
        PretrainLoader(_spec(corrupt))
    with pytest.raises(
        ValueError, match=r"global batch \(64 per rank x accumulation 1 x 2 ranks\) is larger than the 24 samples"
    ):
        PretrainLoader(_spec(small_beton, batch_size=64, world=2, rank=1))
    with pytest.raises(ValueError, match="image_size 30 is not divisible by patch_size 8"):
        _spec(small_beton, image_size=30)


def test_damaged_jpeg_bytes_in_a_beton_are_an_error_naming_the_sample(tmp_path, small_beton):
    """Zeroed image bytes inside a .beton: FFCV's decoder thread ignores libjpeg-turbo's failure (the crop would
    keep a previous batch's pixels) and drops exceptions (a raise there hangs the consumer). The loader names
    the sample instead, within seconds."""
    import threading

    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    damaged = tmp_path / "damaged.beton"
    data = bytearray(small_beton.read_bytes())
    image = Reader(str(small_beton)).metadata["f0"]
    assert (image["mode"] == IMAGE_MODES["jpg"]).all()  # every image is a JPEG (write_mode jpg)
    start = int(image["data_ptr"][7])
    data[start : start + 256] = bytes(256)
    damaged.write_bytes(bytes(data))
    got: list = []

    def run():
        try:
            got.extend(PretrainLoader(_spec(damaged, workers=1)).epoch(0))
        except ValueError as err:
            got.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the loader hung on a damaged sample"
    assert isinstance(got[-1], ValueError), got[-1]
    assert "damaged.beton: the JPEG bytes of sample(s) [7] do not decode" in str(got[-1])
    clean = list(PretrainLoader(_spec(small_beton, workers=1)).epoch(0))  # the intact copy: no false alarm
    assert len(clean) == 6
