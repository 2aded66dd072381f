"""The command lines as a newcomer meets them: --help on every entrypoint, and user mistakes reported as
one ``error:`` line with exit code 2, before anything is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_class_folder
from tests.helpers import ROOT, ds_json, run_env

TRAIN = [sys.executable, "dtm_ds/train.py"]
FINETUNE = [sys.executable, "eval/finetune.py"]
KNN = [sys.executable, "eval/knn.py"]
LINEAR = [sys.executable, "eval/linear.py"]
SEG = [sys.executable, "eval/seg/train.py"]
REPRODUCE = [sys.executable, "eval/reproduce.py"]

HELP = {
    "train": (TRAIN, ["--ds_config", "--model", "--max_steps", "--print_config", "--optim.lr", "--dtm.n_max"]),
    "finetune": (FINETUNE, ["--encoder", "--dataset", "--print_config", "--max_epochs", "--recipe.remode"]),
    "knn": (KNN, ["--encoder", "--k", "--temperature", "--train", "--val", "--random_init"]),
    "linear": (LINEAR, ["--encoder", "--epochs", "--blocks", "--train_per_class"]),
    "seg": (SEG, ["--data", "--test_only", "--print_config", "--model", "--crop", "--max_iters", "--lr", "--amp"]),
    "reproduce": (REPRODUCE, ["--data", "--model", "--teacher_weights", "--ade20k", "--launcher", "--seg_args"]),
}


@pytest.mark.parametrize("command", sorted(HELP))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_documented_flag(command, flag):
    cmd, flags = HELP[command]
    done = subprocess.run([*cmd, flag], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in flags:
        assert f"  {name} " in done.stdout, name
    assert "DTM_TRACEBACK=1 shows the traceback" in done.stdout and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    write_class_folder(tmp / "imgs", {"a": 8, "b": 8}, size=(40, 40))
    ok = json.loads(Path(ds_json(tmp / "ok.json", 8)).read_text())
    misspelt = dict(ok)
    misspelt["zero_optimisation"] = misspelt.pop("zero_optimization")
    (tmp / "zero_optimisation.json").write_text(json.dumps(misspelt))
    micro = dict(ok)
    micro["train_micro_batch_size_per_gpus"] = micro.pop("train_micro_batch_size_per_gpu")
    (tmp / "micro.json").write_text(json.dumps(micro))
    return tmp


def _train(tmp, *extra):
    return [*TRAIN, "--ds_config", str(tmp / "ok.json"), "--model", "tiny", "--output_dir", str(tmp / "out"),
            f"--data.path={tmp / 'imgs'}", "--data.workers=0", *extra]  # fmt: skip


MISTAKES = {  # name: (command from the inputs folder, text the error line must contain)
    "int field given text": (lambda t: _train(t, "--run.save_every=abc"), "run.save_every expects int, got 'abc'"),
    "list field given a number": (lambda t: _train(t, "--dtm.n_max=64"), "dtm.n_max expects list[int]"),
    "misspelt field": (lambda t: _train(t, "--optim.learning_rate=1"), "did you mean 'optim.lr'?"),
    "field in the wrong section": (lambda t: _train(t, "--model.epochs=3"), "did you mean 'optim.epochs'?"),
    "unknown preset": (lambda t: _train(t, "--model", "vitx"), "unknown model preset 'vitx'"),
    "missing DeepSpeed JSON": (lambda t: [*_train(t), "--ds_config", str(t / "nope.json")], "nope.json does not exist"),
    "misspelt ZeRO block": (lambda t: [*_train(t), "--ds_config", str(t / "zero_optimisation.json")],
                            "unknown key 'zero_optimisation'; did you mean 'zero_optimization'?"),
    "misspelt micro batch": (lambda t: [*_train(t), "--ds_config", str(t / "micro.json")],
                             "did you mean 'train_micro_batch_size_per_gpu'?"),
    "missing data": (lambda t: _train(t, "--data.path=/nowhere/imgs"), "/nowhere/imgs"),
    "clip teacher without weights": (lambda t: _train(t, "--teacher.name=clip:ViT-B-16"), "needs teacher.weights"),
    "missing teacher weights": (lambda t: _train(t, "--teacher.name=clip:ViT-B-16", "--teacher.weights=/nowhere/w.pt"),
                                "/nowhere/w.pt does not exist"),
    "fine-tune: recipe field given text": (lambda t: [*FINETUNE, "--encoder", "x", "--dataset", "fmnist", "--data",
                                           "fashion_mnist", "--recipe.epochs=abc", "--output_dir", str(t / "out")],
                                           "recipe.epochs expects int, got 'abc'"),
    "fine-tune: unknown dataset": (lambda t: [*FINETUNE, "--encoder", "x", "--dataset", "mnist", "--data", "y",
                                              "--output_dir", str(t / "out")], "--dataset 'mnist' is not a recipe"),
    "fine-tune: missing encoder": (lambda t: [*FINETUNE, "--encoder", "/nowhere/run", "--dataset", "fmnist",
                                              "--data", "fashion_mnist", "--recipe.batch_size=8", "--ds_config",
                                              str(t / "ok.json"), "--output_dir", str(t / "out")], "/nowhere/run"),
    "k-NN: misspelt option": (lambda t: [*KNN, "--encoder", "x", "--block=2"], "'block': did you mean 'blocks'?"),
    "linear: option given text": (lambda t: [*LINEAR, "--encoder", "x", "--blocks=two"], "blocks expects int"),
    "ADE20K: misspelt flag": (lambda t: [*SEG, "--data", "x", "--crops", "3", "--output_dir", str(t / "out")],
                              "'crops': did you mean 'crop'?"),
    "ADE20K: missing data": (lambda t: [*SEG, "--data", "/nowhere/ade", "--output_dir", str(t / "out")],
                             "/nowhere/ade"),
    "reproduce: no ImageNet root": (lambda t: [*REPRODUCE, "--data", str(t / "imgs"), "--out", str(t / "out")],
                                    "expected an ImageNet root with train/ and val/"),
    "reproduce: unknown transfer": (lambda t: [*REPRODUCE, "--data", str(t), "--inat17", "x", "--out", str(t / "out")],
                                    "unknown options ['inat17']"),
    "fine-tuning: no encoder": (lambda t: [*FINETUNE, "--dataset", "imagenet", "--data", "x"],
                                "--encoder is required"),
}  # fmt: skip


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_user_mistake_is_one_error_line_exit_2_and_writes_nothing(inputs, mistake):
    make, expected = MISTAKES[mistake]
    done = subprocess.run(make(inputs), cwd=ROOT, env=run_env(), capture_output=True, text=True)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (inputs / "out").exists()


def test_the_traceback_is_one_switch_away(inputs):
    env = run_env() | {"DTM_TRACEBACK": "1"}
    done = subprocess.run(_train(inputs, "--run.save_every=abc"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "run.save_every expects int" in done.stderr


def test_deepspeed_keys_cover_what_deepspeed_reads():
    """Every top-level key DeepSpeedConfig looks up is in DEEPSPEED_KEYS (a DeepSpeed upgrade that reads a
    new key fails here, not in a user's run)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from dtm_ds.engine import DEEPSPEED_KEYS

    class Recording(dict):
        seen: set = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            self.seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            self.seen.add(key)
            return super().__getitem__(key)

    DeepSpeedConfig(Recording(json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())))
    assert Recording.seen - DEEPSPEED_KEYS == set() and len(Recording.seen) > 40


