"""The paper's recipes: docs/REPRODUCE.md's tables against every stage's --print_config, the presets'
teachers against their students' grids, and `make reproduce`'s chain end to end at tiny scale."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtm_ds.config import PRESETS, build_config
from dtm_ds.engine import lr_factor
from tests.conftest import write_ade20k, write_class_folder
from tests.helpers import ds_json, run_env

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"ViT-B": "vitb", "ViT-L": "vitl"}
PRINT = {
    "pretrain": ["dtm_ds/train.py", "--ds_config", "ds_configs/zero2_bf16.json", "--print_config", "--model"],
    "finetune": ["eval/finetune.py", "--dataset", "imagenet", "--print_config", "--model"],
    "seg": ["eval/seg/train.py", "--print_config", "--model"],
}


def reproduction_tables() -> dict[str, list[dict[str, str]]]:
    """The tables of docs/REPRODUCE.md, each after its ``<!-- print_config: <stage> -->`` line, as rows."""
    tables, stage = {}, None
    for line in (ROOT / "docs" / "REPRODUCE.md").read_text().splitlines():
        marker = re.fullmatch(r"<!-- print_config: (\w+) -->", line.strip())
        if marker:
            stage, header = marker.group(1), None
            tables[stage] = []
        elif stage and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(cells[0]) <= {"-"}:
                tables[stage].append(dict(zip(header, cells, strict=True)))
        elif stage and tables[stage]:
            stage = None
    return tables


def lookup(settings, field: str):
    for part in field.strip("`").split("."):
        settings = settings[int(part)] if isinstance(settings, list) else settings[part]
    return settings


@pytest.mark.parametrize("stage", sorted(PRINT))
def test_print_config_matches_the_reproduction_table(stage):
    rows = reproduction_tables()[stage]
    assert len(rows) >= {"pretrain": 30, "finetune": 20, "seg": 12}[stage]
    for column, preset in SIZES.items():
        cmd = [sys.executable, *PRINT[stage], preset]
        done = subprocess.run(cmd, cwd=ROOT, env=run_env() | {"WORLD_SIZE": "8"}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        settings = json.loads(done.stdout[done.stdout.index("{") :])  # --print_config: JSON only, no data read
        for row in rows:
            want, got = json.loads(row[column]), lookup(settings, row["field"])
            if isinstance(want, float) or isinstance(got, float):
                assert got == pytest.approx(want, rel=1e-12), (stage, preset, row["setting"], got)
            else:
                assert got == want, (stage, preset, row["setting"], got)


def test_every_preset_teacher_fits_its_student_grid():
    """A CLIP teacher's token grid (its open_clip config: image size / patch size) is the student's; vith
    takes CLIP ViT-L/14 (16x16 at 224 px), since CLIP-B/16's 14x14 would not fit ViT-H/14."""
    import open_clip

    for preset in PRESETS:
        config = build_config(preset)
        kind, _, name = config.teacher.name.partition(":")
        if kind != "clip":
            continue
        vision = open_clip.get_model_config(name)["vision_cfg"]
        assert vision["image_size"] == config.model.img_size, preset
        assert vision["image_size"] // vision["patch_size"] == config.model.grid, preset
    assert build_config("vith").teacher.name == "clip:ViT-L-14" and build_config("vith").model.grid == 16


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _inat18(root: Path, per_class: int) -> Path:
    """A tiny iNaturalist 2018 root (train2018.json / val2018.json and the images they name)."""
    from PIL import Image

    from tests.conftest import texture

    cats = [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}]
    for split, n in (("train", per_class), ("val", 2)):
        images, annos = [], []
        for i in range(2 * n):
            cat = cats[i % 2]["id"]
            name = f"train_val2018/Plantae/{cat}/{split}{i}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(texture(40, 40, seed=1000 * cat + i)).save(root / name)
            images.append({"id": 100 + i, "file_name": name, "width": 40, "height": 40})
            annos.append({"id": i, "image_id": 100 + i, "category_id": cat})
        (root / f"{split}2018.json").write_text(
            json.dumps({"images": images, "annotations": annos, "categories": cats})
        )
    return root


