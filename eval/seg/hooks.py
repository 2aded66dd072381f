"""Append every validation/test result to ``<work_dir>/eval.jsonl`` (as eval/finetune.py does)."""

import json
from pathlib import Path

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmseg.registry import HOOKS


@HOOKS.register_module()
class EvalJsonl(Hook):
    priority = "VERY_LOW"

    def _write(self, runner, metrics: dict | None, phase: str) -> None:
        if metrics is None or not is_main_process():
            return
        row = {"phase": phase, "iter": runner.iter, **{k: float(v) for k, v in metrics.items()}}
        with open(Path(runner.work_dir) / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._write(runner, metrics, "val")

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._write(runner, metrics, "test")
