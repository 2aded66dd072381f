"""The paper's chain in one command: pretraining -> ImageNet-1K fine-tuning -> ADE20K -> transfers.

    python eval/reproduce.py --model vitb --data /data/imagenet --teacher_weights ViT-B-16.pt --ngpus 8
        [--ade20k /data/ADEChallengeData2016] [--inat18 /data/inat2018] [--cub /data/CUB_200_2011] ...
    (make reproduce MODEL=vitb DATA=... TEACHER_WEIGHTS=... runs this)

Every stage is the repository's own entrypoint with the recipes of docs/REPRODUCE.md, run as a
subprocess; its output is shown and kept in ``<out>/<stage>/log.txt``. A finished stage writes
``<out>/<stage>/done.json`` and a re-run skips it; an interrupted stage resumes from its own
checkpoints. ``<out>/results.md`` puts our numbers beside the paper's after every stage.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dtm_ds.files import ROOT, write_atomic

PAPER = {
    ("imagenet", "vitb"): 85.4,
    ("imagenet", "vitl"): 86.7,
}
"""Published top-1 (docs/REPRODUCE.md: ImageNet-1K fine-tuning after 300-epoch pretraining, CLIP-B/16 teacher)."""
TRANSFERS = ("inat18", "inat19", "cub", "cars", "aircraft", "flowers", "pets")


def main(
    data: str,
    model: str = "vitb",
    teacher_weights: str | None = None,
    out: str | None = None,
    ngpus: int = 1,
    hostfile: str | None = None,
    launcher: str = "deepspeed",
    ds_config: str | None = None,
    ade20k: str | None = None,
    pretrain_args: str = "",
    finetune_args: str = "",
    seg_args: str = "",
    **transfers: str,
) -> dict:
    """Run every stage not yet done and write results.md; more options: --inat18, --inat19, --cub, --cars,
    --aircraft, --flowers, --pets (dataset roots for the transfers).

    Args:
        data: the ImageNet-1K root (train/, val/); pretraining reads <out>/data/imagenet_train.beton, written once.
        model: the preset (vitb, vitl; any of dtm_ds/config.py's).
        teacher_weights: the CLIP weights file of the preset's teacher (not needed by the pixels teacher).
        out: the chain's folder (default outputs/reproduce_<model>).
        ngpus: processes per node.
        hostfile: a DeepSpeed hostfile for several nodes.
        launcher: 'deepspeed' (GPUs) or 'python' (one process, e.g. CPU).
        ds_config: DeepSpeed JSON of pretraining and fine-tuning (the recipes' batches must agree with it);
            default: each stage's own for this machine (GPU: ds_configs/zero2_bf16.json; CPU: ds_configs/cpu.json).
        ade20k: the ADEChallengeData2016 root; without it the ADE20K stage is skipped.
        pretrain_args: more dtm_ds/train.py options, as one string.
        finetune_args: more eval/finetune.py options for every fine-tuning stage.
        seg_args: more eval/seg/train.py options.
    """
    unknown = sorted(set(transfers) - set(TRANSFERS))
    if unknown:
        raise ValueError(f"unknown options {unknown}; the transfers are {list(TRANSFERS)} (--help lists every option)")
    if launcher not in ("deepspeed", "python"):
        raise ValueError(f"--launcher must be 'deepspeed' or 'python', got {launcher!r}")
    if not (Path(data) / "train").is_dir():
        raise FileNotFoundError(f"--data {data}: expected an ImageNet root with train/ and val/")
    for name, path in [("teacher_weights", teacher_weights), ("ade20k", ade20k), *transfers.items()]:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{name} {path} does not exist")
    out_dir = Path(out or f"outputs/reproduce_{model}")
    run = Chain(out_dir, launcher, ngpus, hostfile)

    beton = out_dir / "data" / "imagenet_train.beton"
    if not beton.is_file():  # write_ffcv writes under a temporary name and renames at the end
        beton.parent.mkdir(parents=True, exist_ok=True)
        workers = str(os.cpu_count() or 1)
        run.command([sys.executable, "-m", "data_prep.write_ffcv", data, "--split", "train", "--out", str(beton),
                     "--max_side", "512", "--write_mode", "proportion", "--compress_probability", "0.5",
                     "--workers", workers], out_dir / "data" / "log.txt")  # fmt: skip
    teacher = [f"--teacher.weights={teacher_weights}"] if teacher_weights else []
    ds = ["--ds_config", ds_config] if ds_config else []
    pretrain = run.stage("pretrain", "dtm_ds/train.py", [
        *ds, "--model", model, "--output_dir", str(out_dir / "pretrain"),
        f"--data.path={beton}", "--data.backend=ffcv", *teacher, *shlex.split(pretrain_args)])  # fmt: skip
    results = {"pretrain": pretrain}
    for name, root in [("imagenet", data), *((k, transfers[k]) for k in TRANSFERS if k in transfers)]:
        results[name] = run.stage(name, "eval/finetune.py", [
            "--encoder", str(out_dir / "pretrain"), "--dataset", name, "--data", root, *ds,
            "--output_dir", str(out_dir / name), *shlex.split(finetune_args)])  # fmt: skip
        write_results(out_dir, model, results)
    if ade20k:
        results["ade20k"] = run.seg(["--encoder", str(out_dir / "pretrain"), "--data", ade20k,
                                     "--output_dir", str(out_dir / "ade20k"), *shlex.split(seg_args)])  # fmt: skip
    write_results(out_dir, model, results)
    print(f"results: {out_dir / 'results.md'}", flush=True)
    return results


class Chain:
    """Runs the stages of one chain folder."""

    def __init__(self, out_dir: Path, launcher: str, ngpus: int, hostfile: str | None):
        self.out_dir, self.launcher, self.ngpus, self.hostfile = out_dir, launcher, ngpus, hostfile

    def stage(self, name: str, script: str, args: list[str]) -> dict:
        """``script`` through the DeepSpeed launcher (or one python process) unless ``name`` is done; its
        summary is the last JSON line it prints."""
        if self.launcher == "python":
            launch = [sys.executable]
        else:
            where = ["--hostfile", self.hostfile] if self.hostfile else ["--num_gpus", str(self.ngpus)]
            launch = [str(Path(sys.executable).with_name("deepspeed")), *where]
        return self._once(name, [*launch, script, *args])

    def seg(self, args: list[str]) -> dict:
        """ADE20K: one process, or torchrun over ``ngpus``; its summary is the last line of eval.jsonl."""
        script = "eval/seg/train.py"
        if self.ngpus > 1 and self.launcher != "python":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.ngpus), script,
                   "--launcher", "pytorch", *args]  # fmt: skip
        else:
            cmd = [sys.executable, script, *args]
        return self._once("ade20k", cmd, lambda: _last_json((self.out_dir / "ade20k" / "eval.jsonl").read_text()))

    def _once(self, name: str, cmd: list[str], summary=None) -> dict:
        done = self.out_dir / name / "done.json"
        if done.is_file():
            print(f"== {name}: done before ({done}), skipped", flush=True)
            return json.loads(done.read_text())
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        output = self.command(cmd, self.out_dir / name / "log.txt")
        result = summary() if summary else _last_json(output)
        if result.get("done") is False:  # stopped by a signal, checkpoint saved: not finished
            raise RuntimeError(f"stage {name} stopped before its end; re-run the same command to continue it")
        done.write_text(json.dumps(result, indent=2))
        return result

    @staticmethod
    def command(cmd: list[str], log: Path) -> str:
        """Run ``cmd`` from the repository root, its output shown and appended to ``log``; a failure
        stops the chain (its finished stages stay done)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        with open(log, "a") as f, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   text=True, bufsize=1) as proc:  # fmt: skip
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
                lines.append(line)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}; its output is in {log}")
        return "".join(lines)


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("the stage printed no JSON summary")


def write_results(out_dir: Path, model: str, results: dict) -> None:
    """``results.md``: one row per finished stage, ours beside the paper's."""
    rows = ["| stage | metric | ours | paper |", "|---|---|---|---|"]
    pre = results.get("pretrain")
    if pre:
        rows.append(f"| pretrain | final loss (step {pre.get('step')}) | {_num(pre.get('loss'))} | – |")
    for name, result in results.items():
        if name == "pretrain" or not result:
            continue
        if name == "ade20k":
            rows.append(f"| ade20k | mIoU | {_num(result.get('mIoU'))} | – |")
        else:
            paper = _num(PAPER.get((name, model)))
            rows.append(f"| {name} | {name} top-1 (best) | {_num(result.get('best_top1'))} | {paper} |")
    text = f"# DTM reproduction: {model}\n\n" + "\n".join(rows) + "\n"
    write_atomic(out_dir / "results.md", text)


def _num(value) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def describe() -> str:
    from dtm_ds import cli

    return cli.describe(__doc__, [("Options", cli.function_rows(main))])


if __name__ == "__main__":
    from dtm_ds.cli import run

    run(main, describe)
