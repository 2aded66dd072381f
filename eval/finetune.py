"""End-to-end fine-tuning of a pretrained dtm_ds student as a timm BEiT classifier, through DeepSpeed.

    deepspeed eval/finetune.py --encoder RUN_DIR_OR_EXPORT --dataset imagenet --data /data/imagenet
        --ds_config ds_configs/zero2_bf16.json --output_dir out/ft        (one line)
    python eval/finetune.py --encoder outputs/demo/run --dataset fmnist --data fashion_mnist
        --ds_config ds_configs/cpu.json --output_dir out/ft

Recipe per dataset in eval/recipes.py (``--recipe.<field>=value`` overrides). timm provides RandAugment,
random erasing (``create_transform``), Mixup/CutMix, the soft-target and label-smoothing losses and the
layer-decay parameter groups. Top-1/top-5 on the evaluation split every epoch; checkpoints at every
epoch end (the last ``keep_last``) plus ``best``; a re-run resumes exactly from the latest epoch.
"""

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data_prep.datasets import open_listing
from data_prep.sources import select
from dtm_ds import devices, distributed, faults
from dtm_ds.checkpoint import Checkpointer
from dtm_ds.config import build_config
from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD
from dtm_ds.devices import cap_workers, quiet_worker, to_device
from dtm_ds.engine import (
    Windows,
    build_engine,
    engine_config,
    engine_dtype,
    ignore_stop_signals,
    lr_factor,
    no_decay_names,
    set_lr,
    stop_on_signals,
)
from dtm_ds.features import ListingImages
from dtm_ds.files import write_atomic
from dtm_ds.logs import RunLog
from dtm_ds.options import parse_options, read_config_file
from dtm_ds.pretrained import encoder_config, save_timm_folder
from dtm_ds.seeds import seed_of
from eval.classifier import build_classifier, classifier_args, hit_counts, load_pretrained
from eval.recipes import RECIPES, Recipe, recipe_for

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
    """A pretraining run folder (its latest checkpoint) or an export."""
    dataset: str
    """A recipe of eval/recipes.py (imagenet, inat18, inat19, cub, cars, aircraft, flowers, pets, fmnist)."""
    data: str
    """The dataset root (README: layouts) or a data_prep source."""
    output_dir: str = "outputs/finetune"
    """The run folder: checkpoints/, eval.jsonl, metrics.jsonl, tb/; a re-run resumes it."""
    random_init: bool = False
    """Keep the architecture, not the weights (the baseline)."""
    workers: int = 8
    """DataLoader workers per rank (capped by the cores of the node shared by its ranks)."""
    seed: int = 0
    """Seed of the head, the data order and every augmentation."""
    keep_last: int = 2
    """Epoch checkpoints kept (plus ``best``)."""
    train_per_class: int | None = None
    """Use only this many training images per class (a subsample)."""
    eval_per_class: int | None = None
    """Use only this many evaluation images per class."""
    max_epochs: int | None = None
    """Stop after this many epochs (the schedule still spans recipe.epochs); a re-run continues."""
    log_every: int = 10
    """Optimizer steps between lines of metrics.jsonl."""

    def __post_init__(self):
        at_least = {"keep_last": 1, "log_every": 1, "workers": 0, "train_per_class": 1, "eval_per_class": 1,
                    "max_epochs": 1}  # fmt: skip
        bad = [f"--{k}={getattr(self, k)} (at least {low})" for k, low in at_least.items()
               if getattr(self, k) is not None and getattr(self, k) < low]  # fmt: skip
        if bad:
            raise ValueError("out of range: " + "; ".join(bad))


def layer_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """The optimizer's parameter groups: timm's layer-wise lr decay (``lr_scale`` = layer_decay ** (depth + 1 -
    layer): 0 = patch embedding, CLS and shared table, i + 1 = block i, depth + 1 = final norm and head) and
    no weight decay on 1-D tensors and ``no_decay_names``."""
    skip = no_decay_names(model, recipe.decay_tables)
    return param_groups_layer_decay(model, recipe.weight_decay, skip, layer_decay=recipe.layer_decay)


