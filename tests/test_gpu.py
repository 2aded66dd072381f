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
