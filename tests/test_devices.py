"""One place decides the device (dtm_ds/devices.py); every collective goes through dtm_ds/distributed.py and
takes its tensors on the process group's device; loaders pin and cap their workers."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtm_ds import devices, distributed
from tests.test_layout import PACKAGES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("env", "cuda", "want"),
    [
        ({}, True, "cuda"),  # CUDA present: CUDA, whatever the Makefile used to say
        ({}, False, "cpu"),
        ({"DS_ACCELERATOR": "cpu"}, True, "cpu"),  # asked for: the CPU even where CUDA is
        ({"DS_ACCELERATOR": "cpu"}, False, "cpu"),
        ({"DS_ACCELERATOR": "cuda"}, True, "cuda"),
        ({"DS_ACCELERATOR": " CUDA "}, True, "cuda"),
        ({"DS_ACCELERATOR": ""}, True, "cuda"),  # set but empty: not a choice
    ],
)
def test_the_accelerator_decision(env, cuda, want):
    assert devices.accelerator(env, cuda) == want


def test_impossible_accelerators_are_clear_errors():
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda, but torch sees no CUDA device"):
        devices.accelerator({"DS_ACCELERATOR": "cuda"}, False)
    with pytest.raises(ValueError, match="DS_ACCELERATOR='xpu': dtm_ds runs on cuda or cpu"):
        devices.accelerator({"DS_ACCELERATOR": "xpu"}, True)


def test_the_deepspeed_config_follows_the_device(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the defaults are found from any folder
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    path, how = devices.resolve_ds_config(None)
    assert Path(path) == ROOT / "ds_configs" / "zero2_bf16.json" and how == "default for cuda" and Path(path).is_file()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, how = devices.resolve_ds_config(None)
    assert Path(path) == ROOT / "ds_configs" / "cpu.json" and how == "default for cpu" and Path(path).is_file()
    assert devices.resolve_ds_config("mine.json") == ("mine.json", "given")


def test_print_config_names_the_default_deepspeed_config():
    env = os.environ | {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "dtm_ds/train.py", "--model", "tiny", "--print_config"], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert '"ds_config_chosen": "default for cpu"' in done.stdout
    assert f'"ds_config": "{ROOT / "ds_configs" / "cpu.json"}"' in done.stdout


@pytest.mark.parametrize(
    ("requested", "cores", "ranks", "want"),
    [(8, 2, 1, 2), (8, 16, 8, 2), (8, 16, 1, 8), (2, 16, 1, 2), (0, 2, 1, 0), (4, 2, 4, 1), (3, 7, 2, 3)],
)
def test_workers_are_capped_by_the_cores_of_a_rank(requested, cores, ranks, want, capsys):
    assert devices.cap_workers(requested, "test loader", cores, ranks) == want
    note = capsys.readouterr().err
    assert (note == f"test loader: {requested} workers capped at {want} ({cores} cores / {ranks} ranks on this node)\n"
            if want < requested else note == "")  # fmt: skip


def test_ranks_on_a_node_from_each_launcher():
    assert devices.local_ranks({"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun
    assert devices.local_ranks({"LOCAL_SIZE": "8"}) == 8  # the deepspeed launcher
    assert devices.local_ranks({"SLURM_NTASKS_PER_NODE": "2"}) == 2
    assert devices.local_ranks({}) == 1


def test_the_vitb_loader_on_a_small_machine_is_capped_not_a_numba_error(small_beton, capsys):
    """The vitb preset's 8 FFCV threads on a machine with fewer cores: capped (numba refuses more threads
    than cores: "The number of threads must be between 1 and N")."""
    from dtm_ds.config import build_config
    from dtm_ds.data import PretrainLoader, loader_spec

    config = build_config("vitb", {"data.path": str(small_beton), "model.img_size": 32, "dtm.n_max": [4, 4],
                                   "data.num_masked": 1, "data.min_mask_block": 1})  # fmt: skip
    assert config.data.workers == 8
    loader = PretrainLoader(
        loader_spec(config, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1})
    )
    assert loader.spec.workers == devices.usable_cores() < 8
    assert next(iter(loader.epoch(0)))["images"].shape == (4, 3, 32, 32)
    assert "ffcv loader: 8 workers capped at" in capsys.readouterr().err


def test_to_device_keeps_host_tensors_and_values():
    t = torch.arange(6).reshape(2, 3)
    assert devices.to_device(t, torch.device("cpu")) is t


def test_the_torchvision_backend_needs_no_ffcv(tmp_path):
    """A machine without FFCV trains from a folder: ``import ffcv`` fails in this child, the loader works."""
    from tests.conftest import write_class_folder

    write_class_folder(tmp_path / "imgs", {"a": 4, "b": 4}, size=(40, 40))
    code = f"""
