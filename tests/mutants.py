"""Mutation testing: realistic one-line defects in critical code, each applied alone, and the tests that must
catch it. A mutant is *caught* when those tests fail; one that survives names a behaviour no test guards.

    make mutants                               # every mutant (about 6 min on 2 cores); exit 1 if any survives
    python -m tests.mutants --only 3,17        # some of them (numbers as listed)
    python -m tests.mutants --list

Add a mutant whenever a bug is fixed: the defect it was, as one line, and the test that now catches it.
The source files are restored after every mutant, also when the run is interrupted.
"""

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    area: str
    path: str
    old: str
    new: str
    tests: str  # pytest arguments


TRAIN, AUG, DEV, TEACH = (
    "tests/test_train.py",
    "tests/test_augment.py",
    "tests/test_devices.py",
    "tests/test_teacher.py",
)
MUTANTS = [
    # morphing
    Mutant("morph: always floor", "dtm_ds/morph.py", "r = torch.where(ceil * k > n_hi, n // k, ceil)", "r = n // k",
           "tests/test_morph.py -k every_draw"),
    Mutant("morph: no protected token", "dtm_ds/morph.py", "can_merge = in_a & (slots_a > 0) if protect_first else in_a",
           "can_merge = in_a", "tests/test_morph.py -k reference"),
    # masking
    Mutant("masking: blocks of one patch", "dtm_ds/data/masking.py",
           "area = rng.uniform(self.min_block, max(self.min_block, budget))", "area = rng.uniform(1, max(1, budget))",
           f"{AUG} -k masks"),
    Mutant("masking: loader ignores the minimum", "dtm_ds/data/loader.py", "min(spec.min_mask_block, max(spec.num_masked, 1))",
           "1", f"{AUG} -k masks"),
    Mutant("ffcv: damaged JPEG left unmarked", "dtm_ds/data/ffcv_source.py", "destination[dst_ix, 0, : len(mark)] = mark",
           "destination[dst_ix, 0, : len(mark)] = 0", "tests/test_data.py -k damaged"),
    Mutant("init: cut at 2 std", "dtm_ds/student.py", "nn.init.trunc_normal_(module.weight, std=std, a=-std, b=std)",
           "nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)", "tests/test_train.py -k reference_init"),
    Mutant("init: no block rescale", "dtm_ds/student.py", "    model.fix_init_weight()", "    pass",
           "tests/test_train.py -k reference_init"),
    # augmentation and seeds
    Mutant("jitter: one-sided", "dtm_ds/data/augment.py", "(1 + jitter * (2 * draws[:, 1:] - 1))", "(1 + jitter * draws[:, 1:])",
           f"{AUG} -k 'jitter or contrast'"),
    Mutant("flip: never", "dtm_ds/data/augment.py", "(draws[:, 0] < 0.5)", "(draws[:, 0] < 0.0)", f"{AUG} -k crop"),
    Mutant("draws: same every epoch", "dtm_ds/data/loader.py", "np.random.default_rng([self.spec.seed, epoch, int(i)])",
           "np.random.default_rng([self.spec.seed, 0, int(i)])", f"{AUG} -k jitter"),
    Mutant("crops: torchvision ignores the scale", "dtm_ds/data/folder_source.py", "s.min_crop_scale, 1.0, 3 / 4",
           "0.08, 1.0, 3 / 4", f"{AUG} -k crop"),
    Mutant("crops: FFCV ignores the scale", "dtm_ds/data/ffcv_source.py", "(spec.min_crop_scale, 1.0)", "(0.08, 1.0)",
           f"{AUG} -k crop"),
    Mutant("order: same every epoch", "dtm_ds/data/order.py", "np.random.default_rng([spec.seed, epoch]).permutation",
           "np.random.default_rng([spec.seed, 0]).permutation", "tests/test_data.py -k two_rank_split"),
    # teacher
    Mutant("teacher: shift sign", "dtm_ds/teacher.py", "(torch.tensor(IMAGENET_MEAN) - torch.tensor(mean))",
           "(torch.tensor(mean) - torch.tensor(IMAGENET_MEAN))", f"{TEACH} -k hand_normalised"),
    Mutant("teacher: input statistics swapped", "dtm_ds/teacher.py", 'if input_norm == "student" else',
           'if input_norm != "student" else', f"{TEACH} -k hand_normalised"),
    Mutant("teacher: no autocast", "dtm_ds/teacher.py", "enabled=self.dtype != torch.float32", "enabled=False",
           f"{TEACH} -k autocast"),
    Mutant("teacher: bf16 by default on GPU", "dtm_ds/teacher.py", 'return torch.float16 if device.type == "cuda"',
           'return torch.bfloat16 if device.type == "cuda"', f"{TEACH} -k auto"),
    Mutant("teacher: OpenAI-like weights under GELU", "dtm_ds/teacher.py", 'get("quick_gelu") or not _float16_exact(state)',
           'get("quick_gelu") or True', f"{TEACH} -k openai_like"),
    # student
    Mutant("student: mask token on visible patches", "dtm_ds/student.py", "torch.where(mask.unsqueeze(-1),",
           "torch.where(~mask.unsqueeze(-1),", f"{TRAIN} -k mask_token"),
    # loss wiring
    Mutant("loss: beta fixed at 1", "dtm_ds/train.py", "morphed, dtm.loss, dtm.beta, dtm.normalize_target",
           "morphed, dtm.loss, 1.0, dtm.normalize_target", f"{TRAIN} -k independent_recompute"),
    Mutant("loss: weight ignored", "dtm_ds/train.py", "return dtm.loss_weight * levels.mean(), levels",
           "return levels.mean(), levels",
           f"{TRAIN} -k loss_weight"),
    Mutant("loss: levels summed in the log", "dtm_ds/logs.py", '"loss": means.mean().item()', '"loss": means.sum().item()',
           f"{TRAIN} -k independent_recompute"),
    # lr and weight decay
    Mutant("lr: warm-up off by one", "dtm_ds/engine.py", "return (step + 1) / warmup", "return step / warmup",
           "tests/test_metrics.py -k logged_lr"),
    Mutant("lr: linear batch scaling", "dtm_ds/config.py", "(global_batch / 2048) ** 0.5", "(global_batch / 2048)",
           "tests/test_reproduce.py -k print_config"),
    Mutant("weight decay: on biases too", "dtm_ds/engine.py", "p.ndim <= 1 or name in skip", "name in skip",
           f"{TRAIN} -k no_weight_decay"),
    Mutant("layer decay: flat", "eval/finetune.py", "layer_decay=recipe.layer_decay)", "layer_decay=1.0)",
           "tests/test_eval.py -k ladder"),
    # checkpoints and resume
    Mutant("checkpoints: none rotated", "dtm_ds/checkpoint.py", "+ complete[:-keep_last]", "+ complete[:0]",
           f"{TRAIN} -k 'zero_stages and 0'"),
    Mutant("resume: state not restored", "dtm_ds/train.py",
           's = TrainState(**saver.load(p.engine, start)["train_state"])',
           's = TrainState() if saver.load(p.engine, start) else None', f"{TRAIN} -k sigkill"),
    Mutant("record: the teacher width not recorded", "dtm_ds/train.py",
           "model=dataclasses.replace(config.model, target_dim=teacher.dim)",
           "model=dataclasses.replace(config.model, target_dim=None)", f"{TRAIN} -k teacher_width"),
    Mutant("options: initials ignored", "dtm_ds/options.py", "1.5 if last == initials else ratio", "ratio",
           "tests/test_cli.py -k one_option_parser"),
    Mutant("records: a missing field guessed", "dtm_ds/config.py",
           "if f.name not in tree[s]]", "if f.name not in tree[s] and False]", f"{TRAIN} -k record_without"),
    Mutant("resume: checksums not verified", "dtm_ds/checkpoint.py", "elif verify and (why := damage(tag_dir)):",
           "elif False and (why := damage(tag_dir)):", "tests/faults/test_checkpoint_records.py -k damaged"),
    Mutant("save: a failed write on one rank not agreed", "dtm_ds/checkpoint.py", "failure is not None)  # fmt: skip",
           "False)  # fmt: skip", "tests/faults/test_cluster.py -k full_disk_on_rank_1"),
    Mutant("fine-tuning: a re-run with another encoder continues", "eval/finetune.py",
           "    check_job_record(job, recipe)\n", "", "tests/test_eval.py -k another_encoder"),
    Mutant("records: another dataset accepted", "dtm_ds/run_record.py", "elif recorded is not None and recorded != data:",
           "elif False:", "tests/faults/test_cluster.py -k other_data"),
    Mutant("logs: DeepSpeed's monitors get nothing", "dtm_ds/logs.py", "            self.monitor.write_events([(name, value, step)])",
           "            pass", f"{TRAIN} -k monitors"),
    Mutant("conversion: workers outlive a killed writer", "data_prep/write_ffcv.py",
           "    if os.getppid() not in _CONVERTING:", "    if True:",
           "tests/faults/test_faults.py -k 'killed_conversion and writing'"),
    Mutant("conversion: a killed one's temporary kept", "data_prep/write_ffcv.py",
           "flush=True)\n            tmp.unlink(missing_ok=True)", "flush=True)",
           "tests/faults/test_faults.py -k 'killed_conversion and writing'"),
    Mutant("cli: mistyped flags reach fire", "dtm_ds/cli.py", "    if unknown:  # before any work", "    if False:  # before any work",
           "tests/test_cli.py -k mistyped"),
    Mutant("export: timm pools through fc_norm", "dtm_ds/pretrained.py", "use_fc_norm=False,", "use_fc_norm=True,",
           f"{TRAIN} -k timm_model_folder"),
    Mutant("logs: no plain line in a batch system", "dtm_ds/logs.py",
           "            print(self._line(step, values, img_s), flush=True)", "            pass", f"{TRAIN} -k batch_system"),
    Mutant("ds_configs: not looked up in the repository", "dtm_ds/devices.py", "and (ROOT / path).exists():",
           "and False:", f"{DEV} -k any_working_directory"),
    Mutant("picture: k counts every slot", "dtm_ds/visualize.py", "k={int((row > 0).sum())}", "k={row.numel()}",
           "tests/test_eval.py -k titled"),
    # the agreed stop and dropped windows
    Mutant("agree: a flag on one rank is lost", "dtm_ds/distributed.py", "ReduceOp.MAX", "ReduceOp.MIN",
           "tests/faults/test_cluster.py -k one_rank_drops"),
    Mutant("window: an early NaN forgotten", "dtm_ds/engine.py", "nonfinite = bad if nonfinite is None else nonfinite | bad",
           "nonfinite = bad", f"{TRAIN} -k drops_exactly"),
    Mutant("window: never skipped", "dtm_ds/engine.py", "self.optimizer.skip_next = last and dropped",
           "self.optimizer.skip_next = False", f"{TRAIN} -k nonfinite"),
    # stop signals
    Mutant("loader workers: killed by a job-wide SIGTERM", "dtm_ds/devices.py", "        signal.signal(sig, signal.SIG_IGN)",
           "        pass", "tests/faults/test_cluster.py -k job_wide"),
    Mutant("run folder: no lock", "dtm_ds/distributed.py", "holder = on_rank0(lock.acquire)",
           "holder = None", "tests/faults/test_cluster.py -k second_launch"),
    # host synchronisations, FLOPs
    Mutant("loader thread: never told to stop", "dtm_ds/data/loader.py", "            self.stopped.set()",
           "            pass", f"{AUG} -k loader_thread"),
    Mutant("window: an agreement per micro-step", "dtm_ds/engine.py", "if last:  # the window's one host sync",
           "if True:  # the window's one host sync", "tests/test_syncs.py -k real_loop"),
    Mutant("DeepSpeed: throughput timer on", "ds_configs/cpu.json", '"throughput": {"enabled": false}',
           '"throughput": {"enabled": true}', "tests/test_syncs.py -k real_loop"),
    Mutant("syncs: value reads not counted", "dtm_ds/syncs.py", "if name in _READS or made_on_device",
           "if made_on_device", "tests/test_syncs.py -k counts_the_calls"),
    Mutant("FLOPs: CLIP's attention unseen", "dtm_ds/logs.py", "torch.backends.mha.set_fastpath_enabled(False)",
           "torch.backends.mha.set_fastpath_enabled(True)", "tests/test_metrics.py -k clip_teacher"),
    Mutant("peak: H100 PCIe as SXM", "dtm_ds/logs.py", '(r"H100 PCIe", 756e12), ', "",
           "tests/test_metrics.py -k peak_bf16"),
    Mutant("token-wise: the target's gradient kept", "dtm_ds/morph.py", "    target = target.detach()\n    if normalize_target:",
           "    if normalize_target:", "tests/test_morph.py -k tokenwise"),
    # devices and collectives
    Mutant("device: CPU even with CUDA", "dtm_ds/devices.py", 'return "cuda" if cuda else "cpu"', 'return "cpu"',
           f"{DEV} -k decision"),
    Mutant("collective: host tensor on NCCL", "dtm_ds/distributed.py", ".to(comm_device(), torch.float64, copy=True)",
           ".to(dtype=torch.float64, copy=True)", f"{DEV} -k communication_device"),
    Mutant("workers: not capped", "dtm_ds/devices.py", "if requested <= share:", "if True:", f"{DEV} -k capped"),
    Mutant("picture: its own crop scale", "dtm_ds/visualize.py", "jitter=0.0, seed=seed,", "jitter=0.0, seed=seed, min_crop_scale=0.2,",
           "tests/test_eval.py -k picture_takes"),
    Mutant("export --fold: the shared table dropped", "dtm_ds/pretrained.py",
           "state[key] = state[key] + shared if key in state else shared.clone()",
           "state[key] = state[key] if key in state else shared.clone()", "tests/test_seg.py -k folded"),
    Mutant("export --fold: mmseg's norms misnamed", "dtm_ds/pretrained.py", '(".norm2.", ".ln2.")', '(".norm2.", ".norm2.")',
           "tests/test_seg.py -k folded"),
    Mutant("segmentation --config: the file wins", "eval/seg/train.py",
           'kwargs = {k: v for k, v in from_file.items() if k not in ("data", "output_dir")} | kwargs',
           'kwargs = kwargs | {k: v for k, v in from_file.items() if k not in ("data", "output_dir")}',
           "tests/test_cli.py -k segmentation_takes"),
    # evaluation
    Mutant("features: float input to a bf16 student", "dtm_ds/features.py",
           "low = weights if weights in (torch.bfloat16, torch.float16) else None", "low = None",
           "tests/test_train.py -k bf16_engine"),
    Mutant("probe --config: the file wins", "eval/features.py",
           'options = {k.removeprefix("probe."): v for k, v in flat.items() if k.startswith("probe.")} | options',
           'options = options | {k.removeprefix("probe."): v for k, v in flat.items() if k.startswith("probe.")}',
           "tests/test_cli.py -k probes_take"),
    Mutant("online k-NN: its time counted in img/s", "dtm_ds/logs.py", "max(now - self.last_time - excluded_s, 1e-9)",
           "max(now - self.last_time, 1e-9)", "tests/test_metrics.py -k online_knn"),
    Mutant("online k-NN: the student left in eval mode", "dtm_ds/online_knn.py", "student.train(was_training)",
           "student.eval()", "tests/test_train.py -k online_knn"),
    Mutant("online k-NN: another step's figure", "dtm_ds/train.py", "if p.knn is not None and s.step % run.knn_every == 0:",
           "if p.knn is not None and s.step % run.knn_every == 1:", "tests/test_train.py -k online_knn"),
    Mutant("pilot: tokens left unmorphed", "dtm_ds/pilot.py", "return _group_mean(tokens, morphed.groups[0]),",
           "return tokens,", "tests/test_pilot.py"),
    Mutant("pilot: lower neighbours are the token itself", "dtm_ds/pilot.py", "down = (x[:, :-1] * x[:, 1:]).sum(-1)",
           "down = (x[:, :-1] * x[:, :-1]).sum(-1)", "tests/test_pilot.py -k neighbour"),
    Mutant("probes: shares gathered rank-major", "dtm_ds/distributed.py", "return torch.stack(parts, 1).flatten(0, 1)",
           "return torch.stack(parts, 0).flatten(0, 1)", "tests/test_eval.py -k two_ranks_equal"),
    Mutant("probes: every rank extracts rank 0's share", "dtm_ds/distributed.py", "return range(rank(), total, world())",
           "return range(0, total, world())", "tests/test_eval.py -k two_ranks_equal"),
    Mutant("probes: an unreadable image kept", "eval/features.py", "test_x[test_y >= 0], test_y[test_y >= 0]",
           "test_x, test_y", "tests/test_eval.py -k two_ranks_equal"),
    Mutant("k-NN: temperature ignored", "dtm_ds/features.py", "weights = (sims / temperature).exp()", "weights = sims.exp()",
           "tests/test_eval.py -k knn_vote"),
    Mutant("evaluation: counts averaged over ranks", "eval/finetune.py", "distributed.sum_tensor(counts)",
           "distributed.mean_tensor(counts)", "tests/faults/test_cluster.py -k counts_every_image_once"),
]  # fmt: skip


