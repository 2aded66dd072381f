"""End-to-end fine-tuning of a pretrained dtm_ds student as a timm BEiT classifier, through DeepSpeed.

    deepspeed eval/finetune.py --encoder RUN_DIR_OR_EXPORT --dataset imagenet --data /data/imagenet \
        --ds_config ds_configs/zero2_bf16.json --output_dir out/ft
    python eval/finetune.py --encoder outputs/demo/run --dataset fmnist --data fashion_mnist \
        --ds_config ds_configs/cpu.json --output_dir out/ft

Recipe per dataset in eval/recipes.py (``--recipe.<field>=value`` overrides). timm provides RandAugment,
random erasing (``create_transform``), Mixup/CutMix, the soft-target and label-smoothing losses and the
layer-decay parameter groups. Top-1/top-5 on the evaluation split every epoch; checkpoints at every
epoch end (the last ``keep_last``) plus ``best``; a re-run resumes exactly from the latest epoch.
"""

import dataclasses
import json
import random
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch.utils.data import DataLoader, DistributedSampler

from data_prep.datasets import open_listing
from data_prep.sources import select
from dtm_ds import checkpoint, distributed
from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD
from dtm_ds.logs import RunLog
from dtm_ds.train import cast_float_buffers, cut_next_checkpoint_write, engine_config, engine_dtype, lr_factor
from eval.classifier import ListingImages, accuracy, build_classifier, encoder_config, load_pretrained
from eval.recipes import RECIPES, Recipe

SPLITS = {
    "imagenet": ("train", "val"),
    "inat18": ("train", "val"),
    "inat19": ("train", "val"),
    "fmnist": ("train", "test"),
}


@dataclasses.dataclass
class Job:
    """What to fine-tune on what, and where to write it."""

    encoder: str
    dataset: str
    data: str
    output_dir: str = "outputs/finetune"
    random_init: bool = False
    workers: int = 2
    seed: int = 0
    keep_last: int = 2
    train_per_class: int | None = None
    eval_per_class: int | None = None
    max_epochs: int | None = None
    """Stop after this many epochs (the schedule still spans recipe.epochs); a re-run continues."""
    log_every: int = 10
    fault_kill_in_save: int = 0
    """Fault injection for tests: SIGKILL halfway through writing the checkpoint of this epoch (0: never)."""


