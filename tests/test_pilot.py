"""The pilot command (dtm_ds/pilot.py): its measures against hand computations, and tokens with planted groups
where morphing must raise both."""

import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from dtm_ds.pilot import even_schedule, morph_tokens, token_consistency, token_probe
from tests.helpers import ROOT, run_env


def test_consistency_is_the_mean_neighbour_cosine():
    tokens = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0))
    pairs = []
    for b in range(2):
        for r in range(3):
            for c in range(3):
                here = tokens[b, 3 * r + c]
                if c < 2:
                    pairs.append(F.cosine_similarity(here, tokens[b, 3 * r + c + 1], dim=0))
                if r < 2:
                    pairs.append(F.cosine_similarity(here, tokens[b, 3 * (r + 1) + c], dim=0))
    assert len(pairs) == 2 * 12
    assert abs(token_consistency(tokens, 3) - float(torch.stack(pairs).mean())) < 1e-6
    assert even_schedule(10, 4).tolist() == [[3, 3, 2, 2]] and even_schedule(3, 1).tolist() == [[3]]


def test_morphing_planted_groups_raises_consistency_and_the_token_probe():
    """Each image of class c is an 8x8 grid of four quadrants, each quadrant's tokens its class's centre for that
    quadrant plus noise: morphing (48 merges in 4 iterations: 16 groups) averages the noise within groups of one
    quadrant, so neighbours agree more and single tokens say their class more often."""
    g = torch.Generator().manual_seed(0)
    classes, images, d = 5, 40, 16
    centres = torch.randn(classes, 4, d, generator=g)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    quadrant = (2 * (rows >= 4) + (cols >= 4)).flatten()  # [64]
    labels = torch.arange(images) % classes
    tokens = centres[labels][:, quadrant] + 1.2 * torch.randn(images, 64, d, generator=g)
    morphed, groups = morph_tokens(tokens, 48, 4)
    assert groups == 16
    assert token_consistency(morphed, 8) > token_consistency(tokens, 8) + 0.1
    val = torch.arange(images) >= images // 2  # images 0..19 train the probe, 20..39 score it
    train = ~val
    raw = token_probe(tokens[train], labels[train], tokens[val], labels[val], classes)
    better = token_probe(morphed[train], labels[train], morphed[val], labels[val], classes)
    assert better > raw + 5, (raw, better)


def test_the_pilot_command_writes_its_table_json_and_plot(tmp_path):
    out = tmp_path / "pilot"
    cmd = [sys.executable, "-m", "dtm_ds", "pilot", "--model", "tiny", "--data", "fashion_mnist", "--per_class", "4",
           "--n", "8,40", "--k", "1,2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "pilot.json").read_text())
    assert (result["images"], result["classes"], result["grid"]) == (40, 10, 8)
    assert [(r["tokens"], r["n"], r["k"]) for r in result["rows"]] == [
        ("raw", 0, 0), ("morphed", 8, 1), ("morphed", 40, 1), ("morphed", 8, 2), ("morphed", 40, 2)]  # fmt: skip
    assert [r["groups"] for r in result["rows"]] == [64, 56, 33, 56, 24]  # one iteration merges at most 31 + 1
    assert (tmp_path / "pilot.png").stat().st_size > 10_000 and "token probe top-1" in done.stdout