def run(mutant: Mutant, timeout: float = 900) -> tuple[bool, float, str]:
    """Apply ``mutant``, run its tests, restore the file: (caught, seconds, the failing test or pytest's last
    line). Caught means a test failed (pytest's exit 1); an error that ran no test is raised, not counted."""
    path = ROOT / mutant.path
    source = path.read_text()
    if source.count(mutant.old) != 1:
        raise ValueError(f"{mutant.path}: {mutant.old!r} occurs {source.count(mutant.old)} times (must be once)")
    start = time.perf_counter()
    try:
        path.write_text(source.replace(mutant.old, mutant.new))
        cmd = f"{sys.executable} -m pytest -x -q -p no:cacheprovider -m '' {mutant.tests}"
        done = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        lines = done.stdout.strip().splitlines()
        if done.returncode not in (0, 1):  # pytest: 1 = a test failed; 2-5 = no test ran to judge the mutant
            raise RuntimeError(f"{mutant.area}: pytest exited {done.returncode} ({mutant.tests}): {lines[-3:]}")
        failed = [line for line in lines if line.startswith("FAILED")]
        caught, last = done.returncode == 1, (failed or lines or ["(no output)"])[-1][:110]
    except subprocess.TimeoutExpired:
        caught, last = True, f"timed out after {timeout:.0f} s"
    finally:
        path.write_text(source)
    return caught, time.perf_counter() - start, last


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run()'s finally: the file is restored
    if "--list" in argv:
        for i, m in enumerate(MUTANTS, 1):
            print(f"{i:>2}. {m.area}  [{m.path}]  {m.tests}")
        return 0
    only = {int(x) for x in argv[argv.index("--only") + 1].split(",")} if "--only" in argv else None
    survived, total = [], 0
    for i, mutant in enumerate(MUTANTS, 1):
        if only and i not in only:
            continue
        caught, seconds, last = run(mutant)
        total += 1
        survived += [] if caught else [mutant.area]
        print(f"{i:>2}. {'caught  ' if caught else 'SURVIVED'} {seconds:5.0f} s  {mutant.area:<42} {last}", flush=True)
    print(f"\nmutants: {total - len(survived)}/{total} caught" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
