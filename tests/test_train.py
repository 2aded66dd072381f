"""Pretraining with the real DeepSpeed engine on CPU (gloo), tiny models and generated data."""

import dataclasses
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtm_ds.config import TeacherConfig, build_config
from dtm_ds.engine import engine_config, param_groups
from dtm_ds.morph import dtm_loss
from dtm_ds.student import DTMStudent
from dtm_ds.teacher import build_teacher
from tests.helpers import ROOT, ds_json, run_env, step_losses, train_cmd


def test_student_gets_all_gradients_and_clip_teacher_none(tiny_clip):
    config = build_config(
        "tiny", {"teacher.name": "clip:dtm-test-clip", "teacher.weights": tiny_clip, "model.drop_path": 0.1}
    )
    teacher = build_teacher(config.teacher, config.model, torch.device("cpu"))
    student = DTMStudent(config.model, teacher.dim)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    targets = teacher(images)
    assert targets.shape == (2, 64, 16) and not targets.requires_grad
    dtm_loss(student(images, mask), targets, torch.tensor([[8, 8, 0], [0, 0, 0]])).backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in teacher.parameters())
    assert config.teacher.input_norm == "student"  # the reference feeds CLIP the student's input
    own = TeacherConfig(name="clip:dtm-test-clip", weights=tiny_clip, input_norm="own")
    assert not torch.allclose(build_teacher(own, config.model, torch.device("cpu"))(images), targets)
    pre = TeacherConfig(name="clip:dtm-test-clip", weights=tiny_clip, target="pre_projection")
    pre_teacher = build_teacher(pre, config.model, torch.device("cpu"))
    tokens = pre_teacher(images)
    assert pre_teacher.dim == 32 and tokens.shape == (2, 64, 32)  # the tower's width, before the projection
    torch.testing.assert_close(tokens @ pre_teacher.encoder.proj, targets)


def test_the_mask_token_sits_exactly_on_the_masked_patches():
    """What enters the first block: the CLS token, then per patch the mask token where the mask is True and
    that patch's own embedding (the convolution, computed here by hand) where it is False."""
    model = build_config("tiny").model
    torch.manual_seed(0)
    student = DTMStudent(model, 48).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) < 0.4
    seen = []
    student.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    student(images, mask)
    tokens = seen[0][:, 1:]  # (B, N, D) after the CLS token
    conv = student.patch_embed.proj
    patches = torch.nn.functional.conv2d(images, conv.weight, conv.bias, stride=4).flatten(2).transpose(1, 2)
    want = torch.where(mask[..., None], student.mask_token.detach().expand(2, 64, -1), patches)
    torch.testing.assert_close(tokens, want)
    torch.testing.assert_close(seen[0][:, 0], student.cls_token.detach()[:, 0].expand(2, -1))
    assert 10 < int(mask.sum()) < 118


def _openai_archive(state: dict, path: Path) -> None:
    """``state`` saved as OpenAI distributes CLIP: a TorchScript archive whose state dict holds the OpenAI
    key names, fp16 floats and the input_resolution / context_length / vocab_size entries."""

    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, Node())
            node = getattr(node, part)
        node.register_buffer(leaf, value.half() if value.is_floating_point() else value)
    torch.jit.script(root).save(str(path))