def ladder(architecture, recipe: Recipe, classes: int = 1000) -> list[float]:
    """The lr multiplier of every layer (0 .. depth + 1), read from ``layer_groups`` of the classifier itself
    (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = build_classifier(architecture, classes, recipe.drop_path, recipe.img_size)
    scale = {id(p): group["lr_scale"] for group in layer_groups(model, recipe) for p in group["params"]}
    params = dict(model.named_parameters())
    blocks = [f"blocks.{i}.mlp.fc1.weight" for i in range(len(model.blocks))]
    return [scale[id(params[name])] for name in ["patch_embed.proj.weight", *blocks, "head.weight"]]  # layer order


JOB_MAY_CHANGE = frozenset({"output_dir", "workers", "keep_last", "log_every", "max_epochs", "data"})
"""Job fields a re-run in the same folder may change (where the data lives, cadence, length); all else, the
encoder and every recipe field included, must be the run's."""


def job_record(job: Job, recipe: Recipe) -> dict:
    """What a fine-tuning folder promises (``job.json``): the job (its encoder resolved) and the whole recipe."""
    fields = dataclasses.asdict(job) | {"encoder": str(Path(job.encoder).expanduser().resolve())}
    return {"job": fields, "recipe": json.loads(json.dumps(dataclasses.asdict(recipe)))}


def check_job_record(job: Job, recipe: Recipe) -> None:
    """A re-run continues the same fine-tuning: every field that differs from the folder's ``job.json`` (but
    ``JOB_MAY_CHANGE``) is an error naming it, before anything is written."""
    path = Path(job.output_dir) / "job.json"
    if not path.exists():
        if list((Path(job.output_dir) / "checkpoints").glob("epoch*")):
            raise ValueError(f"{job.output_dir} holds fine-tuning checkpoints but no job.json (an earlier dtm_ds "
                             "version): its encoder and recipe cannot be checked; use a new --output_dir")  # fmt: skip
        return
    old, new, gone = json.loads(path.read_text()), job_record(job, recipe), "(not recorded)"
    differ = [
        f"{part}.{k}: {old[part].get(k, gone)!r} -> {v!r}"
        for part in ("job", "recipe")
        for k, v in new[part].items()
        if k not in JOB_MAY_CHANGE and old[part].get(k, gone) != v
    ]
    if differ:
        raise ValueError(
            f"{job.output_dir} holds a fine-tuning with other settings; a re-run must continue it unchanged:\n  "
            + "\n  ".join(differ)
            + f"\nFields that may change: {', '.join(sorted(JOB_MAY_CHANGE))}. To start "
            "afresh, use a new --output_dir."
        )


def open_sets(job: Job):
    """``(train listing, evaluation listing)`` of ``job``: clear errors for a wrong root or layout."""
    train_split, eval_split = SPLITS.get(job.dataset, ("trainval", "test"))
    reader = None if job.dataset == "fmnist" else job.dataset
    train_set = select(open_listing(job.data, train_split, reader), per_class=job.train_per_class)
    return train_set, select(open_listing(job.data, eval_split, reader), per_class=job.eval_per_class)


@dataclasses.dataclass
class TuneState:
    """Where a fine-tuning run stands; saved in every checkpoint."""

    epoch: int = 0
    epoch_step: int = 0  # windows of ``epoch`` consumed (applied or dropped)
    skipped: int = 0  # windows dropped for a non-finite loss, over the whole run
    best_top1: float = 0.0
    epoch_loss: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # the epoch's loss sum, windows


