"""ADE20K semantic segmentation: UperNet over a dtm_ds encoder, trained and evaluated with mmseg.

    python eval/seg/train.py --encoder outputs/pretrain_vitb --data data/ADEChallengeData2016
    torchrun --nproc_per_node 8 eval/seg/train.py --launcher pytorch --encoder ... --data ...
    python eval/seg/train.py --test_only --checkpoint outputs/eval/ade20k/iter_160000.pth --encoder ...
        --data ... [--multi_scale]        (one line)

The config is eval/seg/configs/upernet_dtm_ade20k.py; the flags below scale it (crop, iterations,
total batch split over the GPUs, lr, layer decay). A run resumes from the last checkpoint in
--output_dir. Validation mIoU is logged to the text log, TensorBoard (<output_dir>/<time>/vis_data)
and <output_dir>/eval.jsonl.
"""

import json
import os
from pathlib import Path

import torch

import eval.seg  # noqa: F401  (mmcv-lite shim before any mmseg import)
from dtm_ds import devices, distributed
from dtm_ds.config import build_config
from dtm_ds.pretrained import encoder_config
from eval.seg.data import check_ade20k

CONFIG = Path(__file__).parent / "configs" / "upernet_dtm_ade20k.py"


def trust_checkpoints(*places: str | Path) -> None:
    """mmengine checkpoints pickle its message hub (HistoryBuffer with bound methods), which torch's
    ``weights_only=True`` default refuses and which only a full unpickle can read. Load in full only
    files this run wrote (under ``output_dir``) or the user named (``--checkpoint``); anything else
    keeps ``weights_only=True``."""
    from mmengine.runner.checkpoint import CheckpointLoader

    trusted = [Path(p).resolve() for p in places if p]

    def load_local(filename, map_location):
        path = Path(filename).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {filename} does not exist")
        full = any(path == t or t in path.parents for t in trusted)
        return torch.load(path, map_location=map_location, weights_only=not full)

    CheckpointLoader.register_scheme(prefixes="", loader=load_local, force=True)


ADE20K_RECIPES = {
    # BEiT v2 semantic_segmentation/configs/beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k.py
    "base": {"lr": 5e-5, "layer_decay": 0.75, "drop_path": 0.15},
    # ... upernet_beit_large_24_512_slide_160k_ade20k.py
    "large": {"lr": 4e-5, "layer_decay": 0.9, "drop_path": 0.2},
}
"""UperNet on ADE20K per encoder size (batch 16, 160k iterations, 1,500 warm-up, poly, no clipping, slide
stride 341 at 512 px: the config's own values). Up to 12 blocks take ``base``, deeper ones ``large``."""


def ade20k_recipe(depth: int) -> dict:
    return ADE20K_RECIPES["base" if depth <= 12 else "large"]