def test_the_one_option_parser_converts_and_suggests():
    """dtm_ds/options.py serves every entrypoint: types converted as fire cannot (text to bool, int to float,
    a list to a tuple), unknown names listed together, each with the names it may mean."""
    from dtm_ds.options import parse_options, suggest

    kinds = {"optim.lr": float, "optim.epochs": int, "run.cuda_graph": bool, "optim.betas": tuple[float, float]}
    got = parse_options({"optim.lr": 1, "run.cuda_graph": "false", "optim.betas": [0.9, 0.95]}, kinds)
    assert got == {"optim.lr": 1.0, "run.cuda_graph": False, "optim.betas": (0.9, 0.95)}
    assert type(got["optim.lr"]) is float
    assert suggest("model.epochs", kinds) == ["optim.epochs"]  # the same field in another section
    assert suggest("optim.learning_rate", kinds) == ["optim.lr"]  # initials
    assert suggest("optim.epoch", kinds) == ["optim.epochs"] and suggest("optim.zzz", kinds) == []
    with pytest.raises(
        ValueError, match=r"unknown options \['a.epoch', 'b'\]; 'a.epoch': did you mean 'optim.epochs'\? "
    ):
        parse_options({"a.epoch": 1, "b": 2}, kinds)
    with pytest.raises(ValueError, match=r"optim.epochs expects int, got 1.5"):
        parse_options({"optim.epochs": 1.5}, kinds)


