"""Downstream evaluation: weight transfer into timm's BEiT, fine-tuning through DeepSpeed, probes."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dtm_ds.pretrained import encoder_config, load_student
from eval.classifier import build_classifier, load_pretrained
from tests.helpers import ROOT, ds_json, finetune_cmd, run_env


@pytest.mark.parametrize("img_size", [32, 48])
def test_transfer_adds_shared_table_to_every_block(pretrained, img_size):
    """--init_both_rpb: each block's table = its own + the shared one, so the classifier's attention at the
    pretraining resolution is the student's."""
    model = build_classifier(encoder_config(str(pretrained)), 10, 0.1, img_size)
    report = load_pretrained(model, str(pretrained))
    assert report == {"missing": ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"], "unexpected": []}
    student = load_student(pretrained).eval()
    shared = student.rel_pos_bias.relative_position_bias_table
    own = [blk.attn.relative_position_bias_table for blk in student.blocks]
    assert shared.abs().max() > 0 and own[0].abs().max() > 0 and not torch.equal(own[0], own[1])  # trained
    tables = [blk.attn.relative_position_bias_table for blk in model.blocks]
    if img_size == 32:
        for got, block in zip(tables, own, strict=True):
            torch.testing.assert_close(got, block + shared, rtol=0, atol=0)
        torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, student.blocks[0].mlp.fc1.weight)
        images = torch.randn(2, 3, img_size, img_size)
        with torch.no_grad():  # the same encoder: tokens before the final norms agree
            x = student.patch_embed(images)
            y = model.patch_embed(images)
            x, y = (torch.cat((m.cls_token.expand(2, -1, -1), t), 1) for m, t in ((student, x), (model, y)))
            bias = student.rel_pos_bias()
            for a, b in zip(student.blocks, model.blocks, strict=True):
                x, y = a(x, shared_rel_pos_bias=bias), b.eval()(y)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    else:  # 12x12 window instead of 8x8: tables resized by timm's BEiT filter
        assert tables[0].shape == ((2 * 12 - 1) ** 2 + 3, shared.shape[1]) and not torch.equal(tables[0], tables[-1])
    assert model(torch.randn(2, 3, img_size, img_size)).shape == (2, 10)


def test_finetune_through_deepspeed_resumes_exactly(pretrained, tmp_path):
    out = tmp_path / "ft"
    ds = ds_json(tmp_path / "ds.json", 8)
    cmd = finetune_cmd(pretrained, ds, out, "--train_per_class=2", "--eval_per_class=5", "--recipe.epochs=2")
    cmd.append("--max_epochs=1")
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "new (randomly initialised) keys ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']" in done.stdout
    )
    assert "peak lr 0.00015625 = recipe.lr 0.00125 x global batch 8 / recipe.lr_batch 64" in done.stdout
    first = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(first) == 1 and 0 <= first[0]["top1"] <= first[0]["top5"] <= 100 and first[0]["step"] == 2
    assert (out / "checkpoints" / "best").is_dir() and (out / "checkpoints" / "latest").read_text() == "epoch00000001"
    cmd.pop()  # the 2-epoch run resumes after epoch 1 ...
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["step"] == 4
    cmd[cmd.index(str(out))] = str(tmp_path / "straight")  # ... exactly as an uninterrupted 2-epoch run
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    straight = [json.loads(line) for line in (tmp_path / "straight" / "eval.jsonl").read_text().splitlines()]
    assert straight[1] == rows[1] and straight[0]["train_loss"] != straight[1]["train_loss"]