import sys
sys.modules["ffcv"] = None  # any import of ffcv raises ImportError
from dtm_ds.config import build_config
from dtm_ds.data import PretrainLoader, loader_spec
config = build_config("tiny", {{"data.path": "{tmp_path / "imgs"}", "data.workers": 0}})
loader = PretrainLoader(loader_spec(config, {{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}}))
print(tuple(next(iter(loader.epoch(0)))["images"].shape))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(4, 3, 32, 32)"


COLLECTIVES = {"zzz",
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "all_to_all", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "monitored_barrier",
    "init_process_group", "destroy_process_group", "new_group",
}  # fmt: skip


def _distributed_uses(path: Path) -> list[str]:
    """``torch.distributed`` collectives (and group set-up) that ``path`` calls or imports."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [f"from {node.module} import {a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("torch.distributed")]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in COLLECTIVES
            and ast.unparse(node.value) == "torch.distributed"
        ):
            found.append(f"{ast.unparse(node)} (line {node.lineno})")  # an alias needs an import, caught above
    return found


def _offenders() -> dict:
    """Each module but distributed.py that calls a collective, and whether the scan sees distributed.py's."""
    offenders = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path != ROOT / "dtm_ds" / "distributed.py" and (uses := _distributed_uses(path)):
                offenders[str(path.relative_to(ROOT))] = uses
    return {"offenders": offenders, "seen_in_distributed": _distributed_uses(ROOT / "dtm_ds" / "distributed.py")}


def test_no_module_but_distributed_calls_a_collective():
    """The scan runs in a fresh interpreter: CPython 3.11's ``ast.parse`` can fail with "AST constructor
    recursion depth mismatch" (cpython#106905) after other tests changed the interpreter's state (CI did)."""
    code = "import json, tests.test_devices as t; print(json.dumps(t._offenders()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    scan = json.loads(done.stdout)
    assert scan["offenders"] == {}
    assert scan["seen_in_distributed"]  # the scan sees them where they are


def test_the_communication_device_follows_the_backend():
    assert distributed.comm_device("gloo") == torch.device("cpu")
    assert distributed.comm_device() == torch.device("cpu")  # no process group
    if torch.cuda.is_available():
        assert distributed.comm_device("nccl") == torch.device("cuda", torch.cuda.current_device())


class _Reached(Exception):
    pass


@pytest.mark.parametrize("call", ["agree", "gather_rows", "sum_tensor", "mean_tensor", "on_rank0"])
def test_every_collective_takes_its_tensors_on_the_communication_device(call, monkeypatch):
    """With a communication device other than the inputs' (meta here, as a GPU would be for NCCL), every
    tensor that reaches a torch.distributed collective is on it: a CPU tensor on an NCCL group fails ("No
    backend type associated with device type cpu")."""
    seen = []

    def spy(name):
        def collective(first, *args, device=None, **kwargs):
            tensors = first if isinstance(first, list) else [first]
            seen.append((name, [t.device for t in tensors if isinstance(t, torch.Tensor)] + [device]))
            raise _Reached

        return collective

    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "comm_device", lambda group_backend=None: torch.device("meta"))
    for name in ("all_reduce", "all_gather", "broadcast_object_list"):
        monkeypatch.setattr(torch.distributed, name, spy(name))
    host = torch.tensor([1.0, 2.0])
    calls = {
        "agree": lambda: distributed.agree(torch.tensor(True), False),
        "gather_rows": lambda: distributed.gather_rows(host),
        "sum_tensor": lambda: distributed.sum_tensor(host),
        "mean_tensor": lambda: distributed.mean_tensor(host),
        "on_rank0": lambda: distributed.on_rank0(lambda: 1),
    }
    with pytest.raises(_Reached):
        calls[call]()
    assert len(seen) == 1
    name, placed = seen[0]
    placed = [d for d in placed if d is not None]  # tensors, or the device an object collective packs on
    assert placed and set(placed) == {torch.device("meta")}, (name, placed)


