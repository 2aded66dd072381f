"""ADE20K segmentation (eval/seg): the mmcv-lite shim, the DTMBEiT backbone and its weight transfer,
mmseg's layer-decay groups, training/eval/resume through mmengine, overfitting, bad input."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval.seg  # noqa: F401  (shim first)
from dtm_ds.pretrained import TIMM_ARCHITECTURE, export, load_student, timm_args
from eval.seg import mmcv_compat
from eval.seg.backbone import DTMBEiT, default_out_indices
from eval.seg.data import CheckSegLabels, check_ade20k
from eval.seg.train import build_cfg
from tests.conftest import write_ade20k
from tests.helpers import ROOT, run_env

SEG = [sys.executable, "eval/seg/train.py", "--workers", "0", "--log_interval", "1"]


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return write_ade20k(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016", n_train=6, n_val=3)


def _run(*args, check=True):
    done = subprocess.run([*SEG, *map(str, args)], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _evals(out):
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def test_mmcv_lite_shim():
    import mmseg.models  # noqa: F401  (fails on mmcv-lite without the shim)
    from mmcv.ops import point_sample, sigmoid_focal_loss

    assert sys.modules["mmcv.ops"].__dtm_compat__ and not mmcv_compat.install()  # once only
    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    centre_of_pixel_5 = torch.tensor([[[1.5 / 4, 1.5 / 4]]])  # (x, y) in [0, 1]
    assert point_sample(fmap, centre_of_pixel_5).item() == pytest.approx(5.0)
    with pytest.raises(mmcv_compat.CompiledOpError, match="sigmoid_focal_loss needs mmcv's compiled ops"):
        sigmoid_focal_loss(torch.zeros(1), torch.zeros(1))


def test_the_config_header_states_the_config_values():
    """The header of the shipped mmseg config names the recipe its optimiser holds."""
    import re

    text = (ROOT / "eval" / "seg" / "configs" / "upernet_dtm_ade20k.py").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    lr = float(re.search(r"lr ([0-9.e-]+),", header).group(1))
    decay = float(re.search(r"layer decay ([0-9.]+)", header).group(1))
    held = [float(re.search(pattern, text).group(1)) for pattern in (r"\blr=([0-9.e-]+)", r"decay_rate=([0-9.]+)")]
    assert [lr, decay] == held
    assert (lr, decay) == (5e-5, 0.75)  # BEiT v2's ViT-B ADE20K recipe (DESIGN.md §2)


def test_out_indices_scale_with_depth():
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("source", ["run", "export"])
def test_backbone_loads_a_dtm_checkpoint(pretrained, tmp_path, source):
    encoder = str(pretrained) if source == "run" else export(str(pretrained), str(tmp_path / "enc"))
    backbone = DTMBEiT(encoder=encoder, img_size=64, drop_path_rate=0.0).eval()
    student = load_student(pretrained)
    torch.testing.assert_close(backbone.layers[1].mlp.fc2.weight, student.blocks[1].mlp.fc2.weight, rtol=0, atol=0)
    torch.testing.assert_close(backbone.patch_embed.proj.weight, student.patch_embed.proj.weight, rtol=0, atol=0)
    grid = 64 // 4  # tiny preset: patch 4; tables resized from the 8x8 pretraining window to 16x16
    assert backbone.layers[0].attn.relative_position_bias_table.shape[0] == (2 * grid - 1) ** 2 + 3
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in feats] == [(2, 96, 16, 16)] * 4
    # a smaller slide window is padded to the table's window and the maps cropped back
    small = backbone(torch.randn(1, 3, 40, 24))
    assert [f.shape[-2:] for f in small] == [(10, 6)] * 4
    with pytest.raises(ValueError, match="larger than the window 64"):
        backbone(torch.randn(1, 3, 80, 64))


def test_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        DTMBEiT(encoder=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="exactly one of encoder"):
        DTMBEiT()
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        DTMBEiT(arch="tiny", img_size=30)
    with pytest.raises(ValueError, match="out_indices"):
        DTMBEiT(arch="tiny", img_size=32, out_indices=[0, 9])


def test_layer_decay_groups_and_init_keep_pretrained_weights(pretrained, ade, tmp_path):
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = build_cfg(str(ade), str(tmp_path), encoder=str(pretrained), crop=32, lr=1e-3, layer_decay=0.5)
    model = MODELS.build(cfg.model)
    model.init_weights()  # the runner calls this: it must not touch the transferred encoder
    student = load_student(pretrained)
    torch.testing.assert_close(model.backbone.layers[3].attn.qkv.weight, student.blocks[3].attn.qkv.weight)

    groups = build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}  # each in exactly one
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    depth = len(model.backbone.layers)
    ladder = [lr_of["backbone.patch_embed.proj.weight"]]
    ladder += [lr_of[f"backbone.layers.{i}.mlp.fc1.weight"] for i in range(depth)]
    ladder += [lr_of["decode_head.conv_seg.weight"]]
    expected = [1e-3 * 0.5 ** (depth + 1 - i) for i in range(depth + 2)]
    np.testing.assert_allclose(ladder, expected, rtol=1e-9)  # embeddings 0.5^5 ... heads 1.0
    decay = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    assert decay["backbone.layers.0.mlp.fc1.bias"] == 0 and decay["backbone.layers.0.mlp.fc1.weight"] == 0.05


def test_train_evaluate_and_resume(pretrained, ade, tmp_path):
    out = tmp_path / "seg"
    common = ("--data", ade, "--output_dir", out, "--encoder", pretrained, "--crop", 32, "--batch_size", 2)
    first = _run(*common, "--max_iters", 2, "--warmup_iters", 1, "--val_interval", 2, "--checkpoint_interval", 1)
    assert "DTMBEiT: loaded" in first.stdout + first.stderr
    (row,) = _evals(out)
    assert row["iter"] == 2 and 0 <= row["mIoU"] <= 100 and 0 <= row["aAcc"] <= 100
    assert (out / "iter_2.pth").is_file() and list(out.glob("*/vis_data/events.out.tfevents*"))
    resumed = _run(*common, "--max_iters", 3, "--warmup_iters", 1, "--val_interval", 3, "--checkpoint_interval", 1)
    assert "resumed epoch: 0, iter: 2" in resumed.stdout + resumed.stderr
    assert [r["iter"] for r in _evals(out)] == [2, 3]
    tested = _run("--data", ade, "--output_dir", tmp_path / "test", "--encoder", pretrained, "--crop", 32,
                  "--test_only", "--checkpoint", out / "iter_3.pth", "--multi_scale")  # fmt: skip
    assert "mIoU" in tested.stdout + tested.stderr and _evals(tmp_path / "test")[0]["phase"] == "test"


@pytest.mark.faults_slow  # training is also run by test_train_evaluate_and_resume
def test_overfits_a_tiny_set(tmp_path):
    root = write_ade20k(tmp_path / "ADEChallengeData2016", n_train=8, n_val=1)
    for kind in ("images", "annotations"):  # evaluate on the training images
        shutil.rmtree(root / kind / "validation")
        shutil.copytree(root / kind / "training", root / kind / "validation")
    common = ("--data", root, "--model", "tiny", "--crop", 32, "--batch_size", 4, "--lr", 1e-3)
    _run(*common, "--output_dir", tmp_path / "start", "--max_iters", 2, "--warmup_iters", 1)  # lr ~1e-9: the init
    _run(*common, "--output_dir", tmp_path / "seg", "--max_iters", 60, "--warmup_iters", 5, "--val_interval", 20)
    start = _evals(tmp_path / "start")[0]["mIoU"]
    trained = [r["mIoU"] for r in _evals(tmp_path / "seg")]
    assert len(trained) == 3 and trained[-1] > start + 25 and trained[-1] > 45, (start, trained)


def test_bad_input(ade, tmp_path):
    with pytest.raises(FileNotFoundError, match="ADE20K root .*missing does not exist"):
        check_ade20k(tmp_path / "missing")
    bad = tmp_path / "bad" / "ADEChallengeData2016"
    shutil.copytree(ade, bad)
    assert check_ade20k(bad) == {"train": 6, "val": 3}
    first = sorted((bad / "annotations" / "training").glob("*.png"))[0]
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(first)
    with pytest.raises(ValueError, match=r"1 annotations hold values above 150 .*ADE_train_00000000.png', 200"):
        check_ade20k(bad)
    with pytest.raises(ValueError, match="values \\[200\\] are outside 0..150"):
        CheckSegLabels()({"gt_seg_map": np.full((4, 4), 199, np.uint8), "seg_map_path": str(first)})
    first.unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 images .* have no annotation"):
        check_ade20k(bad)
    done = _run("--data", tmp_path / "missing", "--model", "tiny", check=False)
    assert done.returncode != 0 and "ADE20K root" in done.stderr and "Iter(train)" not in done.stdout


@pytest.mark.ranks(2)
def test_two_process_run_through_torchrun(ade, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *SEG[1:], "--launcher", "pytorch",
           "--data", ade, "--output_dir", out, "--model", "tiny", "--crop", 32, "--batch_size", 4, "--max_iters", 2,
           "--warmup_iters", 1]  # fmt: skip
    done = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Distributed training: True" in done.stdout + done.stderr and _evals(out)[0]["iter"] == 2


@pytest.mark.parametrize(("arch", "expected"), [("vitb", (5e-5, 0.75, 0.15, 12)), ("vitl", (4e-5, 0.9, 0.2, 24))])
def test_ade20k_recipe_follows_the_encoder_size(ade, tmp_path, arch, expected):
    """BEiT v2's UperNet configs per size (upernet_beit_{base_12,large_24}_512_slide_160k_ade20k.py)."""
    cfg = build_cfg(str(ade), str(tmp_path), model=arch)
    found = (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.paramwise_cfg.decay_rate,
             cfg.model.backbone.drop_path_rate, cfg.optim_wrapper.paramwise_cfg.num_layers)  # fmt: skip
    assert found == expected
    assert cfg.model.test_cfg["stride"] == (341, 341) and cfg.train_dataloader.batch_size == 16
    assert "clip_grad" not in cfg.optim_wrapper and cfg.param_scheduler[0]["end"] == 1500
    assert build_cfg(str(ade), str(tmp_path), model=arch, lr=1e-3).optim_wrapper.optimizer.lr == 1e-3  # overridable


