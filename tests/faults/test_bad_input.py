"""Every user-facing command, fed bad input, fails at once with an error naming the bad value."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_env


@pytest.fixture(scope="module")
def table(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "cases.json"
    cmd = [sys.executable, "-m", "tests.faults.bad_inputs", "--pretrained", str(pretrained), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    return json.loads(out.read_text())


def test_every_command_is_covered(table):
    commands = {r["command"] for r in table}
    assert commands == {"data_prep.write_ffcv", "dtm_ds/train.py", "eval/finetune.py", "eval/knn.py",
                        "eval/linear.py", "eval/seg/train.py"}  # fmt: skip
    assert len(table) >= 30


def test_each_bad_input_gets_a_clear_error_before_any_compute(table):
    failures = [
        r for r in table
        if r["error"] is None or r["error"] == "AssertionError" or r["expect"] not in r["message"]
        or r["trained"] or r["seconds"] > 20
    ]  # fmt: skip
    assert not failures, json.dumps(failures, indent=1)