@pytest.mark.ranks(2)
def test_collectives_on_two_gloo_ranks_return_sums_on_the_host(tmp_path):
    """Two real gloo ranks: the sums and rows are exact and come back on the host."""
    code = """
import os, sys, torch
from dtm_ds import distributed
torch.distributed.init_process_group("gloo")
r = distributed.rank()
total = distributed.sum_tensor(torch.tensor([1.0 + r, 10.0 * r]))
rows = distributed.gather_rows(torch.tensor([r, r * r], dtype=torch.float64))
flag, local = distributed.agree(torch.tensor(r == 1), r == 0)
mean = distributed.mean_tensor(total).tolist()
values = (r, total.tolist(), total.device, total.dtype, rows.tolist(), flag, local, mean)
open(sys.argv[1] + f"/rank{r}.txt", "w").write(" ".join(map(str, values)))  # a file each: prints would interleave
distributed.close()
"""
    (tmp_path / "w.py").write_text(code)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29671",
        str(tmp_path / "w.py"),
        str(tmp_path),  # where each rank writes its line
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in (0, 1):
        line = (tmp_path / f"rank{r}.txt").read_text()
        assert line == f"{r} [3.0, 10.0] cpu torch.float64 [[0.0, 0.0], [1.0, 1.0]] True True [3.0, 10.0]", line


@pytest.mark.parametrize("entrypoint", ["dtm_ds/train.py", "eval/finetune.py"])
def test_a_missing_deepspeed_json_is_reported_before_any_op_is_built(entrypoint, pretrained, tmp_path):
    """With an empty extension cache (a fresh clone), a missing DeepSpeed JSON is one error line within
    seconds, and no DeepSpeed op is built (the set-up comes after every input check)."""
    cache = tmp_path / "ext"
    cache.mkdir()
    env = os.environ | {"PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(cache), "DS_ACCELERATOR": "cpu"}
    gone, out = tmp_path / "gone.json", tmp_path / "run"
    args = {
        "dtm_ds/train.py": ["--model", "tiny", "--output_dir", str(out), "--data.path=fashion_mnist"],
        "eval/finetune.py": ["--encoder", str(pretrained), "--dataset", "fmnist", "--data", "fashion_mnist",
                             "--output_dir", str(out)],
    }[entrypoint]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, entrypoint, "--ds_config", str(gone), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"error: DeepSpeed config {gone} does not exist (see ds_configs/)"]
    assert list(cache.iterdir()) == [] and not out.exists()
    assert seconds < 20, seconds


def test_the_planned_world_is_read_from_each_launcher_before_set_up():
    assert distributed.planned_world({}) == 1
    assert distributed.planned_world({"WORLD_SIZE": "8"}) == 8  # torchrun, the deepspeed launcher
    assert distributed.planned_world({"SLURM_NTASKS": "16"}) == 16  # srun
    assert distributed.planned_world({"OMPI_COMM_WORLD_SIZE": "4"}) == 4  # mpirun
    assert distributed.planned_world({"WORLD_SIZE": "2", "SLURM_NTASKS": "16"}) == 2
    with pytest.raises(RuntimeError, match="the launcher planned 3 ranks .* 1 started"):
        distributed.check_world(3)


def test_ds_configs_are_found_from_any_working_directory(tmp_path):
    """``--ds_config ds_configs/cpu.json`` from a folder outside the repository names the repository's file; a
    path that exists nowhere stays as given (its error names it)."""
    script = ROOT / "dtm_ds" / "train.py"
    cmd = [sys.executable, str(script), "--ds_config", "ds_configs/cpu.json", "--model", "tiny", "--print_config"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads(done.stdout)
    assert settings["ds_config"] == str(ROOT / "ds_configs" / "cpu.json")
    assert settings["ds_config_chosen"] == "given, found in the repository"
    from dtm_ds.devices import resolve_ds_config

    assert resolve_ds_config("ds_configs/none.json") == ("ds_configs/none.json", "given")