def build_cfg(
    data: str,
    output_dir: str,
    encoder: str | None = None,
    model: str | None = None,
    crop: int = 512,
    max_iters: int = 160_000,
    batch_size: int = 16,
    lr: float | None = None,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    warmup_iters: int = 1500,
    val_interval: int = 16_000,
    checkpoint_interval: int = 16_000,
    drop_path: float | None = None,
    workers: int = 4,
    log_interval: int = 50,
    amp: str | None = None,
    launcher: str = "none",
    seed: int = 0,
    mm_config: str | None = None,
):
    """The mmengine Config for one run; every number the command line sets is written here.

    Args:
        data: ADEChallengeData2016 root (images/ and annotations/, training and validation).
        output_dir: the run folder (checkpoints, logs, eval.jsonl); a re-run resumes it.
        encoder: a pretraining run folder or an export (its architecture and weights).
        model: a preset (vits, vitb, ...) for a randomly initialised encoder, without --encoder.
        crop: training crop and sliding-window side, pixels.
        max_iters: training iterations.
        batch_size: total batch over all processes.
        lr: peak AdamW lr (None: the encoder size's recipe, ADE20K_RECIPES).
        weight_decay: AdamW weight decay.
        layer_decay: layer-wise lr decay, mmseg's layer_wise_vit constructor (None: the size's recipe).
        warmup_iters: linear warm-up iterations before the poly decay.
        val_interval: iterations between validations (single-scale mIoU).
        checkpoint_interval: iterations between checkpoints.
        drop_path: stochastic depth rate of the encoder (None: the size's recipe).
        workers: DataLoader workers per process (capped by the cores of the node shared by its ranks).
        log_interval: iterations between log lines.
        amp: mixed precision, bf16 or fp16 (None: fp32).
        launcher: none (one process) or pytorch (torchrun).
        seed: seed of the run.
        mm_config: the mmengine config file to start from (None: eval/seg/configs/upernet_dtm_ade20k.py).
    """
    from mmengine.config import Config

    preset, model = model, encoder_config(encoder) if encoder else build_config(model or "").model
    world = int(os.environ.get("WORLD_SIZE", 1))
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (total) must be a multiple of the {world} processes")
    if crop % model.patch_size:
        raise ValueError(f"crop {crop} must be a multiple of the patch size {model.patch_size}")
    if warmup_iters >= max_iters:
        raise ValueError(f"warmup_iters {warmup_iters} must be below max_iters {max_iters}")
    recipe = ade20k_recipe(model.depth)
    lr, layer_decay = recipe["lr"] if lr is None else lr, recipe["layer_decay"] if layer_decay is None else layer_decay
    drop_path = recipe["drop_path"] if drop_path is None else drop_path
    cfg = Config.fromfile(str(mm_config or CONFIG))
    size = (crop, crop)
    cfg.work_dir = str(output_dir)
    cfg.launcher = launcher
    cfg.randomness = dict(seed=seed)

    m = cfg.model
    m.data_preprocessor.size = size
    m.backbone.update(encoder=encoder, arch=None if encoder else preset, img_size=crop, drop_path_rate=drop_path)
    m.neck.embed_dim = model.embed_dim
    m.decode_head.in_channels = [model.embed_dim] * 4
    m.decode_head.channels = model.embed_dim
    m.auxiliary_head.in_channels = model.embed_dim
    m.test_cfg = dict(mode="slide", crop_size=size, stride=(crop * 2 // 3, crop * 2 // 3))

    loaders = (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader)
    for pipeline in [loader.dataset.pipeline for loader in loaders]:
        for step in pipeline:
            if step["type"] in ("RandomResize", "Resize"):
                step["scale"] = (4 * crop, crop)
            if step["type"] == "RandomCrop":
                step["crop_size"] = size
    workers = devices.cap_workers(workers, "ADE20K loader")
    for loader in loaders:
        loader.dataset.data_root = str(data)
        loader.num_workers = workers
        loader.persistent_workers = workers > 0
        loader.pin_memory = devices.accelerator() == "cuda"  # pinned batches: asynchronous copies to the GPU
    cfg.train_dataloader.batch_size = batch_size // world

    cfg.optim_wrapper.optimizer.update(lr=lr, weight_decay=weight_decay)
    cfg.optim_wrapper.paramwise_cfg = dict(num_layers=model.depth, decay_rate=layer_decay, decay_type="layer_wise_vit")
    if amp:
        if amp not in ("bf16", "fp16"):
            raise ValueError(f"amp must be bf16, fp16 or unset; got {amp!r}")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.dtype = {"bf16": "bfloat16", "fp16": "float16"}[amp]
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
        dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=warmup_iters, end=max_iters),
    ]
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
    cfg.default_hooks.checkpoint.interval = checkpoint_interval
    cfg.default_hooks.logger.interval = log_interval
    if devices.accelerator() == "cpu":
        cfg.env_cfg.dist_cfg = dict(backend="gloo")
        cfg.env_cfg.cudnn_benchmark = False
        if launcher != "none":  # DDP on CPU takes no device ids (mmengine's default passes LOCAL_RANK)
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    elif launcher != "none":
        cfg.sync_bn = "torch"  # BN in the neck and heads becomes SyncBN across GPUs
    return cfg


OUTPUT_DIR = "outputs/eval/ade20k"

RESOLVED = (
    "encoder",
    "model",
    "depth",
    "lr",
    "betas",
    "weight_decay",
    "layer_decay",
    "drop_path",
    "out_indices",
    "batch_size",
    "max_iters",
    "warmup_iters",
    "poly_power",
    "crop",
    "slide_stride",
    "clip_grad",
    "amp",
)
"""The top-level figures of ``--print_config`` (``resolved_settings``), read back from the config it builds; a
``--config`` file skips them (its ``seg`` section holds the settings)."""