def test_probes_learn_from_frozen_features(pretrained):
    from eval.knn import main as knn
    from eval.linear import main as linear

    common = {"encoder": str(pretrained), "train_per_class": 20, "crop_ratio": 1.0, "workers": 0}
    result = linear(**common, blocks=2)  # 200 training features, 100 epochs
    assert result["val"] == 10000 and result["train"] == 200 and result["eval_split"] == "test"
    assert 25 < result["top1"] <= result["top5"]  # chance is 10 %
    assert knn(**common)["top1"] > 25
    pixels = knn(**common, pixels=True)  # the baseline make demo prints beside pretrained and random init
    assert pixels["pixels"] is True and pixels["top1"] > 40  # chance 10 %
    from data_prep.datasets import open_listing
    from data_prep.sources import select
    from dtm_ds.features import extract
    from eval.features import load_encoder

    ten = select(open_listing("fashion_mnist", "test"), per_class=1)
    x, y = extract(load_encoder(str(pretrained)), ten, crop_ratio=1.0, workers=0, pixels=True)
    assert x.shape == (10, 3 * 32 * 32) and sorted(y.tolist()) == list(range(10))
    assert x.mean().abs() < 2 and -2.2 < x.min() < x.max() < 2.7  # ImageNet-normalised pixels
    with pytest.raises(ValueError, match=r"unknown options \['block'\]; 'block': did you mean 'blocks'\?"):
        linear(**common, block=2)


def _knn_by_hand(train_x, train_y, test_x, k: int, temperature: float) -> list[int]:
    """DINO's weighted vote written out: the k most similar training features vote exp(sim / T) each."""
    predictions = []
    for q in test_x.tolist():
        sims = [sum(a * b for a, b in zip(q, x, strict=True)) for x in train_x.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes: dict[int, float] = {}
        for i in nearest:
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + math.exp(sims[i] / temperature)
        predictions.append(max(votes, key=votes.get))
    return predictions


def test_knn_vote_weighs_neighbours_by_the_temperature():
    from eval.knn import knn_accuracy

    # one neighbour of class 0 at cosine 0.9 against two of class 1 at 0.5: T = 0.07 lets the close one win
    # (e^12.9 > 2 e^7.1), T = 1 the two (e^0.9 < 2 e^0.5)
    train = F.normalize(torch.tensor([[0.9, 0.436], [0.5, 0.866], [0.5, -0.866], [-1.0, 0.0]]), dim=1)
    labels, query = torch.tensor([0, 1, 1, 0]), torch.tensor([[1.0, 0.0]])
    assert knn_accuracy(train, labels, query, torch.tensor([0]), k=3, temperature=0.07) == 1.0
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=1.0) == 1.0
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen)
    train_y, test_y = torch.arange(300) % 5, torch.arange(60) % 5
    train_x = F.normalize(centres[train_y] + 1.5 * torch.randn(300, 16, generator=gen), dim=1)
    test_x = F.normalize(centres[test_y] + 1.5 * torch.randn(60, 16, generator=gen), dim=1)
    for k, t in ((1, 0.07), (5, 0.07), (20, 0.07), (20, 1.0), (20, 0.01)):
        want = _knn_by_hand(train_x, train_y, test_x, k, t)
        expected = sum(p == int(y) for p, y in zip(want, test_y, strict=True)) / len(test_y)
        assert knn_accuracy(train_x, train_y, test_x, test_y, k, t, chunk=7) == expected, (k, t)