@pytest.mark.faults_slow
def test_a_config_file_round_trips_print_config_and_the_command_line_wins(image_folder, tmp_path):
    """``--print_config`` output is a valid ``--config`` file (JSON, and the same as YAML): read back, it gives the
    same settings; an option on the command line wins over the file; an unknown section is an error naming it;
    a run started from a file refuses a re-run whose file changes a setting, as with command-line options."""
    import yaml

    def settings(*args: str) -> dict:
        cmd = [sys.executable, "dtm_ds/train.py", *args, "--print_config"]
        done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    first = settings("--model", "tiny", f"--data.path={image_folder}", "--optim.lr=0.01", "--dtm.beta=1.5")
    (tmp_path / "c.json").write_text(json.dumps(first))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(first))
    for file in ("c.json", "c.yaml"):
        again = settings("--config", str(tmp_path / file))
        assert {k: v for k, v in again.items() if k != "ds_config_chosen"} == {
            k: v for k, v in first.items() if k != "ds_config_chosen"
        }
    assert first["preset"] == "tiny" and first["optim"]["lr"] == 0.01 and first["dtm"]["beta"] == 1.5
    assert settings("--config", str(tmp_path / "c.yaml"), "--optim.lr=0.02")["optim"]["lr"] == 0.02
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: 0.1\noptimiser:\n  lr: 0.1\n")
    bad = subprocess.run([sys.executable, "dtm_ds/train.py", "--config", str(tmp_path / "bad.yaml"), "--print_config"],
                         cwd=ROOT, env=run_env(), capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown sections ['optimiser']" in bad.stderr
    out, ds = tmp_path / "run", ds_json(tmp_path / "ds.json", 4)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"preset": "tiny", "data": {"path": str(image_folder), "workers": 0},
                                        "run": {"output_dir": str(out), "vis_every": 0}}))  # fmt: skip
    base = [sys.executable, "dtm_ds/train.py", "--ds_config", ds, "--config", str(run_file), "--max_steps", "2"]
    assert subprocess.run(base, cwd=ROOT, env=run_env(), capture_output=True).returncode == 0
    changed = yaml.safe_load(run_file.read_text()) | {"optim": {"lr": 0.5}}
    run_file.write_text(yaml.safe_dump(changed))
    refused = subprocess.run(base, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "optim.lr: " in refused.stderr, refused.stderr[-2000:]
    assert "holds a run with other settings" in refused.stderr


def test_finetuning_takes_its_print_config_as_a_config_file(tmp_path):
    """Fine-tuning's ``--print_config`` (job and recipe) read back with ``--config`` gives the same settings;
    the command line wins over the file."""
    import yaml

    def settings(*args: str) -> dict:
        cmd = [sys.executable, "eval/finetune.py", *args, "--print_config"]
        done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    first = settings("--dataset", "imagenet", "--model", "vitl", "--recipe.lr=0.001", "--keep_last=4")
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(first))
    assert settings("--config", str(tmp_path / "f.yaml")) == first
    assert first["recipe"]["lr"] == 0.001 and first["job"]["keep_last"] == 4 and first["recipe"]["layer_decay"] == 0.8
    wins = settings("--config", str(tmp_path / "f.yaml"), "--recipe.lr=0.002", "--dataset", "cub")
    assert wins["recipe"]["lr"] == 0.002 and wins["job"]["dataset"] == "cub"