def test_openai_torchscript_clip_teacher(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 4},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
    }
    (tmp_path / "dtm-test-openai.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    state = open_clip.create_model("dtm-test-openai", pretrained=None).state_dict()
    sizes = {"input_resolution": 32, "context_length": 8, "vocab_size": 64}
    _openai_archive(state | {k: torch.tensor(v) for k, v in sizes.items()}, tmp_path / "ViT-T-4.pt")
    assert isinstance(torch.jit.load(str(tmp_path / "ViT-T-4.pt")), torch.jit.ScriptModule)
    torch.save({k: v.half().float() for k, v in state.items()}, tmp_path / "same.pt")  # the archive's rounding

    tiny, cpu = build_config("tiny"), torch.device("cpu")
    with pytest.raises(ValueError, match=r"are a different CLIP than clip:ViT-B-16: width 64 \(clip:ViT-B-16: 768\)"):
        build_teacher(TeacherConfig(name="clip:ViT-B-16", weights=str(tmp_path / "ViT-T-4.pt")), tiny.model, cpu)
    named = TeacherConfig(name="clip:dtm-test-openai", weights=str(tmp_path / "ViT-T-4.pt"))
    archive = build_teacher(named, tiny.model, cpu)
    plain = build_teacher(
        TeacherConfig(name="clip:dtm-test-openai", weights=str(tmp_path / "same.pt")), tiny.model, cpu
    )
    images = torch.randn(2, 3, 32, 32)
    assert archive.dim == 16 and archive(images).shape == (2, 64, 16)
    torch.testing.assert_close(archive(images), plain(images), rtol=1e-5, atol=1e-5)


def test_the_teacher_width_is_a_recorded_config_field(pretrained):
    """A started run records its teacher's width as model.target_dim (the pixels teacher of the tiny preset:
    3 x patch^2 values per patch); loading the run builds the head from it; a set width that the teacher does
    not produce is an error before the engine exists."""
    from dtm_ds.pretrained import load_student
    from dtm_ds.train import build

    tiny = build_config("tiny")
    recorded = json.loads((pretrained / "config.json").read_text())["model"]["target_dim"]
    assert recorded == 3 * tiny.model.patch_size**2 and tiny.model.target_dim is None
    assert load_student(pretrained).lm_head.out_features == recorded
    wrong = build_config("tiny", {"model.target_dim": recorded + 1})
    with pytest.raises(ValueError, match=f"model.target_dim={recorded + 1} but the teacher's targets are {recorded}"):
        build(wrong, {}, torch.device("cpu"), None, None)


def test_a_record_without_a_field_of_this_version_is_an_error_not_a_guess(pretrained, tmp_path):
    """No compatibility shims: a config.json (or an export's sidecar) that lacks a field this version has
    names it instead of assuming what an earlier version meant."""
    from dtm_ds.config import load_config, model_config

    record = json.loads((pretrained / "config.json").read_text())
    assert load_config(pretrained / "config.json").model.target_dim == record["model"]["target_dim"]
    del record["model"]["init"], record["teacher"]["input_norm"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"config.json records no model.init, teacher.input_norm: .*earlier dtm_ds"):
        load_config(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"side.json records no model.init"):
        model_config(record["model"], "side.json")


def test_teacher_and_config_errors(tiny_clip, tmp_path):
    cpu = torch.device("cpu")
    tiny = build_config("tiny")
    with pytest.raises(FileNotFoundError, match="teacher weights file /nowhere/clip.pt does not exist"):
        build_teacher(TeacherConfig(name="clip:dtm-test-clip", weights="/nowhere/clip.pt"), tiny.model, cpu)
    with pytest.raises(ValueError, match="needs teacher.weights"):
        build_teacher(TeacherConfig(name="clip:dtm-test-clip"), tiny.model, cpu)
    wide = build_config("tiny", {"model.img_size": 64, "dtm.n_max": [64, 64]}).model
    with pytest.raises(ValueError, match=r"expects \(32, 32\) px input, the student uses 64 px"):
        build_teacher(TeacherConfig(name="clip:dtm-test-clip", weights=tiny_clip), wide, cpu)
    torch.save({"visual.nonsense": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit teacher clip:dtm-test-clip"):
        build_teacher(TeacherConfig(name="clip:dtm-test-clip", weights=str(tmp_path / "bad.pt")), tiny.model, cpu)
    with pytest.raises(ValueError, match="unknown model preset 'vitx'"):
        build_config("vitx")
    with pytest.raises(
        ValueError, match=r"unknown config keys \['optim.lrr'\]; 'optim.lrr': did you mean 'optim.lr'\?"
    ):
        build_config("tiny", {"optim.lrr": 1.0})
    with pytest.raises(ValueError, match="dtm.n_max .* exceeds the 64 tokens"):
        build_config("tiny", {"dtm.n_max": [65, 65]})
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 32}))
    with pytest.raises(
        ValueError,
        match=r"train_batch_size in .*ds.json = 32 but micro batch 8 x accumulation 1 x "
        r"world 2 = 16",
    ):
        engine_config(str(tmp_path / "ds.json"), 2, None)
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="optim.batch_size = 64 but micro batch 8"):
        engine_config(str(tmp_path / "ds.json"), 2, 64)