def main(
    data: str | None = None,
    output_dir: str | None = None,
    test_only: bool = False,
    checkpoint: str | None = None,
    multi_scale: bool = False,
    scan_labels: bool = True,
    print_config: bool = False,
    config: str | None = None,
    **kwargs,
):
    """Train (resuming from ``output_dir``) then evaluate; with ``test_only`` evaluate ``checkpoint``.

    Args:
        data: ADEChallengeData2016 root (images/ and annotations/, training and validation).
        output_dir: the run folder (checkpoints, logs, eval.jsonl); a re-run resumes it.
        test_only: only evaluate --checkpoint on the validation split.
        checkpoint: an iter_*.pth or best_*.pth to evaluate (with --test_only).
        multi_scale: with --test_only: 6 scales x flip instead of single-scale.
        scan_labels: check every annotation's values before training (rank 0).
        print_config: print the settings (section ``seg``) and the figures they resolve to as JSON and exit;
            reads no data or weights. The output is a valid ``--config`` file.
        config: a YAML or JSON file with the section ``seg`` (as --print_config prints it: data, output_dir
            and the config scaling options); options on the command line win over it.
    """
    if config:  # the file first, the command line over it
        from dtm_ds.options import read_config_file

        flat, _ = read_config_file(config, ("seg",), ignore=RESOLVED)
        from_file = {k.removeprefix("seg."): v for k, v in flat.items()}
        data = data if data is not None else from_file.get("data")
        output_dir = output_dir if output_dir is not None else from_file.get("output_dir")
        kwargs = {k: v for k, v in from_file.items() if k not in ("data", "output_dir")} | kwargs
    output_dir = output_dir if output_dir is not None else OUTPUT_DIR
    kwargs = _check_flags(kwargs)
    if print_config:
        import inspect

        params = inspect.signature(build_cfg).parameters
        flags = {k: p.default for k, p in params.items() if k not in ("data", "output_dir")} | kwargs
        settings = {"seg": {"data": data, "output_dir": output_dir} | flags}
        print(json.dumps(settings | resolved_settings(build_cfg(data or "<--data>", output_dir, **kwargs)), indent=2))
        return None
    if data is None:
        raise ValueError("--data is required (the ADEChallengeData2016 root)")
    from mmengine.runner import Runner

    if test_only and (not checkpoint or not Path(checkpoint).is_file()):
        raise FileNotFoundError(f"--test_only needs --checkpoint=<an iter_*.pth or best_*.pth file>; got {checkpoint}")
    rank0 = os.environ.get("RANK", "0") == "0"
    counts = check_ade20k(data, splits=("val",) if test_only else ("train", "val"), scan_labels=scan_labels and rank0)
    print(f"ADE20K at {data}: {counts}", flush=True)
    cfg = build_cfg(data, output_dir, **kwargs)
    trust_checkpoints(output_dir, checkpoint)
    if cfg.launcher != "none":
        distributed.init_plain()  # on CPU: mmengine's own launcher assumes CUDA devices
    if test_only:
        cfg.load_from, cfg.resume = checkpoint, False
        if multi_scale:
            cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
            cfg.tta_model.module = cfg.model
            cfg.model = cfg.tta_model
    runner = Runner.from_cfg(cfg)
    result = runner.test() if test_only else None  # (train() returns the model, which fire would call)
    if not test_only:
        runner.train()
    runner.visualizer.close()  # flushes TensorBoard: the process ends without teardown (cli.run)
    distributed.close()  # before teardown: gloo's threads can abort a finished rank at exit
    return result


def resolved_settings(cfg) -> dict:
    """The settings of an mmengine config that make the recipe, read back from the config itself."""
    from eval.seg.backbone import default_out_indices

    backbone, optimizer = cfg.model.backbone, cfg.optim_wrapper.optimizer
    encoder = encoder_config(backbone.encoder) if backbone.encoder else build_config(backbone.arch).model
    warmup, poly = cfg.param_scheduler
    return {
        "encoder": backbone.encoder,
        "model": backbone.arch,
        "depth": encoder.depth,
        "lr": optimizer.lr,
        "betas": list(optimizer.betas),
        "weight_decay": optimizer.weight_decay,
        "layer_decay": cfg.optim_wrapper.paramwise_cfg["decay_rate"],
        "drop_path": backbone.drop_path_rate,
        "out_indices": backbone.get("out_indices") or default_out_indices(encoder.depth),
        "batch_size": cfg.train_dataloader.batch_size * int(os.environ.get("WORLD_SIZE", 1)),
        "max_iters": cfg.train_cfg.max_iters,
        "warmup_iters": warmup["end"],
        "poly_power": poly["power"],
        "crop": list(cfg.model.data_preprocessor.size),
        "slide_stride": list(cfg.model.test_cfg.stride),
        "clip_grad": cfg.optim_wrapper.get("clip_grad"),
        "amp": cfg.optim_wrapper.get("dtype"),
    }


def _check_flags(flags: dict) -> dict:
    """``build_cfg``'s flags, each checked against its annotation; unknown ones with a suggestion."""
    import inspect

    from dtm_ds.options import parse_options

    params = inspect.signature(build_cfg).parameters
    return parse_options(
        flags, {k: p.annotation for k, p in params.items() if k not in ("data", "output_dir")}, "flags"
    )


def describe() -> str:
    from dtm_ds import cli

    scaling = cli.function_rows(build_cfg, skip=("data", "output_dir"))
    return cli.describe(__doc__, [("Options", cli.function_rows(main)), ("Config scaling", scaling)])


if __name__ == "__main__":
    from dtm_ds.cli import run

    run(main, describe, exit_at_once=True)