def test_reproduce_chain_end_to_end_and_resumable(tmp_path):
    """``make reproduce`` at tiny scale on CPU: pretraining -> ImageNet fine-tuning with its recipe's parts on
    (Mixup/CutMix and soft-target CE, RandAugment, pixel-noise erasing, the layer-decay ladder, warm-up +
    cosine) -> an iNaturalist transfer -> ADE20K; results.md; a re-run skips every stage and writes nothing."""
    imagenet = tmp_path / "imagenet"
    write_class_folder(imagenet / "train", {"n01": 16, "n02": 16}, size=(40, 40))
    write_class_folder(imagenet / "val", {"n01": 4, "n02": 4}, size=(40, 40), seed=7)
    ade = write_ade20k(tmp_path / "ADEChallengeData2016", n_train=4, n_val=2)
    out = tmp_path / "chain"
    seg = "--crop 32 --batch_size 4 --max_iters 2 --warmup_iters 1 --val_interval 2 --workers 0"
    finetune = ("--recipe.batch_size=8 --recipe.epochs=2 --recipe.warmup_epochs=1 --recipe.img_size=32 "
                "--recipe.crop_pct=1.0 --workers 0 --log_every 1")  # fmt: skip
    cmd = [sys.executable, "eval/reproduce.py", "--model", "tiny", "--data", str(imagenet), "--launcher", "python",
           "--ds_config", ds_json(tmp_path / "ds.json", 8), "--out", str(out), "--ade20k", str(ade),
           "--inat18", str(_inat18(tmp_path / "inat", 16)),
           "--pretrain_args=--max_steps 3 --data.workers=1 --run.log_every=1 --run.vis_every=0",
           f"--finetune_args={finetune}",
           f"--seg_args={seg}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for stage in ("pretrain", "imagenet", "inat18", "ade20k"):
        assert (out / stage / "done.json").is_file(), stage
    assert (out / "data" / "imagenet_train.beton").is_file()
    pretrain = json.loads((out / "pretrain" / "done.json").read_text())
    assert pretrain["done"] is True and pretrain["step"] == 3
    imagenet_result = json.loads((out / "imagenet" / "done.json").read_text())
    assert imagenet_result["done"] is True and imagenet_result["epoch"] == 1 and imagenet_result["eval_images"] == 8
    results = (out / "results.md").read_text()
    assert f"| imagenet | imagenet top-1 (best) | {imagenet_result['best_top1']:.4g} | – |" in results
    assert (
        "| pretrain | final loss (step 3) |" in results and "| inat18 |" in results and "| ade20k | mIoU |" in results
    )
    _check_imagenet_schedule(out / "imagenet", build_config("tiny").model.depth)
    log = (out / "imagenet" / "log.txt").read_text()
    assert "peak lr 3.90625e-06 = recipe.lr 0.0005 x global batch 8 / recipe.lr_batch 1024" in log

    before = _mtimes(out)
    again = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("skipped") == 4 and (out / "results.md").read_text() == results
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if not k.endswith("results.md")} == {
        k: v for k, v in before.items() if not k.endswith("results.md")
    }


def _ft_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _check_imagenet_schedule(folder: Path, depth: int) -> None:
    """Every logged step: the groups' lrs are the layer-decay ladder times the head's lr, and the head's
    lr is warm-up then cosine (4 steps per epoch, 2 epochs, 1 warm-up epoch)."""
    peak, floor, ladder = 5e-4 * 8 / 1024, 1e-6, {0.65 ** (depth + 1 - i) for i in range(depth + 2)}
    rows = _ft_rows(folder)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for row in rows:
        step = row["step"] - 1  # applied steps before this one
        want = (
            peak * (step + 1) / 4
            if step < 4
            else floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - 4) / 4))
        )
        assert row["lr"] == pytest.approx(want, rel=1e-9)
        assert row["lr"] == pytest.approx(peak * lr_factor(step, 8, 4, floor / peak), rel=1e-12)
        scales = {round(lr / row["lr"], 12) for lr in row["lr_groups"]}
        assert scales == {round(s, 12) for s in ladder}, (row["step"], sorted(scales))