class FineTuner:
    def __init__(self, job: Job, recipe: Recipe, ds_config: dict, device: torch.device):
        self.job, self.recipe, self.device = job, recipe, device
        self.output_dir, self.seed = job.output_dir, job.seed
        train_split, eval_split = SPLITS.get(job.dataset, ("trainval", "test"))
        reader = None if job.dataset == "fmnist" else job.dataset
        self.train_set = select(open_listing(job.data, train_split, reader), per_class=job.train_per_class)
        self.eval_set = select(open_listing(job.data, eval_split, reader), per_class=job.eval_per_class)
        self.classes = len(self.train_set.classes)
        torch.manual_seed(job.seed)
        model = build_classifier(encoder_config(job.encoder), self.classes, recipe.drop_path, recipe.img_size)
        self.report = None if job.random_init else load_pretrained(model, job.encoder)
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        accum = ds_config.get("gradient_accumulation_steps", 1)
        self.steps_per_epoch = len(self.train_set) // (self.micro * distributed.world()) // accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"global batch {ds_config['train_batch_size']} exceeds the {len(self.train_set)} training images"
            )
        self.engine = self._engine(model, ds_config)
        mixing = recipe.mixup > 0 or recipe.cutmix > 0
        self.mixup = (
            Mixup(
                mixup_alpha=recipe.mixup,
                cutmix_alpha=recipe.cutmix,
                label_smoothing=recipe.smoothing,
                num_classes=self.classes,
            )
            if mixing
            else None
        )
        self.criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(recipe.smoothing)
        self.state = {"epoch": 0, "best_top1": 0.0}
        self.stop_requested = False

    def _engine(self, model, ds_config: dict):
        import deepspeed

        r = self.recipe
        peak = r.lr * ds_config["train_batch_size"] / 256
        groups = param_groups_layer_decay(model, r.weight_decay, model.no_weight_decay(), layer_decay=r.layer_decay)
        for group in groups:  # LambdaLR scales each group's initial lr, so the layer scale goes in here
            group["lr"] = peak * group.pop("lr_scale", 1.0)
        optimizer = torch.optim.AdamW(groups, lr=peak)
        total, warmup = r.epochs * self.steps_per_epoch, round(r.warmup_epochs * self.steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, r.min_lr / peak))
        cast_float_buffers(model, engine_dtype(ds_config))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        return engine

    def loader(self, train: bool, epoch: int) -> DataLoader:
        r = self.recipe
        transform = create_transform(
            r.img_size,
            is_training=train,
            auto_augment=r.auto_augment if train else None,
            re_prob=r.reprob if train else 0.0,
            interpolation="bicubic",
            crop_pct=r.crop_pct,
            scale=tuple(r.scale),
            color_jitter=r.color_jitter,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        dataset = ListingImages(self.train_set if train else self.eval_set, transform)
        sampler = DistributedSampler(
            dataset, distributed.world(), distributed.rank(), shuffle=train, seed=self.seed, drop_last=train
        )
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)  # worker seeds: a function of the epoch
        return DataLoader(
            dataset,
            batch_size=self.micro,
            sampler=sampler,
            num_workers=self.job.workers,
            drop_last=train,
            generator=gen,
            persistent_workers=False,
        )

    def train_epoch(self, epoch: int, log: RunLog) -> float:
        """One epoch; returns its mean training loss (over ranks)."""
        for seeder in (random.seed, np.random.seed, torch.manual_seed):  # mixup and drop path: per epoch
            seeder(self.seed * 1000 + epoch + distributed.rank())
        self.engine.train()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for images, labels in self.loader(True, epoch):
            images, labels = images.to(self.device), labels.to(self.device)
            if self.mixup:
                images, labels = self.mixup(images, labels)
            loss = self.criterion(self.engine(images.to(_dtype(self.engine))).float(), labels)
            self.engine.backward(loss)
            self.engine.step()
            total += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=self.device)])
            step = self.engine.global_steps
            if self.engine.is_gradient_accumulation_boundary() and step % self.job.log_every == 0:
                values = {"loss": distributed.mean_tensor(loss).item(), "lr": self.engine.get_lr()[0], "epoch": epoch}
                log.step(step, values, self.engine.train_batch_size())
            if self.stop_requested:
                break
        total = distributed.mean_tensor(total)
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        counts = torch.zeros(3, dtype=torch.float64)
        for images, labels in self.loader(False, 0):
            logits = self.engine(images.to(self.device).to(_dtype(self.engine))).float().cpu()
            counts += torch.tensor([*accuracy(logits, labels), len(labels)], dtype=torch.float64)
        counts = distributed.mean_tensor(counts) * distributed.world()
        return {"top1": 100 * counts[0].item() / counts[2].item(), "top5": 100 * counts[1].item() / counts[2].item()}

    def fit(self) -> dict[str, float]:
        tag = checkpoint.latest_tag(self.output_dir, prefix="epoch")
        if tag is not None:
            _, client = self.engine.load_checkpoint(str(checkpoint.checkpoint_dir(self.output_dir)), tag)
            self.state = {k: client[k] for k in self.state}
        log = RunLog(
            self.output_dir,
            distributed.rank() == 0,
            self.recipe.epochs * self.steps_per_epoch,
            self.engine.global_steps,
        )
        result = {}
        last = min(self.recipe.epochs, self.job.max_epochs or self.recipe.epochs)
        for sig in (signal.SIGTERM, signal.SIGINT):  # preemption: stop after the current step
            signal.signal(sig, lambda *_: setattr(self, "stop_requested", True))
        for epoch in range(self.state["epoch"], last):
            train_loss = self.train_epoch(epoch, log)
            if self.stop_requested:  # checkpoints are per epoch: a re-run repeats this one exactly
                if distributed.rank() == 0:
                    print(f"stopped by a signal in epoch {epoch}; a re-run resumes from epoch {epoch}", flush=True)
                break
            result = self.evaluate() | {"epoch": epoch, "step": self.engine.global_steps, "train_loss": train_loss}
            best = result["top1"] > self.state["best_top1"]
            self.state["best_top1"] = max(result["top1"], self.state["best_top1"])
            if distributed.rank() == 0:  # before the checkpoint: a kill in between repeats this row, never loses it
                with open(Path(self.output_dir) / "eval.jsonl", "a") as f:
                    f.write(json.dumps(result | {"best_top1": self.state["best_top1"]}) + "\n")
                for key in ("top1", "top5"):
                    log.writer.add_scalar(f"eval/{key}", result[key], epoch)
            self.state["epoch"] = epoch + 1
            if best:
                checkpoint.save(self.engine, self.output_dir, epoch + 1, dict(self.state), 1, tag="best")
            if self.job.fault_kill_in_save == epoch + 1:
                cut_next_checkpoint_write(self.engine)
            checkpoint.save(
                self.engine, self.output_dir, epoch + 1, dict(self.state), self.job.keep_last, prefix="epoch"
            )
        log.close()
        return result | {"best_top1": self.state["best_top1"]}


def _dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.half if engine.fp16_enabled() else torch.float32


def main(
    encoder: str,
    dataset: str,
    data: str,
    ds_config: str = "ds_configs/cpu.json",
    local_rank: int | None = None,
    **options,
) -> dict:
    """Fine-tune ``encoder`` on ``dataset`` (a key of eval/recipes.py) read from ``data``. Options: the
    fields of :class:`Job` (``--random_init`` keeps the architecture but not the weights: the baseline;
    ``--train_per_class`` / ``--eval_per_class`` subsample) and ``--recipe.<field>=value``."""
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(RECIPES)}")
    job_fields = {f.name for f in dataclasses.fields(Job)}
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    job = {k: v for k, v in options.items() if k in job_fields}
    tweaks = {k.removeprefix("recipe."): v for k, v in options.items() if k not in job_fields}
    unknown = sorted(set(tweaks) - recipe_fields)
    if unknown:
        raise ValueError(
            f"unknown options {unknown}; job fields: {sorted(job_fields)}; recipe fields: {sorted(recipe_fields)}"
        )
    job = Job(encoder, dataset, data, **job)
    recipe = dataclasses.replace(RECIPES[dataset], **tweaks)
    device = distributed.init(local_rank)
    engine_cfg = engine_config(ds_config, distributed.world(), recipe.batch_size, "recipe.batch_size")
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    tuner = FineTuner(job, recipe, engine_cfg, device)
    if distributed.rank() == 0 and tuner.report is not None:
        print(f"loaded {encoder}: new (randomly initialised) keys {tuner.report['missing']}", flush=True)
    result = tuner.fit()
    if distributed.rank() == 0:
        print(json.dumps({"encoder": encoder, "random_init": job.random_init, **result}), flush=True)
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda result: None)