def test_no_weight_decay_groups():
    student = DTMStudent(build_config("tiny").model, 48)
    names = {id(p): n for n, p in student.named_parameters()}
    tables = {n for n in names.values() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 1 + len(student.blocks)  # shared + one per block (the reference's default)
    decay, plain = param_groups(student, 0.05)  # the reference's rule: tables and mask token decay
    plain_names, decay_names = ({names[id(p)] for p in g["params"]} for g in (plain, decay))
    assert {"cls_token", "lm_head.bias", "blocks.0.attn.q_bias"} <= plain_names
    assert all(p.ndim <= 1 for p in plain["params"] if names[id(p)] != "cls_token")
    assert tables | {"mask_token", "lm_head.weight"} <= decay_names and decay["weight_decay"] == 0.05
    decay, plain = param_groups(student, 0.05, decay_tables=False)  # timm's rule
    plain_names = {names[id(p)] for p in plain["params"]}
    assert tables | {"mask_token", "cls_token", "lm_head.bias"} <= plain_names
    assert all(p.ndim > 1 for p in decay["params"]) and "lm_head.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_and_lose_loss(image_folder, tmp_path, stage):
    out = tmp_path / f"z{stage}"
    steps = 24 if stage == 0 else 3
    cmd = train_cmd(image_folder, out, ds_json(tmp_path / "ds.json", 8, stage), steps, "--optim.lr=0.02")
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{steps:08d}"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == [f"step{s:08d}" for s in range(4, steps + 1, 4)][-3:] + (
        [] if steps % 4 == 0 else [f"step{steps:08d}"]
    )
    if stage == 0:
        first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(steps - 3, steps + 1)) / 4
        assert last < 0.8 * first, (first, last)


def test_sigkill_then_resume_gives_the_same_losses(image_folder, tmp_path):
    ds = ds_json(tmp_path / "ds.json", 8)
    subprocess.run(
        train_cmd(image_folder, tmp_path / "a", ds, 12), check=True, cwd=ROOT, env=run_env(), capture_output=True
    )
    cmd = train_cmd(image_folder, tmp_path / "b", ds, 12)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (tmp_path / "b" / "metrics.jsonl").exists() and len(step_losses(tmp_path / "b")) >= 6
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(step_losses(tmp_path / "b"))
    assert 6 <= killed_at < 12
    done = subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert "resumed from step0000000" in done.stdout
    torch.testing.assert_close(step_losses(tmp_path / "b"), step_losses(tmp_path / "a"), rtol=1e-6, atol=0)