def test_finetune_optimizer_groups_follow_the_layer_decay_ladder():
    """Every parameter's group in the optimizer fine-tuning builds: lr scale decay ** (depth + 1 - layer) with
    the layer read from its name by hand (stem 0, block i -> i + 1, final norm and head depth + 1), and weight
    decay except on 1-D tensors and the CLS token; the --print_config ladder is the same."""
    import dataclasses

    from dtm_ds.config import build_config
    from eval.finetune import ladder, layer_groups
    from eval.recipes import recipe_for

    arch = build_config("tiny").model
    recipe = dataclasses.replace(recipe_for("imagenet", arch.depth), layer_decay=0.5, weight_decay=0.07)
    model = build_classifier(arch, 10, 0.0, arch.img_size)
    group_of = {id(p): g for g in layer_groups(model, recipe) for p in g["params"]}
    depth = arch.depth
    for name, p in model.named_parameters():
        if name.startswith(("cls_token", "patch_embed", "rel_pos_bias")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("norm", "fc_norm", "head")), name
            layer = depth + 1
        group = group_of[id(p)]
        assert group["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - layer), rel=1e-12), name
        assert group["weight_decay"] == (0.0 if p.ndim <= 1 or name == "cls_token" else 0.07), name
    assert ladder(arch, recipe) == pytest.approx([0.5 ** (depth + 1 - i) for i in range(depth + 2)], rel=1e-12)


def test_finetune_errors(pretrained, tmp_path):
    from eval.finetune import main

    with pytest.raises(ValueError, match="--dataset 'mnist' is not a recipe"):
        main(str(pretrained), "mnist", "x")
    with pytest.raises(ValueError, match=r"unknown options \['recipe.lrr'\]; 'recipe.lrr': did you mean 'recipe.lr'\?"):
        main(str(pretrained), "fmnist", "fashion_mnist", **{"recipe.lrr": 1.0})
    with pytest.raises(FileNotFoundError, match="expected a dtm_ds run directory or an export"):
        encoder_config(str(tmp_path / "nothing.pth"))


def test_visualize_writes_the_groups_png(pretrained, tmp_path):
    from PIL import Image

    from dtm_ds.visualize import visualize

    out = visualize(str(pretrained), str(tmp_path / "groups.png"), images=2)
    width, height = Image.open(out).size
    assert (width, height) == (3 * 32 * 7, 16 + 2 * 32 * 7 + 16)  # 3 panels, 2 rows (x7 from 32 px), title, legend


def test_groups_picture_takes_the_runs_own_loader_settings():
    from dtm_ds.config import build_config
    from dtm_ds.visualize import picture_spec

    config = build_config("tiny", {"data.min_crop_scale": 0.7, "data.num_masked": 20, "data.min_mask_block": 5})
    spec = picture_spec(config, 3, seed=4)
    got = (spec.min_crop_scale, spec.num_masked, spec.min_mask_block, spec.backend, spec.path, spec.image_size)
    assert got == (0.7, 20, 5, "torchvision", "fashion_mnist", 32)
    assert (spec.batch_size, spec.seed, spec.jitter) == (3, 4, 0.0)


def test_groups_picture_colours_each_group_and_draws_its_boundary():
    """Each group its own colour over the grey image and a one-pixel white line where groups meet, on a
    grey (Fashion-MNIST-like) picture where mean colours would show nothing."""
    from dtm_ds.visualize import group_colours, paint_groups

    pixels = torch.full((1, 3, 8, 8), 0.5)  # grey: every channel equal
    groups = torch.tensor([[0, 0, 2, 2, 0, 0, 2, 2, 5, 5, 5, 5, 5, 5, 5, 5]])  # 4x4 grid of 2-px patches
    painted = paint_groups(pixels, groups, patch=2)[0]  # (3, 8, 8)
    colours = group_colours(groups)[0]
    assert len({tuple(c.tolist()) for c in colours[[0, 2, 8]]}) == 3  # three groups, three colours
    assert (colours.max(-1).values - colours.min(-1).values).min() > 0.5  # saturated, unlike grey
    white = (painted == 1).all(0)
    assert white[0, 3] and white[1, 3] and not white[0, 1]  # right edge of group 0's first patch column
    assert white[3, 0] and white[3, 7] and not white[7, 0]  # between rows 0-1 and the group-5 rows; no outer frame
    inside = painted[:, 0, 0]  # not a boundary pixel: 45 % grey + 55 % the group's colour
    torch.testing.assert_close(inside, 0.45 * 0.5 + 0.55 * colours[0])
    assert not torch.equal(painted[:, 0, 0], painted[:, 0, 4])  # groups 0 and 2 differ


def test_imagenet_recipe_follows_the_encoder_size():
    """BEiT v2 / DTM fine-tuning after 300-epoch pretraining (shared/DESIGN.md §2): ViT-B and ViT-L."""
    from eval.recipes import recipe_for

    def values(r):
        return r.lr, r.lr_batch, r.layer_decay, r.drop_path, r.epochs, r.warmup_epochs, r.clip_grad

    assert values(recipe_for("imagenet", 12)) == (5e-4, 1024, 0.65, 0.1, 100, 20, 0.0)
    assert values(recipe_for("imagenet", 24)) == (5e-4, 1024, 0.8, 0.2, 50, 5, 0.0)
    assert recipe_for("cub", 24) == recipe_for("cub", 12)


@pytest.mark.faults_slow
def test_finetune_re_run_with_another_encoder_or_recipe_is_refused(pretrained, tmp_path):
    """A fine-tuning folder records its job and recipe (job.json); a re-run with another encoder or another
    recipe field is refused before anything is written, naming each field; cadence and length may change."""
    import shutil
    import subprocess

    from tests.helpers import ROOT, ds_json, finetune_cmd, run_env

    ds, out = ds_json(tmp_path / "ds.json", 8), tmp_path / "ft"
    common = ("--train_per_class=2", "--eval_per_class=1", "--recipe.epochs=3")
    first = subprocess.run(finetune_cmd(pretrained, ds, out, *common, "--max_epochs=1"), cwd=ROOT, env=run_env(),
                           capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((out / "job.json").read_text())
    assert record["job"]["encoder"] == str(pretrained.resolve()) and record["recipe"]["epochs"] == 3
    other = tmp_path / "other_encoder"
    shutil.copytree(pretrained, other)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for args, said in (
        ((other, "--recipe.lr=0.01"), ["job.encoder: ", "recipe.lr: "]),
        ((pretrained, "--seed=3"), ["job.seed: 0 -> 3"]),
    ):
        refused = subprocess.run(finetune_cmd(args[0], ds, out, *common, args[1]), cwd=ROOT, env=run_env(),
                                 capture_output=True, text=True)  # fmt: skip
        assert refused.returncode == 2 and all(s in refused.stderr for s in said), refused.stderr[-2000:]
        assert "holds a fine-tuning with other settings" in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files  # nothing written
    again = subprocess.run(finetune_cmd(pretrained, ds, out, *common, "--max_epochs=2", "--log_every=3"), cwd=ROOT,
                           env=run_env(), capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["epoch"] == 1  # the second epoch, after the first


def test_finetuning_exports_its_best_classifier_for_timm(pretrained, tmp_path):
    """After an evaluation that is the best so far, ``<output_dir>/best_timm`` is a timm model folder: its logits
    equal those of the classifier rebuilt from the ``best`` DeepSpeed checkpoint, with its head's classes."""
    import subprocess

    import timm

    from eval.classifier import build_classifier
    from tests.helpers import ROOT, ds_json, finetune_cmd, run_env

    out = tmp_path / "ft"
    cmd = finetune_cmd(pretrained, ds_json(tmp_path / "ds.json", 8), out, "--train_per_class=2", "--eval_per_class=1",
                       "--recipe.epochs=1")  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model = timm.create_model(f"local-dir:{out / 'best_timm'}", pretrained=True).eval()
    record = json.loads((out / "best_timm" / "config.json").read_text())
    size = record["pretrained_cfg"]["input_size"][-1]
    states = torch.load(out / "checkpoints" / "best" / "mp_rank_00_model_states.pt", weights_only=True)
    classifier = build_classifier(encoder_config(str(pretrained)), 10, 0.0, size).eval()
    classifier.load_state_dict({k: v.float() for k, v in states["module"].items()})
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), classifier(images), rtol=0, atol=0)
    assert record["num_classes"] == 10 and record["dtm_ds"]["dataset"] == "fmnist"


def test_the_groups_picture_is_titled_and_has_a_legend(pretrained, tmp_path):
    """Each panel's title names its level and the sampled n and k (from the schedule: its row's sum and
    non-zero count); the title strip and the legend strip hold text in every panel's place."""
    import numpy as np
    from PIL import Image

    from dtm_ds.visualize import panel_titles, visualize

    schedule = torch.tensor([[3, 3, 0], [5, 0, 0]])
    assert panel_titles(schedule) == ["input (one row per image)", "level 1: n=6, k=2", "level 2: n=5, k=1"]
    picture = np.asarray(Image.open(visualize(str(pretrained), str(tmp_path / "g.png"), images=2)).convert("L"))
    width = picture.shape[1] // 3
    for column in range(3):
        title = picture[:16, column * width : (column + 1) * width]
        assert (title < 100).sum() > 20 and (title > 250).mean() > 0.5  # dark text on white
    assert (picture[-16:] < 100).sum() > 100  # the legend line


def test_probes_on_two_ranks_equal_one_rank_and_skip_unreadable_images(pretrained, tmp_path):
    """k-NN and the linear probe under torchrun with 2 ranks and sets the world does not divide (21 training,
    12 evaluation images, one of them unreadable): every image is extracted exactly once, the gathered features
    equal one rank's (in the same order, labels as listed), and so do the results; the unreadable file is
    skipped, counted and named, never a traceback; a train and val set that share files is a warning."""
    from data_prep.sources import image_folder
    from tests.conftest import write_class_folder
    from tests.helpers import torchrun_cmd

    write_class_folder(tmp_path / "train", {"a": 7, "b": 6, "c": 8}, size=(40, 40))
    write_class_folder(tmp_path / "val", {"a": 4, "b": 3, "c": 4}, size=(36, 44))
    (tmp_path / "val" / "b" / "zz_cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a jpeg")
    common = ["--encoder", str(pretrained), "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
              "--crop_ratio=1.0", "--workers=0"]  # fmt: skip
    results = {}
    for ranks, launch in ((1, [sys.executable]), (2, torchrun_cmd(29672))):
        for probe in ("knn", "linear"):
            cmd = [*launch, f"eval/{probe}.py", *common, f"--save_features={tmp_path}/{probe}{ranks}.pt"]
            cmd += ["--k", "5"] if probe == "knn" else ["--epochs", "30"]
            done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            assert (
                "zz_cut.jpg is unreadable (OSError: Truncated File Read); skipped" in done.stderr
                and "Traceback" not in done.stderr
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            assert len(lines) == 1, done.stdout  # rank 0 alone prints the result
            results[probe, ranks] = json.loads(lines[0])
    for probe in ("knn", "linear"):
        one, two = results[probe, 1], results[probe, 2]
        assert (one["train"], one["val"], one["unreadable"]) == (21, 11, {"train": 0, "val": 1})
        assert {k: v for k, v in two.items() if k != "ranks"} == {k: v for k, v in one.items() if k != "ranks"}
        a, b = (torch.load(tmp_path / f"{probe}{n}.pt", weights_only=True) for n in (1, 2))
        listed = image_folder(tmp_path / "train")
        assert a["train_y"].tolist() == b["train_y"].tolist() == listed.labels
        assert a["val_y"].tolist() == b["val_y"].tolist() == [0] * 4 + [1] * 3 + [2] * 4
        for key in ("train_x", "val_x"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
        assert a["train_x"].shape == (21, 96) and len(set(map(tuple, a["train_x"].tolist()))) == 21
    assert results["knn", 2]["ranks"] == 2
    same = [sys.executable, "eval/knn.py", *common, "--k", "5"]
    same[same.index(str(tmp_path / "val"))] = str(tmp_path / "train")
    done = subprocess.run(same, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "warning: 21 of the 21 evaluation images are also training images" in done.stderr