class FineTuner:
    def __init__(self, job: Job, recipe: Recipe, ds_config: dict, device: torch.device, sets=None):
        self.job, self.recipe, self.device = job, recipe, device
        self.workers = cap_workers(job.workers, "fine-tuning loader")
        self.output_dir, self.seed = job.output_dir, job.seed
        self.train_set, self.eval_set = sets or open_sets(job)
        self.classes = len(self.train_set.classes)
        torch.manual_seed(job.seed)
        model = build_classifier(encoder_config(job.encoder), self.classes, recipe.drop_path, recipe.img_size)
        self.report = None if job.random_init else load_pretrained(model, job.encoder)
        self.micro, self.accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
        self.steps_per_epoch = len(self.train_set) // (self.micro * distributed.world()) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"global batch {ds_config['train_batch_size']} exceeds the {len(self.train_set)} training images"
            )
        self.saver = Checkpointer(self.output_dir, "epoch", job.keep_last)
        self.start = self.saver.plan(ds_config, distributed.world())  # another world: through the universal format
        self.engine = self._engine(model, self.start.engine_config(ds_config))
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
        self.state, self.windows = TuneState(), Windows(self.engine, self.optimizer, self.accum)

    def _engine(self, model, ds_config: dict):
        r = self.recipe
        self.peak = r.lr * ds_config["train_batch_size"] / r.lr_batch  # the recipe's lr at its own batch
        groups = layer_groups(model, r)
        self.total, self.warmup = r.epochs * self.steps_per_epoch, round(r.warmup_epochs * self.steps_per_epoch)
        self.engine, self.optimizer = build_engine(model, groups, ds_config)
        self.dtype = engine_dtype(ds_config)
        return self.engine

    def lr(self, step: int) -> float:
        """The peak (head) lr of the optimizer step after ``step`` applied steps."""
        return self.peak * lr_factor(step, self.total, self.warmup, self.recipe.min_lr / self.peak)

    def loader(self, train: bool, epoch: int, start: int = 0) -> DataLoader:
        """Training: epoch ``epoch`` from micro-batch ``start``; evaluation: this rank's share."""
        r = self.recipe
        transform = create_transform(
            r.img_size,
            is_training=train,
            auto_augment=r.auto_augment if train else None,
            re_prob=r.reprob if train else 0.0,
            re_mode=r.remode,
            interpolation="bicubic",
            crop_pct=r.crop_pct,
            scale=tuple(r.scale),
            color_jitter=r.color_jitter,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        dataset = SeededImages(ListingImages(self.train_set if train else self.eval_set, transform), self.seed, epoch)
        if train:  # this rank's micro-batches of the epoch's windows; the leftover (< one window) is dropped
            sampler = DistributedSampler(dataset, distributed.world(), distributed.rank(), True, self.seed, True)
            sampler.set_epoch(epoch)
            order = list(sampler)[start * self.micro : self.steps_per_epoch * self.accum * self.micro]
        else:  # every image exactly once over the ranks (no padding, unlike DistributedSampler)
            order = list(range(distributed.rank(), len(dataset), distributed.world()))
        pin, ahead = self.device.type == "cuda", 4 if self.workers else None  # pinned: async copies to the GPU
        return DataLoader(dataset, self.micro, sampler=order, num_workers=self.workers, pin_memory=pin,
                          prefetch_factor=ahead, worker_init_fn=quiet_worker)  # fmt: skip

    def train_epoch(self, log: RunLog) -> bool:
        """The rest of the current epoch, window by window; False when a stop signal ended it early (all
        ranks agree on the window through the window protocol; the run saves there)."""
        s, rank = self.state, distributed.rank()
        self.engine.train()
        batches = iter(self.loader(True, s.epoch, s.epoch_step * self.accum))

        def loss_of(m: int) -> tuple[torch.Tensor, torch.Tensor]:
            images, labels = next(batches)
            for seeder in (random.seed, np.random.seed, torch.manual_seed):  # mixup and drop path
                seeder(seed_of(self.seed, s.epoch, s.epoch_step, rank * self.accum + m, bits=32))
            images, labels = to_device(images, self.device), to_device(labels, self.device)
            if self.mixup:
                images, labels = self.mixup(images, labels)
            loss = self.criterion(self.engine(images.to(self.dtype)).float(), labels)
            return loss, loss

        while s.epoch_step < self.steps_per_epoch:
            lrs = set_lr(self.optimizer, self.lr(self.applied_steps()))
            window = self.windows.run(loss_of)
            s.epoch_step, s.skipped = s.epoch_step + 1, s.skipped + int(window.dropped)
            if not window.dropped:  # on the device: no host sync
                mean = window.value_sum.double() / self.accum
                self.epoch_loss += torch.stack([mean, torch.ones_like(self.epoch_loss[0])])
            step = self.applied_steps()
            if not window.dropped and step % self.job.log_every == 0:
                loss = distributed.mean_tensor(window.value).item()
                log.step(step, {"loss": loss, "lr": max(lrs), "lr_groups": lrs, "epoch": s.epoch},
                         self.engine.train_batch_size(), world=distributed.world())  # fmt: skip
            if window.stop:
                return False
        return True

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)  # top-1, top-5 hits, images
        for images, labels in self.loader(False, 0):
            images, labels = to_device(images, self.device), to_device(labels, self.device)
            counts += hit_counts(self.engine(images.to(self.dtype)).float(), labels)  # on the device: no sync
        top1, top5, images = distributed.sum_tensor(counts).tolist()  # each image counted once over the ranks
        return {"top1": 100 * top1 / images, "top5": 100 * top5 / images, "eval_images": int(images)}

    def fit(self) -> dict[str, float]:
        if self.start.tag is not None:
            self.state = TuneState(**self.saver.load(self.engine, self.start)["tune_state"])
        s = self.state
        self.epoch_loss = torch.tensor(s.epoch_loss, dtype=torch.float64, device=self.device)
        last = min(self.recipe.epochs, self.job.max_epochs or self.recipe.epochs)
        log = RunLog(self.output_dir, distributed.rank() == 0, last * self.steps_per_epoch, self.applied_steps(),
                     "finetune", monitor=self.engine.monitor)  # fmt: skip
        result = {}
        stop_on_signals(self.windows)  # preemption: agree on a window, save there and exit
        while s.epoch < last:
            epoch = s.epoch
            if not self.train_epoch(log):
                self.save(f"epoch{epoch:08d}-step{s.epoch_step:08d}")
                if distributed.rank() == 0:
                    print(f"stopped by a signal in epoch {epoch} after window {s.epoch_step} "
                          "(all ranks); a re-run resumes there", flush=True)  # fmt: skip
                break
            train = distributed.mean_tensor(self.epoch_loss)
            step = self.applied_steps()
            result = self.evaluate() | {"epoch": epoch, "step": step, "train_loss": (train[0] / train[1]).item()}
            best = result["top1"] > s.best_top1 or epoch == 0  # the first evaluation is the best so far
            s.best_top1 = max(result["top1"], s.best_top1)
            if distributed.rank() == 0:  # before the checkpoint: a kill in between repeats this row, never loses it
                with open(Path(self.output_dir) / "eval.jsonl", "a") as f:
                    f.write(json.dumps(result | {"best_top1": s.best_top1}) + "\n")
                for key in ("top1", "top5"):
                    log.scalar(f"eval/{key}", result[key], epoch)
            s.epoch, s.epoch_step = epoch + 1, 0
            self.epoch_loss.zero_()
            if best:
                self.save("best", keep_last=1)
                self.export_best(epoch, result)
            self.save(f"epoch{epoch + 1:08d}")
        log.close()
        return result | {"best_top1": s.best_top1, "done": s.epoch >= last}

    def export_best(self, epoch: int, result: dict) -> None:
        """Rank 0: the best classifier as a timm model folder ``<output_dir>/best_timm`` (``timm.create_model(
        "local-dir:...", pretrained=True)`` gives its logits); ZeRO-3 partitions the weights: not exported."""
        if distributed.rank() != 0 or self.engine.zero_optimization_stage() == 3:
            return
        ours = {"encoder": str(Path(self.job.encoder).resolve()), "dataset": self.job.dataset, "epoch": epoch,
                "top1": result["top1"], "classes": self.classes}  # fmt: skip
        state = {k: v.float() for k, v in self.engine.module.state_dict().items()}
        args = classifier_args(encoder_config(self.job.encoder), self.classes, self.recipe.img_size)
        save_timm_folder(state, args, Path(self.output_dir) / "best_timm", self.recipe.img_size, ours)

    def applied_steps(self) -> int:
        return self.engine.global_steps - self.state.skipped

    def save(self, tag: str, keep_last: int | None = None) -> None:
        faults.arm_checkpoint_kill(self.engine, tag)
        # the epoch's loss sums, averaged over the ranks (a collective: every rank saves): the checkpoint holds
        # rank 0's client state only, and every rank resumes from that mean, which keeps the epoch's mean exact
        state = dataclasses.replace(self.state, epoch_loss=distributed.mean_tensor(self.epoch_loss).tolist())
        self.saver.save(self.engine, self.applied_steps(), {"tune_state": dataclasses.asdict(state)}, tag, keep_last)


