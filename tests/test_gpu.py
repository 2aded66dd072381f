"""Checks that need CUDA (marker ``gpu``: skipped without a GPU; bench/gpu_check.sh runs them on one)."""

import pytest
import torch

from bench.morph_reference import canonical
from dtm_ds.graphed import GraphedMorph
from dtm_ds.morph import morph_levels, sample_schedule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_graph_replay_equals_eager_over_20_schedules():
    """One captured graph replayed for 20 sampled schedules gives the eager CPU partitions (host plan)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    targets = torch.randn(16, 196, 512, device="cuda", generator=gen)
    graphed = GraphedMorph(cuda_graph=True)
    for i in range(20):
        schedule = sample_schedule([196, 196], [14, 14], gen)
        got = graphed(targets, schedule).groups.cpu()
        want = morph_levels(targets.cpu(), schedule.cpu()).groups
        for a, b in zip(got.flatten(0, 1), want.flatten(0, 1), strict=True):
            assert canonical(a.tolist()) == canonical(b.tolist()), f"schedule {i}: {schedule.tolist()}"
    assert len(graphed.graphs) == 1  # captured once, replayed


def test_clip_architecture_teacher_in_bf16_through_sdpa():
    """A CLIP ViT-B/16-architecture teacher (timm's tower, random weights: nothing is downloaded) runs in
    bf16 with attention restricted to SDPA's flash / memory-efficient kernels (no math fallback), and its
    targets agree with fp32."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dtm_ds.teacher import TokenTeacher

    torch.manual_seed(0)
    tower = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0).cuda()
    assert all(block.attn.fused_attn for block in tower.blocks)  # timm calls F.scaled_dot_product_attention
    images = torch.randn(8, 3, 224, 224, device="cuda")
    want = TokenTeacher(tower, 768)(images)
    bf16 = TokenTeacher(tower.to(torch.bfloat16), 768, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        got = bf16(images)
    assert got.shape == (8, 196, 768) and got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.98, float(cos.min())


def test_open_clip_teacher_in_its_default_fp16_autocast(tmp_path):
    """The pretraining teacher path itself: open_clip's CLIP ViT-B/16 architecture (random weights from a local
    file) through ``build_teacher`` on the GPU in the default precision (fp16 autocast over the stored weights):
    196 tokens of 512, fp32 out, the matrix products in fp16, and within cosine 0.99 of the fp32 targets."""
    import open_clip

    from dtm_ds.config import TeacherConfig, build_config
    from dtm_ds.teacher import build_teacher

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), tmp_path / "clip.pt")
    model, cuda = build_config("vitb").model, torch.device("cuda")
    teacher = build_teacher(TeacherConfig(weights=str(tmp_path / "clip.pt")), model, cuda)
    assert teacher.dtype == torch.float16
    seen = []
    fc = teacher.encoder.transformer.resblocks[0].mlp.c_fc
    handle = fc.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images = torch.randn(16, 3, 224, 224, device=cuda)
    got = teacher(images)
    handle.remove()
    assert seen == [torch.float16] and got.shape == (16, 196, 512) and got.dtype == torch.float32
    fp32 = build_teacher(TeacherConfig(weights=str(tmp_path / "clip.pt"), dtype="fp32"), model, cuda)
    cos = torch.nn.functional.cosine_similarity(got, fp32(images), dim=-1)
    assert cos.min() > 0.99, float(cos.min())


def test_collectives_on_nccl_take_host_tensors(monkeypatch):
    """On an NCCL group (one rank; ``world`` reported as 2 so the collectives run) the helpers accept host
    tensors, reduce them on the GPU and hand the results back on the host."""
    import os

    from dtm_ds import distributed
    from dtm_ds.distributed import _free_port

    store = torch.distributed.TCPStore("127.0.0.1", _free_port(), 1, True)
    torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        assert distributed.comm_device() == torch.device("cuda", torch.cuda.current_device())
        monkeypatch.setattr(distributed, "world", lambda: 2)
        total = distributed.sum_tensor(torch.tensor([1.0, 2.0]))  # a CPU tensor, as fine-tuning's counts were
        assert total.device.type == "cpu" and total.tolist() == [1.0, 2.0]
        assert distributed.agree(torch.tensor(True, device="cuda"), False) == (True, False)
        assert distributed.on_rank0(lambda: {"a": 1}) == {"a": 1}
    finally:
        torch.distributed.destroy_process_group()


def test_morphing_on_its_own_stream_equals_the_sequential_step():
    """``GraphedMorph.launch`` replays the graph on a stream of its own while the main stream is busy (a
    large matmul standing in for the student); after ``wait()`` the loss reads this micro-step's groups, not
    the previous replay's: partitions and losses equal a sequential run bit for bit, over 10 micro-steps."""
    from dtm_ds.morph import morphed_loss

    gen = torch.Generator(device="cuda").manual_seed(3)
    busy = torch.randn(8192, 8192, device="cuda")
    concurrent, sequential = GraphedMorph(cuda_graph=True), GraphedMorph(cuda_graph=True)
    for _ in range(10):
        targets = torch.randn(64, 196, 512, device="cuda", generator=gen)
        pred = torch.randn(64, 196, 512, device="cuda", generator=gen)
        schedule = sample_schedule([196, 196], [14, 14], gen)
        pending = concurrent.launch(targets, lambda s=schedule: s.clone())
        busy @ busy  # the main stream's work meanwhile
        got = morphed_loss(pred, targets, pending.wait(), "smooth_l1", 2.0)
        got_groups = pending.morphed.groups.clone()
        want_morphed = sequential(targets, schedule)
        want = morphed_loss(pred, targets, want_morphed, "smooth_l1", 2.0)
        assert torch.equal(got_groups, want_morphed.groups) and torch.equal(got, want)
