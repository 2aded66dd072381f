"""A timm BEiT classifier (mean pooling) initialised from a dtm_ds student, and its accuracy counts."""

import torch
from timm.models.beit import Beit, checkpoint_filter_fn

from dtm_ds.config import ModelConfig
from dtm_ds.pretrained import fold_shared_table, load_student


def classifier_args(model: ModelConfig, num_classes: int, img_size: int) -> dict:
    """timm ``Beit`` arguments of the classifier: one relative position table per block, no absolute positions,
    mean pooling + fc_norm, the head (also its timm export's ``model_args``)."""
    return dict(img_size=img_size, patch_size=model.patch_size, num_classes=num_classes, global_pool="avg",
                use_fc_norm=True, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                mlp_ratio=model.mlp_ratio, init_values=model.layer_scale, use_abs_pos_emb=False,
                use_rel_pos_bias=True, use_shared_rel_pos_bias=False)  # fmt: skip


def build_classifier(model: ModelConfig, num_classes: int, drop_path: float, img_size: int) -> Beit:
    """The classifier of ``classifier_args`` with stochastic depth ``drop_path``."""
    return Beit(**classifier_args(model, num_classes, img_size), drop_path_rate=drop_path)


def load_pretrained(classifier: Beit, encoder: str) -> dict[str, list[str]]:
    """Copy a dtm_ds student into ``classifier``: every block's relative position table becomes its own
    pretrained table plus the shared one, as the reference fine-tunes (``--init_both_rpb``; both were
    added to the attention logits, so the sum gives the same attention); a student with only the shared
    table copies it into every block. timm's BEiT filter resizes tables and patch embeddings to the
    classifier's resolution; the pre-pooling norm is dropped (mean pooling uses a fresh fc_norm).
    Returns missing/unexpected keys."""
    state = fold_shared_table(load_student(encoder).encoder_state_dict(), len(classifier.blocks))
    state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = classifier.load_state_dict(checkpoint_filter_fn(state, classifier), strict=False)
    expected_new = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    report = {"missing": sorted(missing), "unexpected": sorted(unexpected)}
    if unexpected or set(missing) - expected_new:
        raise ValueError(f"{encoder} does not fit the classifier: {report}")
    return report


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Correct counts at each k (k capped by the number of classes)."""
    return [int(n) for n in hit_counts(logits, labels, ks)[:-1].tolist()]


def hit_counts(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """float64 [len(ks) + 1] on the logits' device: correct counts at each k (k capped by the number of
    classes), then the number of samples. No host synchronisation."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    samples = torch.full((), len(labels), device=logits.device)  # a fill, not a host-to-device copy
    counts = [hits[:, :k].any(1).sum() for k in ks] + [samples]
    return torch.stack(counts).double()