def test_segmentation_takes_its_print_config_as_a_config_file(tmp_path):
    """ADE20K's ``--print_config`` (its ``seg`` settings and the figures they resolve to) read back with
    ``--config`` gives the same output; the command line wins over the file; a wrong section is named."""
    import yaml

    def settings(*args: str, rc: int = 0) -> dict | str:
        cmd = [sys.executable, "eval/seg/train.py", *args, "--print_config"]
        done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
        assert done.returncode == rc, done.stderr[-2000:]
        return json.loads(done.stdout) if rc == 0 else done.stderr

    first = settings("--model", "vitl", "--crop", "256", "--max_iters", "8000", "--lr", "1e-4", "--data", "ade")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(first))
    assert settings("--config", str(tmp_path / "s.yaml")) == first
    assert (first["lr"], first["crop"], first["max_iters"], first["depth"]) == (1e-4, [256, 256], 8000, 24)
    assert first["layer_decay"] == 0.9 and first["seg"]["data"] == "ade"  # the vitl recipe where not given
    wins = settings("--config", str(tmp_path / "s.yaml"), "--lr", "2e-4", "--model", "vitb")
    assert (wins["lr"], wins["depth"], wins["crop"]) == (2e-4, 12, [256, 256])
    (tmp_path / "bad.json").write_text(json.dumps({"recipe": {"lr": 1}}))
    assert "unknown sections ['recipe']; valid: ['seg']" in settings("--config", str(tmp_path / "bad.json"), rc=2)


@pytest.mark.parametrize("probe", ["knn", pytest.param("linear", marks=pytest.mark.faults_slow)])  # one code path
def test_the_probes_take_their_print_config_as_a_config_file(tmp_path, probe):
    """eval/knn.py's and eval/linear.py's ``--print_config`` (sections ``probe`` and their own) read back with
    ``--config`` gives the same settings; the command line wins; a mistyped setting in the file is named."""
    import yaml

    def settings(*args: str, rc: int = 0):
        done = subprocess.run([sys.executable, f"eval/{probe}.py", *args, "--print_config"], cwd=ROOT, env=run_env(),
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == rc, done.stderr[-2000:]
        return json.loads(done.stdout) if rc == 0 else done.stderr

    own = ["--k", "7"] if probe == "knn" else ["--epochs", "30"]
    first = settings("--encoder", "run_x", "--train_per_class=5", "--blocks=2", *own)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(first))
    assert settings("--config", str(tmp_path / "p.yaml")) == first
    assert first["probe"]["train_per_class"] == 5 and first["probe"]["encoder"] == "run_x"
    assert first[probe] == ({"k": 7, "temperature": 0.07} if probe == "knn" else {"epochs": 30, "lr": 0.001})
    wins = settings("--config", str(tmp_path / "p.yaml"), "--blocks=3", "--encoder", "run_y")
    assert (wins["probe"]["blocks"], wins["probe"]["encoder"], wins[probe]) == (3, "run_y", first[probe])
    first[probe] = {"kk": 1}
    (tmp_path / "bad.json").write_text(json.dumps(first))
    refused = settings("--config", str(tmp_path / "bad.json"), rc=2)
    assert f"unknown {probe} settings in {tmp_path / 'bad.json'} ['kk']" in refused, refused


def test_every_command_refuses_a_mistyped_flag_before_any_work(tmp_path):
    """``write_ffcv`` (which would otherwise convert first and complain after), ``python -m dtm_ds export`` and
    ``visualize``: a mistyped flag is one line naming what it may mean, exit 2, nothing written; --help lists
    the documented options."""
    from data_prep.synthetic import write_class_folder

    write_class_folder(tmp_path / "imgs", {"a": 2, "b": 2}, size=(16, 16))
    cases = [
        (["-m", "data_prep.write_ffcv", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.beton"), "--worker", "2"],
         "unknown options ['--worker']; --worker: did you mean --workers?"),
        (["-m", "dtm_ds", "export", str(tmp_path), str(tmp_path / "exp"), "--tagg", "x"],
         "unknown options ['--tagg']; --tagg: did you mean --tag?"),
        (["-m", "dtm_ds", "visualize", str(tmp_path), "--image=2"], "--image: did you mean --images?"),
        (["-m", "dtm_ds", "exprot"], "unknown command 'exprot'"),
    ]  # fmt: skip
    for args, said in cases:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=run_env(), capture_output=True, text=True)
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr[-1000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # nothing converted or exported
    help_text = subprocess.run([sys.executable, "-m", "data_prep.write_ffcv", "--help"], cwd=ROOT, env=run_env(),
                               capture_output=True, text=True).stdout  # fmt: skip
    assert "--workers" in help_text and "checking and writing processes" in help_text