@pytest.mark.ranks(2)
def test_two_ranks_match_one_rank_with_accumulation(image_folder, tmp_path):
    """2 ranks x micro 4 and 1 rank x micro 4 x accumulation 2 run the same micro-batches (dtm_ds/data/__init__.py):
    equal per-step losses over 6 optimizer steps (rtol 1e-6: the gradient sums are added in another order)."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(train_cmd(image_folder, one, ds_json(tmp_path / "acc.json", 4, accum=2), 6), check=True, cwd=ROOT,
                   env=run_env(), capture_output=True)  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613"]
    cmd = torchrun + train_cmd(image_folder, two, ds_json(tmp_path / "ds4.json", 4), 6)[1:]
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    assert sorted(step_losses(one)) == list(range(1, 7))
    torch.testing.assert_close(step_losses(one), step_losses(two), rtol=1e-6, atol=0)


def test_timm_teacher_from_local_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "vit.pt")
    cfg = TeacherConfig(name="timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.pt"))
    model = build_config(
        "tiny", {"model.img_size": 64, "model.patch_size": 16, "dtm.n_max": [16, 16], "data.num_masked": 6}
    ).model
    teacher = build_teacher(cfg, model, torch.device("cpu"))
    images = torch.randn(2, 3, 64, 64)
    expected = net.eval().forward_features(teacher.scale * images + teacher.shift)[:, 1:]
    torch.testing.assert_close(teacher(images), expected)  # (B, 16, 192): patch tokens, no CLS
    with pytest.raises(ValueError, match="(?s)do not fit teacher timm:vit_tiny_patch16_224.*pos_embed"):
        build_teacher(cfg, build_config("tiny").model, torch.device("cpu"))  # 64 px weights, 32 px student
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict(), tmp_path / "v.pt")
    cfg = TeacherConfig(name="timm:vit_tiny_patch16_224", weights=str(tmp_path / "v.pt"))
    with pytest.raises(ValueError, match="gives 4 tokens for 32 px input, the student has a 8x8 grid"):
        build_teacher(cfg, build_config("tiny").model, torch.device("cpu"))


def test_export_is_a_timm_model_folder_with_the_probes_features(image_folder, tmp_path):
    """``export`` writes a folder that ``timm.create_model("local-dir:...", pretrained=True)`` loads with no other
    argument: its pooled output equals the probes' features of the run's own student (the mean of the
    final-normalised patch tokens), its preprocessing is the encoder's (ImageNet mean/std, 32 px, bicubic), its
    files are readable by the group, and dtm_ds reads it back as an encoder."""
    import stat

    import timm
    from timm.data import resolve_data_config

    from dtm_ds.features import _pooled
    from dtm_ds.pretrained import encoder_config, export, load_student

    out = tmp_path / "run"
    cmd = train_cmd(image_folder, out, ds_json(tmp_path / "ds.json", 8, 2), 2)
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    folder = Path(export(str(out), str(tmp_path / "exported")))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert all(p.stat().st_mode & stat.S_IRGRP for p in folder.iterdir())
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    student = load_student(out).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), _pooled(student, images, 1), rtol=0, atol=0)
    data = resolve_data_config({}, model=model)
    assert (tuple(data["mean"]), tuple(data["std"])) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert data["input_size"] == (3, 32, 32) and data["interpolation"] == "bicubic"
    assert encoder_config(folder) == encoder_config(out)
    again = load_student(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(images), student.forward_features(images), rtol=0, atol=0)


def test_nonfinite_losses_are_skipped_then_stop_the_run(image_folder, tmp_path):
    ds = ds_json(tmp_path / "ds.json", 8)
    ok = tmp_path / "ok"
    subprocess.run(train_cmd(image_folder, ok, ds, 6), check=True, cwd=ROOT, env=run_env({"nan_micro": [2]}),
                   capture_output=True)  # fmt: skip
    rows = [json.loads(line) for line in (ok / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["skipped_windows"] == 1
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN reached an optimizer step
    bad = tmp_path / "bad"
    cmd = train_cmd(image_folder, bad, ds, 20, "--run.max_nonfinite=3")
    done = subprocess.run(cmd, cwd=ROOT, env=run_env({"nan_micro": [5, 6, 7]}), capture_output=True, text=True)
    assert done.returncode != 0 and "3 non-finite losses in a row at step 6" in done.stderr
    assert (bad / "checkpoints" / "latest").read_text().strip() == "step00000004"  # the last good one


def test_a_nonfinite_micro_step_drops_exactly_its_window(image_folder, tmp_path):
    """Accumulation 2, a NaN at micro-step 2 (the first half of window 1, so the flag must survive the
    window's clean second half): window 1 is dropped whole. Reference:
    a clean run stopped after step 1 whose checkpoint is edited to say window 1 was consumed and dropped,
    then resumed. Equal losses at steps 2 and 3 mean the drop left parameters, Adam state, lr schedule and
    DeepSpeed's accumulation phase exactly as they were."""
    ds = ds_json(tmp_path / "acc.json", 4, accum=2)
    dropped, edited = tmp_path / "dropped", tmp_path / "edited"
    subprocess.run(train_cmd(image_folder, dropped, ds, 3), check=True, cwd=ROOT, env=run_env({"nan_micro": [2]}),
                   capture_output=True)  # fmt: skip
    rows = [json.loads(line) for line in (dropped / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_windows"]) for r in rows] == [(1, 0), (2, 1), (3, 1)]
    subprocess.run(train_cmd(image_folder, edited, ds, 1), check=True, cwd=ROOT, env=run_env(), capture_output=True)
    tag = edited / "checkpoints" / "step00000001"
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    states["train_state"] |= {"epoch_step": 2, "skipped_windows": 1}
    torch.save(states, states_file := tag / "mp_rank_00_model_states.pt")  # the edit, recorded as intact below
    record = json.loads((tag / "complete.json").read_text())
    record["files"]["mp_rank_00_model_states.pt"] = (tag / "mp_rank_00_model_states.pt").stat().st_size
    record["sha256"]["mp_rank_00_model_states.pt"] = hashlib.sha256(states_file.read_bytes()).hexdigest()
    (tag / "complete.json").write_text(json.dumps(record))
    subprocess.run(train_cmd(image_folder, edited, ds, 3), check=True, cwd=ROOT, env=run_env(), capture_output=True)
    assert step_losses(edited) == step_losses(dropped)


def test_compiled_student_and_dtm_step_match_eager(image_folder, tmp_path):
    ds = ds_json(tmp_path / "ds.json", 8)
    for name, extra in (("eager", ()), ("compiled", ("--run.compile=aot_eager",))):
        cmd = train_cmd(image_folder, tmp_path / name, ds, 3, *extra)
        subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    torch.testing.assert_close(step_losses(tmp_path / "compiled"), step_losses(tmp_path / "eager"), rtol=1e-5, atol=0)


def test_sigterm_saves_a_checkpoint_and_exits(image_folder, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(image_folder, out, ds_json(tmp_path / "ds.json", 8), 200, "--run.save_every=1000")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(step_losses(out)) >= 3):
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.time() - sent < 60
    stopped = json.loads(stdout.strip().splitlines()[-1])["step"]
    assert 3 <= stopped < 200 and (out / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"


def test_reference_init_is_bounded_at_one_std_and_rescaled():
    """model.init=reference: linear and patch-embedding weights and the tokens cut at +-0.02 (effective std
    about 0.0108), block outputs divided by sqrt(2 * block number); timm's init is not cut there."""
    model = dataclasses.replace(build_config("vitb").model, embed_dim=192, num_heads=3)  # vitb's 12 blocks, narrower
    torch.manual_seed(0)
    ref = DTMStudent(model, 512)
    assert ref.blocks[0].mlp.fc1.weight.abs().max() <= 0.02 and ref.patch_embed.proj.weight.abs().max() <= 0.02
    assert 0.0100 < ref.blocks[0].mlp.fc1.weight.std() < 0.0116
    assert max(ref.cls_token.abs().max(), ref.mask_token.abs().max(), ref.lm_head.weight.abs().max()) <= 0.02
    for i, block in enumerate(ref.blocks):
        bound = 0.02 / (2 * (i + 1)) ** 0.5
        assert block.attn.proj.weight.abs().max() <= bound * (1 + 1e-6) and block.mlp.fc2.weight.abs().max() <= bound
    torch.manual_seed(0)
    timm_init = DTMStudent(dataclasses.replace(model, init="timm"), 512)
    assert timm_init.blocks[0].mlp.fc1.weight.abs().max() > 0.05 and timm_init.blocks[0].mlp.fc1.weight.std() > 0.019


def test_dtm_loss_weight_and_normalised_targets_in_a_run(image_folder, tmp_path):
    """dtm.loss_weight scales what is backpropagated, not what is logged: at step 1 (same weights, same
    batch) the gradient norm is exactly proportional to the weight and the loss is the same.
    dtm.normalize_target changes the loss itself."""
    ds, rows = ds_json(tmp_path / "ds.json", 8), {}
    for name, extra in (("w1", ()), ("w2", ("--dtm.loss_weight=2",)), ("w0", ("--dtm.loss_weight=0",)),
                        ("norm", ("--dtm.normalize_target=true",))):  # fmt: skip
        subprocess.run(train_cmd(image_folder, tmp_path / name, ds, 1, *extra), check=True, cwd=ROOT, env=run_env(),
                       capture_output=True)  # fmt: skip
        rows[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    assert rows["w2"]["loss"] == rows["w1"]["loss"] == rows["w0"]["loss"]
    assert rows["w2"]["grad_norm"] == pytest.approx(2 * rows["w1"]["grad_norm"], rel=1e-6)
    assert rows["w0"]["grad_norm"] == 0.0 and rows["w1"]["grad_norm"] > 0
    assert rows["norm"]["loss"] != rows["w1"]["loss"] and rows["norm"]["loss"] == rows["norm"]["loss"]


def test_a_logged_loss_equals_an_independent_recompute_of_its_step(image_folder, tmp_path):
    """A real dtm_ds/train.py step with a non-default beta: its batch, teacher targets, student outputs and
    schedule saved (DTM_FAULTS dump), the pixels teacher's targets recomputed by hand from the images, and
    the logged per-level and mean losses recomputed by the slow reference (bench/morph_reference.py)."""
    from bench.morph_reference import reference_loss

    out, dump = tmp_path / "run", tmp_path / "step.pt"
    cmd = train_cmd(image_folder, out, ds_json(tmp_path / "ds.json", 4), 1, "--dtm.beta=0.7", "--dtm.loss_weight=3")
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env({"dump_micro": 0, "dump_to": str(dump)}), capture_output=True)
    saved, row = torch.load(dump), json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    images, targets, pred, schedule = (saved[k] for k in ("images", "targets", "pred", "schedule"))
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(4, 64, 48)  # (B, N, 3*4*4)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True, unbiased=False)
    torch.testing.assert_close(targets, (patches - mean) / (var + 1e-6).sqrt())
    assert schedule.shape[0] == 2 and schedule.sum() > 0  # two levels, something merged
    levels = [reference_loss(pred, targets, schedule[i : i + 1], "smooth_l1", beta=0.7).item() for i in range(2)]
    assert row["loss_level0"] == pytest.approx(levels[0], rel=1e-5)
    assert row["loss_level1"] == pytest.approx(levels[1], rel=1e-5)
    assert row["loss"] == pytest.approx(sum(levels) / 2, rel=1e-5)  # logged unweighted (dtm.loss_weight=3)


def test_logs_read_well_in_a_batch_system(image_folder, tmp_path):
    """Without a terminal (a batch system's log file): no progress bar (no carriage returns), one plain line per
    logging step with step/total, loss, lr, img/s and the time left; a start line with the data's size and the
    schedule; a last line saying where everything was written, also in the JSON summary."""
    out = tmp_path / "run"
    cmd = train_cmd(image_folder, out, ds_json(tmp_path / "ds.json", 4), 6, "--run.log_every=2")
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "\r" not in done.stdout + done.stderr, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    steps = [line for line in lines if line.startswith("pretrain step ")]
    assert [line.split()[2] for line in steps] == ["2/6", "4/6", "6/6"]
    pattern = r"pretrain step \d/6 \([\d.]+ %\) loss [\d.e-]+ lr [\d.e-]+ img/s \d+ ETA \d+:\d\d:\d\d"
    assert all(re.fullmatch(pattern, line) for line in steps), steps
    assert f"data {image_folder}: 40 samples, 10 steps per epoch; lr peak " in done.stdout
    summary = json.loads(lines[-1])
    assert summary["checkpoint"] == str(out / "checkpoints" / "step00000006")
    assert summary["metrics"] == str(out / "metrics.jsonl") and summary["tensorboard"] == str(out / "tb")
    assert (
        lines[-2]
        == f"wrote: checkpoint {out}/checkpoints/step00000006, metrics {out}/metrics.jsonl, tensorboard {out}/tb"
    )


def test_deepspeed_monitors_get_every_logged_scalar(image_folder, tmp_path):
    """A DeepSpeed JSON with ``csv_monitor`` on: its CSV files hold the same values at the same steps as
    metrics.jsonl (loss, lr, img/s, ...), not only DeepSpeed's own learning rate."""
    import csv

    out, monitor = tmp_path / "run", tmp_path / "monitor"
    ds = ds_json(tmp_path / "ds.json", 4, csv_monitor={"enabled": True, "output_path": str(monitor), "job_name": "j"})
    subprocess.run(train_cmd(image_folder, out, ds, 4, "--run.log_every=2"), check=True, cwd=ROOT, env=run_env(),
                   capture_output=True)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "img_per_s", "loss_level1"):
        with open(monitor / "j" / f"train_{key}.csv") as f:
            table = list(csv.reader(f))
        assert table[0] == ["step", key]
        assert [(int(s), float(v)) for s, v in table[1:]] == [(r["step"], r[key]) for r in rows]


def _knn_sets(tmp_path: Path) -> list[str]:
    from tests.conftest import write_class_folder

    write_class_folder(tmp_path / "knn_train", {"a": 9, "b": 8, "c": 7}, size=(40, 40))
    write_class_folder(tmp_path / "knn_val", {"a": 5, "b": 4, "c": 4}, size=(36, 36))
    return ["--run.log_every=2", "--run.knn_every=2", f"--run.knn_train={tmp_path / 'knn_train'}",
            f"--run.knn_val={tmp_path / 'knn_val'}"]  # fmt: skip


def _knn_rows(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}


def test_online_knn_is_logged_at_its_steps_resumes_to_the_same_numbers_and_equals_eval_knn(image_folder, tmp_path):
    """``--run.knn_every=2``: the logging rows of steps 2, 4 and 6 carry ``knn_top1`` (and its cost,
    ``knn_seconds``, left out of img/s), as does TensorBoard; the losses are those of a run without it; a run
    signalled to stop during step 2's k-NN stops after step 3, and resumed logs the same numbers at the same steps
    as an uninterrupted one; the figure at
    the last step is eval/knn.py's on the run's final checkpoint (k = 20, T = 0.07, the same sets). Settings it
    cannot run with are refused first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    knn = [*_knn_sets(tmp_path), "--model.drop_path=0.2"]  # drop path: the student must be back in training mode
    ds = ds_json(tmp_path / "ds.json", 8)
    straight, resumed, without = tmp_path / "straight", tmp_path / "resumed", tmp_path / "without"
    for out, extra in ((straight, knn), (without, [*knn[:1], "--model.drop_path=0.2"])):
        subprocess.run(train_cmd(image_folder, out, ds, 6, *extra), check=True, cwd=ROOT, env=run_env(),
                       capture_output=True)  # fmt: skip
    assert step_losses(straight) == step_losses(without)  # the k-NN leaves training as it was
    want = _knn_rows(straight)
    assert sorted(want) == [2, 4, 6] and all(0 <= v <= 100 for v in want.values())
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["knn_seconds"] > 0 for r in rows) and [r["step"] for r in rows] == [2, 4, 6]
    tb = EventAccumulator(str(straight / "tb"))
    tb.Reload()
    logged = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in tb.Tensors("train/knn_top1")}
    assert logged == pytest.approx(want)
    # SIGTERM in the middle of step 2's k-NN: it finishes, the ranks stop after the next window, save and exit 0
    stopped = subprocess.run(train_cmd(image_folder, resumed, ds, 6, *knn), cwd=ROOT, capture_output=True,
                             env=run_env({"sigterm_knn": 2}), text=True)  # fmt: skip
    assert stopped.returncode == 0 and "stopped by a signal at step 3 (all ranks)" in stopped.stdout, stopped.stderr
    done = subprocess.run(train_cmd(image_folder, resumed, ds, 6, *knn), check=True, cwd=ROOT, env=run_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert "resumed from step00000003" in done.stdout and "knn top-1" in done.stdout
    assert _knn_rows(resumed) == want
    cmd = [sys.executable, "eval/knn.py", "--encoder", str(straight), "--train", str(tmp_path / "knn_train"),
           "--val", str(tmp_path / "knn_val"), "--workers=0"]  # fmt: skip
    probe = subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert json.loads(probe.stdout.strip().splitlines()[-1])["top1"] == want[6]
    refused = {"--run.knn_every=3": "run.knn_every=3 must be a multiple of run.log_every=2",
               "--run.knn_val=none": "run.knn_every=2 needs --run.knn_train and --run.knn_val"}  # fmt: skip
    for bad, message in refused.items():
        done = subprocess.run(train_cmd(image_folder, tmp_path / "bad", ds, 2, *knn, bad), cwd=ROOT, env=run_env(),
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_online_knn_runs_on_a_bf16_engine(image_folder, tmp_path):
    """A bf16 ZeRO-2 engine holds a bf16 student, on CPU too: the k-NN's forward runs in its weights' dtype
    (before, float input met bf16 weights: "Input type (float) and bias type (c10::BFloat16) should be the same")."""
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    ds = json.loads(Path(ds_json(tmp_path / "ds.json", 8)).read_text()) | bf16
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    done = subprocess.run(train_cmd(image_folder, out, str(tmp_path / "ds.json"), 2, *_knn_sets(tmp_path)), cwd=ROOT,
                          env=run_env(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0 <= _knn_rows(out)[2] <= 100
