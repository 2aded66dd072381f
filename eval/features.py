"""Frozen-encoder features for k-NN and linear probing: mean-pooled patch tokens of the last block(s)."""

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from data_prep.sources import Listing
from dtm_ds.data import normalize


class EvalImages(Dataset):
    """Resize (shorter side to size / crop_ratio, bicubic) + centre crop to ``size``; uint8 [3, S, S]."""

    def __init__(self, listing: Listing, size: int, crop_ratio: float = 0.875):
        self.listing, self.size, self.resize = listing, size, round(size / crop_ratio)

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, i: int):
        image = torch.from_numpy(self.listing.image(i)).permute(2, 0, 1)
        image = TF.resize(image, [self.resize], TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(image, [self.size, self.size]), self.listing.labels[i]


@torch.no_grad()
def extract(encoder, listing: Listing, crop_ratio: float = 0.875, blocks: int = 1, batch: int = 256, workers: int = 1):
    """Features [n, blocks * D] (mean over patch tokens of each of the last ``blocks`` blocks, final norm
    applied) and labels [n] of a frozen dtm_ds student or timm Beit."""
    encoder.eval()
    size = encoder.patch_embed.img_size[0]
    loader = DataLoader(EvalImages(listing, size, crop_ratio), batch_size=batch, num_workers=workers)
    depth = len(encoder.blocks)
    feats, labels = [], []
    for images, y in loader:
        x = normalize(images.float() / 255)
        if blocks == 1:
            tokens = [encoder.forward_features(x)[:, encoder.num_prefix_tokens :]]
        else:
            maps = encoder.forward_intermediates(
                x, indices=list(range(depth - blocks, depth)), norm=True, output_fmt="NLC", intermediates_only=True
            )
            tokens = [m[:, encoder.num_prefix_tokens :] if m.dim() == 3 else m.flatten(2).transpose(1, 2) for m in maps]
        feats.append(torch.cat([t.mean(1) for t in tokens], dim=1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
