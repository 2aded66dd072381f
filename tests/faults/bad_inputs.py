"""The bad-input table: every user-facing command fed wrong paths, empty folders, corrupt files, missing
images, wrong class counts, wrong teacher weights and inconsistent DeepSpeed JSON.

    python -m tests.faults.bad_inputs --pretrained RUN_DIR --out cases.json [--markdown]

Runs every case in this one process (imports are paid once), calling each command's ``main``/``convert``
exactly as its command line does, and records the exception, its message and the seconds until it was
raised. tests/faults/test_bad_input.py asserts the result; ``--markdown`` prints the README table.
"""

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.conftest import write_ade20k, write_class_folder


def _ds(path: Path, **fields) -> str:
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}} | fields))
    return str(path)


def cases(tmp: Path, pretrained: str) -> list[tuple[str, str, object, str]]:
    """(command, bad input, thunk, text the error must contain)."""
    from data_prep.write_ffcv import convert
    from dtm_ds.train import main as pretrain
    from eval.finetune import main as finetune
    from eval.knn import main as knn
    from eval.linear import main as linear
    from eval.seg.train import main as segment

    imgs = tmp / "imgs"
    write_class_folder(imgs, {"a": 8, "b": 8}, size=(40, 40))
    (tmp / "empty").mkdir()
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    for i in range(4):
        (corrupt / "x").mkdir(exist_ok=True)
        (corrupt / "x" / f"{i}.jpg").write_bytes(b"not a jpeg")
    (tmp / "list.txt").write_text(f"{imgs}/a/000.jpg 0\n{tmp}/gone.jpg 1\n")
    (tmp / "junk.beton").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp / "junk.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    good_ds = _ds(tmp / "ds.json")
    run = str(tmp / "run")
    pre = dict(ds_config=good_ds, model="tiny", output_dir=run, max_steps=2)
    data = {"data.path": str(imgs), "data.workers": 0}
    torch.save({"blocks.0.nonsense": torch.zeros(3)}, tmp / "wrong_teacher.pt")
    whole = (tmp / "wrong_teacher.pt").read_bytes()
    (tmp / "cut_teacher.pt").write_bytes(whole[: len(whole) // 2])  # a download cut short
    (tmp / "empty_teacher.pt").write_bytes(b"")
    (tmp / "page_teacher.pt").write_text("<!DOCTYPE html>\n<html><body>Sign in to download</body></html>\n")
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return (i,)

    DatasetWriter(str(tmp / "numbers.beton"), {"number": IntField()}, num_workers=1).from_indexed_dataset(Numbers())
    cub = tmp / "CUB_200_2011"  # images.txt lists an image that is not there
    (cub / "images" / "001.A").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cub / "images" / "001.A" / "a.jpg")
    (cub / "images.txt").write_text("1 001.A/a.jpg\n2 001.A/missing.jpg\n")
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n")
    (cub / "classes.txt").write_text("1 001.A\n")
    cub_labels = tmp / "cub_labels"  # a label beyond classes.txt
    import shutil

    shutil.copytree(cub, cub_labels)
    (cub_labels / "images.txt").write_text("1 001.A/a.jpg\n")
    (cub_labels / "image_class_labels.txt").write_text("1 7\n")
    (cub_labels / "train_test_split.txt").write_text("1 1\n")
    ade = write_ade20k(tmp / "ade" / "ADEChallengeData2016", 2, 1)
    bad_ade = tmp / "bad_ade" / "ADEChallengeData2016"
    shutil.copytree(ade, bad_ade)
    next((bad_ade / "annotations" / "validation").glob("*.png")).unlink()

    fm = dict(dataset="fmnist", data="fashion_mnist", ds_config=good_ds, output_dir=str(tmp / "ft"), workers=0)
    fm["recipe.batch_size"] = 8
    return [
        ("data_prep.write_ffcv", "source folder does not exist", lambda: convert(str(tmp / "nope"), str(tmp / "o.beton")), "nope does not exist (expected an image folder"),
        ("data_prep.write_ffcv", "empty source folder", lambda: convert(str(tmp / "empty"), str(tmp / "o.beton")), "empty has no class sub-folders"),
        ("data_prep.write_ffcv", "every image corrupt (over --max_bad)", lambda: convert(str(corrupt), str(tmp / "o.beton")), "4 of 4 images are unreadable (100.0% > max_bad=1.0%)"),
        ("data_prep.write_ffcv", "list file names a missing image", lambda: convert(str(tmp / "list.txt"), str(tmp / "o.beton"), max_bad=0), "gone.jpg: FileNotFoundError"),
        ("data_prep.write_ffcv", "unknown --dataset", lambda: convert(str(imgs), str(tmp / "o.beton"), dataset="cubb"), "unknown dataset 'cubb'"),
        ("dtm_ds/train.py", "unknown model preset", lambda: pretrain(**(pre | {"model": "vitx"})), "unknown model preset 'vitx'"),
        ("dtm_ds/train.py", "unknown config key", lambda: pretrain(**pre, **{"optim.lrr": 1.0}), "unknown config keys ['optim.lrr']; 'optim.lrr': did you mean 'optim.lr'?"),
        ("dtm_ds/train.py", "DeepSpeed JSON missing", lambda: pretrain(**(pre | {"ds_config": str(tmp / "no.json")}), **data), "no.json does not exist (see ds_configs/)"),
        ("dtm_ds/train.py", "DeepSpeed JSON not JSON", lambda: pretrain(**(pre | {"ds_config": str(tmp / "list.txt")}), **data), "list.txt is not valid JSON"),
        ("dtm_ds/train.py", "train_batch_size != micro x accum x world", lambda: pretrain(**(pre | {"ds_config": _ds(tmp / "b.json", train_batch_size=24)}), **data), "b.json = 24 but micro batch 8 x accumulation 1 x world 1 = 8"),
        ("dtm_ds/train.py", "--optim.batch_size disagrees with the JSON", lambda: pretrain(**pre, **data, **{"optim.batch_size": 64}), "optim.batch_size = 64"),
        ("dtm_ds/train.py", "data path does not exist", lambda: pretrain(**pre, **{"data.path": str(tmp / "none")}), "none does not exist (expected an image folder"),
        ("dtm_ds/train.py", ".beton missing (ffcv backend)", lambda: pretrain(**pre, **{"data.path": str(tmp / "none.beton"), "data.backend": "ffcv"}), "none.beton does not exist (convert one with"),
        ("dtm_ds/train.py", "corrupt .beton", lambda: pretrain(**pre, **{"data.path": str(tmp / "junk.beton"), "data.backend": "ffcv"}), "junk.beton is not a readable FFCV .beton"),
        ("dtm_ds/train.py", ".beton given to the torchvision backend", lambda: pretrain(**pre, **{"data.path": str(tmp / "junk.beton")}), "--data.backend=ffcv"),
        ("dtm_ds/train.py", "binary file as a list file", lambda: pretrain(**pre, **{"data.path": str(tmp / "junk.bin")}), "junk.bin is not a text list file"),
        ("dtm_ds/train.py", "batch larger than the dataset", lambda: pretrain(**(pre | {"ds_config": _ds(tmp / "big.json", train_micro_batch_size_per_gpu=32)}), **data), "the global batch (32 per rank x accumulation 1 x 1 ranks) is larger than the 16 samples"),
        ("dtm_ds/train.py", "teacher weights file missing", lambda: pretrain(**pre, **data, **{"teacher.name": "timm:vit_tiny_patch16_224", "teacher.weights": str(tmp / "no.pt")}), "no.pt does not exist"),
        ("dtm_ds/train.py", "teacher weights of another model", lambda: pretrain(**pre, **data, **{"teacher.name": "timm:vit_tiny_patch16_224", "teacher.weights": str(tmp / "wrong_teacher.pt")}), "wrong_teacher.pt do not fit teacher timm:vit_tiny_patch16_224"),
        ("dtm_ds/train.py", "teacher weights: random bytes", lambda: pretrain(**pre, **data, **{"teacher.name": "timm:vit_tiny_patch16_224", "teacher.weights": str(tmp / "junk.bin")}), "junk.bin (4096 bytes) is not a readable torch state dict"),
        ("dtm_ds/train.py", "teacher weights: random bytes (CLIP)", lambda: pretrain(**pre, **data, **{"teacher.name": "clip:ViT-B-16", "teacher.weights": str(tmp / "junk.bin")}), "junk.bin (4096 bytes) is not a readable torch state dict"),
        ("dtm_ds/train.py", "teacher weights: a cut download", lambda: pretrain(**pre, **data, **{"teacher.name": "timm:vit_tiny_patch16_224", "teacher.weights": str(tmp / "cut_teacher.pt")}), "cut_teacher.pt ("),
        ("dtm_ds/train.py", "teacher weights: an empty file", lambda: pretrain(**pre, **data, **{"teacher.name": "timm:vit_tiny_patch16_224", "teacher.weights": str(tmp / "empty_teacher.pt")}), "empty_teacher.pt is empty"),
        ("dtm_ds/train.py", "teacher weights: an HTML page", lambda: pretrain(**pre, **data, **{"teacher.name": "clip:ViT-B-16", "teacher.weights": str(tmp / "page_teacher.pt")}), "page_teacher.pt is a web page (HTML)"),
        ("dtm_ds/train.py", ".beton of another field layout", lambda: pretrain(**pre, **{"data.path": str(tmp / "numbers.beton"), "data.backend": "ffcv"}), "holds the fields {'number': 'IntField'}"),
        ("dtm_ds/train.py", "output folder behind a file", lambda: pretrain(**(pre | {"output_dir": str(tmp / "list.txt" / "run")}), **data), "list.txt is a file"),
        ("dtm_ds/train.py", "--max_steps 0", lambda: pretrain(**(pre | {"max_steps": 0}), **data), "run.max_steps=0 (at least 1, or unset"),
        ("dtm_ds/train.py", "--max_steps -1", lambda: pretrain(**(pre | {"max_steps": -1}), **data), "run.max_steps=-1 (at least 1"),
        ("dtm_ds/train.py", "zero intervals and keep_last, no timeout", lambda: pretrain(**pre, **data, **{"run.save_every": 0, "run.log_every": 0, "run.keep_last": 0, "run.dist_timeout_s": 0}), "run.save_every=0 (at least 1); run.keep_last=0 (at least 1); run.log_every=0 (at least 1); run.dist_timeout_s=0"),
        ("dtm_ds/train.py", "unknown teacher kind", lambda: pretrain(**pre, **data, **{"teacher.name": "dino:vit"}), "got 'dino:vit'"),
        ("eval/finetune.py", "unknown dataset", lambda: finetune(pretrained, **(fm | {"dataset": "cifar"})), "--dataset 'cifar' is not a recipe"),
        ("eval/finetune.py", "encoder path does not exist", lambda: finetune(str(tmp / "no_run"), **fm), "no_run"),
        ("eval/finetune.py", "dataset root does not exist", lambda: finetune(pretrained, **(fm | {"dataset": "cub", "data": str(tmp / "no_cub")})), "cub root"),
        ("eval/finetune.py", "images listed but missing (CUB)", lambda: finetune(pretrained, **(fm | {"dataset": "cub", "data": str(cub)})), "1 listed images are absent, e.g."),
        ("eval/finetune.py", "label beyond the class list (CUB)", lambda: finetune(pretrained, **(fm | {"dataset": "cub", "data": str(cub_labels)})), "class index 6 (0-based; valid 0..0)"),
        ("eval/finetune.py", "zero epochs, keep_last and log interval", lambda: finetune(pretrained, **fm, max_epochs=0, keep_last=0, log_every=0), "--keep_last=0 (at least 1); --log_every=0 (at least 1); --max_epochs=0 (at least 1)"),
        ("eval/finetune.py", "unknown option", lambda: finetune(pretrained, **fm, epochz=3), "'epochz': did you mean 'recipe.epochs'?"),
        ("eval/finetune.py", "recipe batch != DeepSpeed JSON", lambda: finetune(pretrained, **(fm | {"recipe.batch_size": 100})), "recipe.batch_size = 100 but micro batch 8 x accumulation 1 x world 1 = 8"),
        ("eval/knn.py", "a .beton as the train set", lambda: knn(pretrained, train=str(tmp / "junk.beton"), val="fashion_mnist"), "which only pretraining reads (with --data.backend=ffcv); give this command the images"),
        ("eval/knn.py", "encoder path does not exist", lambda: knn(str(tmp / "no_run"), train="fashion_mnist", val="fashion_mnist", dataset="fmnist"), "no_run"),
        ("eval/linear.py", "more blocks than the encoder has", lambda: linear(pretrained, train="fashion_mnist", val="fashion_mnist", blocks=9), "blocks = 9, but"),
        ("eval/seg/train.py", "ADE20K root does not exist", lambda: segment(str(tmp / "no_ade"), model="tiny"), "no_ade does not exist; expected .../ADEChallengeData2016"),
        ("eval/seg/train.py", "validation image without annotation", lambda: segment(str(bad_ade), model="tiny"), "have no annotation"),
        ("eval/seg/train.py", "crop not a multiple of the patch", lambda: segment(str(ade), model="tiny", crop=30, output_dir=str(tmp / "seg")), "crop 30 must be a multiple of the patch size 4"),
        ("eval/seg/train.py", "--test_only without a checkpoint", lambda: segment(str(ade), model="tiny", test_only=True, output_dir=str(tmp / "seg")), "--test_only needs --checkpoint="),
    ]  # fmt: skip


def run_all(pretrained: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for command, bad, thunk, expect in cases(Path(tmp), pretrained):
            start = time.perf_counter()
            try:
                thunk()
                error, message = None, ""
            except (Exception, SystemExit) as e:  # noqa: BLE001 (recording what each command raises)
                error, message = type(e).__name__, str(e)
                if not message.strip():
                    message = traceback.format_exc(limit=2)
            steps = Path(tmp, "run", "metrics.jsonl").exists() or Path(tmp, "ft", "metrics.jsonl").exists()
            rows.append(
                {
                    "command": command,
                    "input": bad,
                    "error": error,
                    "message": message,
                    "expect": expect,
                    "seconds": round(time.perf_counter() - start, 2),
                    "trained": steps,
                }  # fmt: skip
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| command | bad input | error |", "|---|---|---|"]
    for r in rows:
        text = " ".join(r["message"].split()).replace("|", "\\|")
        lines.append(f"| `{r['command']}` | {r['input']} | {r['error']}: {text[:220]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import fire

    def main(pretrained: str, out: str, markdown_table: bool = False):
        rows = run_all(pretrained)
        Path(out).write_text(json.dumps(rows, indent=1))
        if markdown_table:
            print(markdown(rows))

    sys.exit(fire.Fire(main, serialize=lambda _: None))