class SeededImages(Dataset):
    """A dataset whose item ``i`` is drawn with Python, NumPy and torch seeded from (seed, epoch, i): the
    augmentation of a sample does not depend on the worker or the batch it lands in, so a run resumed
    in the middle of an epoch draws exactly what it would have drawn."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        for seeder in (random.seed, np.random.seed, torch.manual_seed):
            seeder(seed_of(self.seed, self.epoch, i, bits=32))
        return self.dataset[i]


def main(
    encoder: str | None = None,
    dataset: str | None = None,
    data: str | None = None,
    ds_config: str | None = None,
    model: str | None = None,
    print_config: bool = False,
    config: str | None = None,
    local_rank: int | None = None,
    **options,
) -> dict | None:
    """Fine-tune ``encoder`` on ``dataset`` read from ``data``; more options: the job and recipe fields.

    Args:
        encoder: a pretraining run folder (its latest checkpoint) or an export.
        dataset: a recipe of eval/recipes.py (imagenet, inat18, inat19, cub, cars, aircraft, flowers, pets, fmnist).
        data: the dataset root (README: layouts) or a data_prep source.
        ds_config: DeepSpeed JSON; micro batch x accumulation x ranks must equal --recipe.batch_size. Default:
            ds_configs/zero2_bf16.json on a GPU machine, ds_configs/cpu.json on a CPU one.
        model: with --print_config and no --encoder: the preset whose size picks the recipe (vitb, vitl, ...).
        print_config: print the resolved job, recipe and peak lr as JSON and exit; reads no data or weights. The
            output is a valid ``--config`` file.
        config: a YAML or JSON file with the sections ``job`` and ``recipe`` (as --print_config prints them, also
            ``ds_config``); options on the command line win over it.
        local_rank: set by the deepspeed launcher.
    """
    if config:  # the file first, the command line over it
        derived = ("global_batch", "peak_lr", "peak_lr_rule", "layer_lr_scales", "ranks_for_global_batch",
                   "gradient_clipping")  # fmt: skip
        flat, extra = read_config_file(config, ("job", "recipe"), keep=("ds_config",), ignore=derived)
        from_file = {k.removeprefix("job."): v for k, v in flat.items() if k not in ("job.model", "job.depth")}
        given = {"encoder": encoder, "dataset": dataset, "data": data}
        encoder, dataset, data = (given[k] if given[k] is not None else from_file.pop(k, None) for k in given)
        for k in given:
            from_file.pop(k, None)
        model, ds_config = model or flat.get("job.model"), ds_config or extra.get("ds_config")
        options = from_file | options
    if dataset not in RECIPES:
        raise ValueError(f"--dataset {dataset!r} is not a recipe; choose one of {sorted(RECIPES)}")
    if encoder is None and not (print_config and model):
        raise ValueError("--encoder is required (a pretraining run folder or an export)")
    if data is None and not print_config:
        raise ValueError("--data is required (the dataset root or a data_prep source)")
    kinds = {f.name: f.type for f in dataclasses.fields(Job)} | {
        f"recipe.{f.name}": f.type for f in dataclasses.fields(Recipe)
    }
    named = {k if k in kinds or f"recipe.{k}" not in kinds else f"recipe.{k}": v for k, v in options.items()}
    parsed = parse_options(named, kinds)  # a recipe field may be given without its prefix
    job = {k: v for k, v in parsed.items() if not k.startswith("recipe.")}
    tweaks = {k.removeprefix("recipe."): v for k, v in parsed.items() if k.startswith("recipe.")}
    job = Job(encoder, dataset, data, **job)
    architecture = encoder_config(encoder) if encoder else build_config(model).model
    recipe = dataclasses.replace(recipe_for(dataset, architecture.depth), **tweaks)
    ds_path, chosen = devices.resolve_ds_config(ds_config)
    if print_config:
        print(json.dumps(resolved_settings(job, recipe, architecture, ds_path, model), indent=2))
        return None
    # every user input before the distributed set-up (which builds DeepSpeed's ops)
    check_job_record(job, recipe)
    world = distributed.planned_world()
    engine_cfg = engine_config(ds_path, world, recipe.batch_size, "recipe.batch_size")
    engine_cfg["gradient_clipping"] = recipe.clip_grad  # the recipe's, not the pretraining JSON's 3.0
    sets = open_sets(job)
    device = distributed.init(local_rank)
    distributed.check_world(world)
    tuner = FineTuner(job, recipe, engine_cfg, device, sets)  # encoder and engine errors: nothing written yet
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    lock = distributed.lock_run_folder(job.output_dir)  # noqa: F841 (held while main runs): a second launch exits 2
    if distributed.rank() == 0:
        write_atomic(Path(job.output_dir) / "job.json", json.dumps(job_record(job, recipe), indent=2))
    if distributed.rank() == 0:
        print(f"fine-tuning on {distributed.world()} x {device.type} ({distributed.backend()}); DeepSpeed config "
              f"{ds_path} ({chosen}); {tuner.workers} loader workers per rank", flush=True)  # fmt: skip
        print(f"peak lr {tuner.peak:g} = recipe.lr {recipe.lr:g} x global batch {engine_cfg['train_batch_size']} / "
              f"recipe.lr_batch {recipe.lr_batch} (linear scaling); gradient clipping {recipe.clip_grad:g} "
              f"(recipe.clip_grad, 0: none)", flush=True)  # fmt: skip
        if tuner.report is not None:
            print(f"loaded {encoder}: new (randomly initialised) keys {tuner.report['missing']}", flush=True)
    result = tuner.fit()
    ignore_stop_signals()
    if distributed.rank() == 0:
        print(json.dumps({"encoder": encoder, "random_init": job.random_init, **result}), flush=True)
    distributed.close()
    return result


def resolved_settings(job: Job, recipe: Recipe, architecture, ds_config: str, model: str | None) -> dict:
    """What a run would use: the job, the recipe for the encoder's size, the peak lr at the global batch
    (the recipe's batch_size, which the DeepSpeed JSON must give on the ranks it runs on), and the
    layer-decay ladder (lr multiplier of the patch embedding, of each block, and of the head)."""
    cfg = engine_config(ds_config, 1, None)
    per_rank = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
    depth = architecture.depth
    return {
        "job": dataclasses.asdict(job) | {"model": model, "depth": depth},
        "recipe": dataclasses.asdict(recipe),
        "global_batch": recipe.batch_size,
        "peak_lr": recipe.lr * recipe.batch_size / recipe.lr_batch,
        "peak_lr_rule": f"recipe.lr {recipe.lr:g} x global batch / recipe.lr_batch {recipe.lr_batch}",
        "layer_lr_scales": ladder(architecture, recipe),
        "ds_config": ds_config,
        "ranks_for_global_batch": recipe.batch_size / per_rank,
        "gradient_clipping": recipe.clip_grad,
    }


_REQUIRED = ("--encoder", "--dataset", "--data")


def describe() -> str:
    from dtm_ds import cli

    usage = __doc__.split("Recipe per dataset")[0]
    return cli.describe(usage, [
        ("Options", cli.function_rows(main, skip=("local_rank",))),
        ("Job (--<field>=value)", [r for r in cli.dataclass_rows(Job) if r[0] not in _REQUIRED]),
        ("Recipe (--recipe.<field>=value; defaults before the dataset's recipe, see eval/recipes.py)",
         cli.dataclass_rows(Recipe, "recipe.")),
    ])  # fmt: skip


if __name__ == "__main__":
    from dtm_ds.cli import run

    run(main, describe, exit_at_once=True)