def test_a_folded_export_loads_into_mmseg_stock_beit_and_timm_with_the_same_features(pretrained, tmp_path):
    """``export --fold``: one relative position table per block (its own plus the shared one). timm loads the folder
    with no argument; mmseg's own ``BEiT`` backbone, through its stock ``init_cfg=Pretrained`` path, finds every
    one of its weights in ``mmseg_beit.pth`` (nothing missing but its index buffers, nothing unexpected). With
    every table of the student drawn at random (a 2-step run's are still near their zero init), both compute the
    student's features: timm its pooled output, mmseg its last-block patch tokens (mmseg's attention code)."""
    import timm
    from mmseg.models.backbones import BEiT

    from dtm_ds.features import _pooled
    from dtm_ds.pretrained import MMSEG_FILE, encoder_config, fold_shared_table, mmseg_beit_state

    folder = tmp_path / "folded"
    subprocess.run([sys.executable, "-m", "dtm_ds", "export", str(pretrained), str(folder), "--fold"], check=True,
                   cwd=ROOT, env=run_env(), capture_output=True)  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", MMSEG_FILE, "model.safetensors"]
    model = encoder_config(pretrained)
    assert model.rel_pos_bias == "both" and encoder_config(folder).rel_pos_bias == "block"
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).rel_pos_bias is None  # per block only

    def mmseg_beit(weights: Path) -> BEiT:
        backbone = BEiT(img_size=model.img_size, patch_size=model.patch_size, embed_dims=model.embed_dim,
                        num_layers=model.depth, num_heads=model.num_heads, mlp_ratio=int(model.mlp_ratio),
                        init_values=model.layer_scale, final_norm=False, out_indices=model.depth - 1,
                        init_cfg=dict(type="Pretrained", checkpoint=str(weights)))  # fmt: skip
        saved = torch.load(weights, weights_only=True)["state_dict"]
        missing, unexpected = backbone.load_state_dict(saved, strict=False)
        assert unexpected == [] and missing and all(k.endswith("relative_position_index") for k in missing)
        backbone.apply(lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, torch.nn.Linear) else None)
        backbone.init_weights()  # mmseg's own loading path puts every weight back
        backbone.eval()  # (mmseg's BEiT.train returns None)
        return backbone

    student = load_student(folder).eval()  # the folded export read back as a dtm_ds encoder
    backbone = mmseg_beit(folder / MMSEG_FILE)
    torch.testing.assert_close(backbone.layers[0].ffn.layers[1].weight, student.blocks[0].mlp.fc2.weight)

    student = load_student(pretrained).eval()
    generator = torch.Generator().manual_seed(0)
    for name, table in student.named_parameters():
        if name.endswith("relative_position_bias_table"):
            table.data = torch.randn(table.shape, generator=generator)
    folded = fold_shared_table(student.encoder_state_dict(), model.depth)
    torch.save({"state_dict": mmseg_beit_state(folded)}, tmp_path / "random_tables.pth")
    timm_model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False,
                                   **timm_args(dataclasses.replace(model, rel_pos_bias="block"))).eval()  # fmt: skip
    timm_model.load_state_dict(folded)
    images = torch.randn(2, 3, model.img_size, model.img_size, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(images), _pooled(student, images, 1), rtol=1e-5, atol=1e-5)
        (theirs,) = mmseg_beit(tmp_path / "random_tables.pth")(images)
        ours = student.forward_intermediates(images, indices=[model.depth - 1], norm=False, output_fmt="NCHW",
                                             intermediates_only=True)[0]  # fmt: skip
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
