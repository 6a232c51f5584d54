"""The training loop (Accelerate): one process or DDP, bf16 on GPU, early stopping, exact resume, tracking.

Read top to bottom: ``main`` parses the config, ``train`` builds data, model and optimiser, runs epochs of
``train_one_epoch`` + ``validate``, checkpoints each epoch, and finishes with the best adapter, ``all_results.json``,
test metrics and curves.

Checkpoints hold only what changes: the trainable tensors (LoRA, decoder, class prompts - a few MB, not the frozen
375 MB base that ``Accelerator.save_state`` would copy every epoch), optimiser, scheduler, every process's RNG state
and the trainer state (epoch, step, early-stopping counters, history). Each is written to ``NAME.tmp`` and renamed,
so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from octsam.adapter import ADAPTER_CONFIG_NAME, OctSamConfig
from octsam.bases import base_of, get_base
from octsam.config import (
    DataArguments,
    ModelArguments,
    TrainArguments,
    adapter_config,
    augment_config,
    prompt_config,
    tile_config,
)
from octsam.data.dataset import IGNORE_INDEX
from octsam.data.samples import EpochSampler, SegmentationSamples, collate
from octsam.errors import OctSamError
from octsam.folders import FolderLock, move_aside_and_empty, remove_stale_staging, sigterm_as_interrupt
from octsam.models.dynunet import DeepSupervision
from octsam.models.sam import class_logits_from_prompts, predict_index_mask, upsample_logits
from octsam.training.checkpoint import (
    BEST_ADAPTER_DIR,
    CHECKPOINT_DIR,
    RESULTS_FILE,
    SHARED_STAGING_SUFFIX,
    TRAINABLE_FILE,
    TRAINER_STATE,
    checkpoint_name,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    write_atomic_folder,
)
from octsam.training.losses import SegmentationLoss, prompted_loss

logger = logging.getLogger("octsam")


# ------------------------------------------------------------------------------------------------ setup
def build_accelerator(args: TrainArguments, gradient_accumulation_steps: int):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if torch.cuda.is_available() else "no")
    # Only LoRA, decoder and class-prompt gradients exist: no unused parameters, the same graph every step; all
    # 18.6 MB of them fit one 25 MB bucket, and the gradients live in it (no copy). benchmarks/RESULTS.md.
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=False, static_graph=True, bucket_cap_mb=25, gradient_as_bucket_view=True
    )
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
        kwargs_handlers=[ddp],
        step_scheduler_with_optimizer=False,
    )


def build_model(model_args: ModelArguments, labels: list[str], seed: int):
    """A new model of the family ``--model`` names (SAM + LoRA on the base ``--base-model`` selects, or the U-Net
    baseline) for ``labels``: the ``for_training`` of its registry record's model class."""
    return get_base(model_args.model).model_class.for_training(adapter_config(model_args, labels), model_args, seed)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def is_main_launch_process() -> bool:
    """Rank 0 of a ``torch.distributed.run`` / ``accelerate launch`` job (or a single process), before Accelerate."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output_dir(args: TrainArguments, main_process: bool = True) -> Path:
    """Check the run folder (every process) and, on the main process, empty it for ``--overwrite``.

    Call with the folder's lock held (``FolderLock``): nothing else writes it meanwhile. Overwriting moves the old
    run aside with one rename (so a new run never mixes with, prunes against or resumes from the old one) and then
    deletes it; a crash in between leaves a hidden ``.NAME.del-PID-*`` that the next run removes (never puts back: after
    ``--overwrite`` and a kill, ``--resume-from-checkpoint latest`` cannot find the old run's checkpoints).
    """
    out = Path(args.output_dir)
    if main_process:
        remove_stale_staging(out.parent, out.name)  # first: what the checks below see is what the run will find
    if out.exists() and not out.is_dir():
        raise OctSamError(f"--output {out} is a file; give a folder.")
    resume = args.resume_from_checkpoint
    if args.overwrite_output_dir and resume and (resume == "latest" or _inside(Path(resume), out)):
        raise OctSamError(
            f"--overwrite starts {out} afresh, which deletes the checkpoint "
            f"--resume-from-checkpoint {resume} would resume from; pass only one of them."
        )
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not args.overwrite_output_dir:
        if not resume:
            raise OctSamError(
                f"Output folder {out} is not empty. Resume it with --resume-from-checkpoint latest, choose another "
                "--output, or pass --overwrite to write over it."
            )
        if resume != "latest" and not _inside(Path(resume), out):
            raise OctSamError(
                f"--resume-from-checkpoint {resume} is from another run folder, and --output {out} is not empty "
                "(another run's files would mix with this one); resume into a new, empty folder or into the "
                "checkpoint's own run folder."
            )
    if main_process:
        if non_empty and args.overwrite_output_dir:
            move_aside_and_empty(out)
            logger.info(f"--overwrite: removed the previous run in {out}")
        for stale in (out / CHECKPOINT_DIR).glob(f"epoch-*{SHARED_STAGING_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)  # a checkpoint write killed half-way (the lock is ours)
    return out


#: What shapes a trained network: a checkpoint resumed with other values would not load, or would silently train at
#: another size (the U-Net's unet_image_size is its image_size).
NETWORK_SETTINGS = ("architecture", "mode", "automatic_head", "image_size", "tokens_per_class", "lora_r",
                    "lora_target_modules", "input_mode", "encoder")  # fmt: skip
NETWORK_EXTRAS = ("unet_channels", "unet_variant")


def check_same_network(saved: OctSamConfig, asked: OctSamConfig, resume_path: Path) -> None:
    """Refuse to resume ``resume_path`` (trained as ``saved``) with options that build another network."""
    changed = [
        f"{name} {getattr(saved, name)!r} -> {getattr(asked, name)!r}"
        for name in NETWORK_SETTINGS
        if getattr(saved, name) != getattr(asked, name)
    ] + [
        f"{name} {saved.extra.get(name)!r} -> {asked.extra.get(name)!r}"
        for name in NETWORK_EXTRAS
        if saved.extra.get(name) != asked.extra.get(name)
    ]
    if changed:
        raise OctSamError(
            f"Checkpoint {resume_path} was trained with another network than these options build ({'; '.join(changed)}"
            f"); resume with the options it was trained with (see its {ADAPTER_CONFIG_NAME}; unet_image_size is "
            "image_size) or start a new run."
        )


def best_checkpoint_for(resume_path: Path) -> Path | None:
    """The checkpoint of the best epoch recorded in ``resume_path`` (itself or a sibling); None before any best."""
    try:
        state = json.loads((resume_path / TRAINER_STATE).read_text(encoding="utf-8"))
        best = int(state.get("best_epoch", 0))
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise OctSamError(
            f"Checkpoint {resume_path} cannot be resumed: {TRAINER_STATE} is damaged or not what octsam writes "
            f"({type(err).__name__}); resume from another checkpoint or start a new run."
        ) from None
    if best <= 0:
        return None
    candidate = resume_path.parent / checkpoint_name(best)
    if not (candidate / TRAINABLE_FILE).is_file():
        raise OctSamError(
            f"Cannot resume from {resume_path}: its best epoch ({best}) is the adapter the run must end with, but "
            f"{candidate} is missing. Copy that checkpoint folder next to {resume_path.name}, or resume in the "
            "checkpoint's own run folder."
        )
    return candidate


def restore_best_adapter(accelerator, model, best_ckpt: Path, out: Path) -> None:
    """Write ``out/best_adapter`` from the best epoch's checkpoint (a resume into a new folder ends with it)."""
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    current = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
    load_trainable_state(unwrapped, load_file(str(best_ckpt / TRAINABLE_FILE)), str(best_ckpt))
    if accelerator.is_main_process:
        write_atomic_folder(unwrapped.save_pretrained, out / BEST_ADAPTER_DIR)
    load_trainable_state(unwrapped, current, "the resumed state")
    accelerator.wait_for_everyone()


def effective_accumulation(args: TrainArguments, num_processes: int) -> int:
    per_step = args.per_device_train_batch_size * num_processes
    return max(1, round(args.effective_batch_size / per_step))


# ------------------------------------------------------------------------------------------------ steps
def compute_loss(model, batch, loss_fn: SegmentationLoss, mode: str, prompt_kind: str | None):
    """Forward + loss for one batch; returns (loss, class logits at mask resolution)."""
    pixel_values = model_preprocess(model, batch["pixels"])
    mask = batch["mask"].long()
    size = tuple(mask.shape[-2:])
    if mode == "prompted":
        boxes = batch["boxes"] if "box" in prompt_kind else None
        points = batch["points"] if "point" in prompt_kind else None
        labels = batch["point_labels"] if "point" in prompt_kind else None
        logits, _ = model(pixel_values, input_boxes=boxes, input_points=points, input_labels=labels)
        logits = upsample_logits(logits[:, :, 0], size)
        loss = prompted_loss(loss_fn, logits, batch["instance_map"], batch["prompt_valid"], mask)
        class_logits = class_logits_from_prompts(
            logits, batch["prompt_classes"], batch["prompt_valid"], loss_fn_num_classes(model)
        )
        return loss, class_logits
    logits, extras = model(pixel_values)
    logits = upsample_logits(logits, size)
    loss = loss_fn(logits, mask)
    if isinstance(extras, DeepSupervision):  # DynUNet: weighted loss on the decoder's lower levels too
        loss = extras.main_weight * loss
        for weight, level in zip(extras.weights, extras.logits):
            loss = loss + weight * loss_fn(upsample_logits(level, size), mask)
    return loss, logits


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def model_preprocess(model, pixels):
    return _unwrap(model).preprocess(pixels)


def loss_fn_num_classes(model) -> int:
    return _unwrap(model).config.num_labels - 1


def pick_prompt_kind(data_args: DataArguments, seed: int, epoch: int, step: int) -> str:
    """The prompt kind of one step, the same on every process and in a resumed run."""
    return random.Random(f"{seed}-{epoch}-{step}").choice(data_args.prompt_types)


def validation_model(accelerator, model, compiled: bool):
    """The module validation runs: the training model, or for a compiled run the same module uncompiled.

    In eval mode a compiled model compiles a second graph: on the H200 the first epoch of the real loop spent 65 s
    compiling the training step and then ran out of its time budget compiling validation (benchmarks/RESULTS.md,
    version 4). Uncompiled, a validation split of a few hundred B-scans costs seconds, and the weights are the same
    tensors. DDP is unwrapped too: validation needs no gradient synchronisation (metrics are gathered explicitly).
    """
    if not compiled:
        return model
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def validate(accelerator, model, loader, loss_fn, mode: str, num_labels: int) -> dict:
    """Mean foreground Dice per class over validation scans (each scan counted once across processes)."""
    from octsam.evaluation.metrics import dice_from_stats, mean_dice_over_present, segmentation_stats

    model.eval()
    stats, scans, losses = [], [], []
    # autocast here as well: an unwrapped module (validation_model) lost Accelerate's mixed-precision forward
    with torch.no_grad(), accelerator.autocast():
        for batch in tqdm(loader, desc="validation", leave=False, disable=not accelerator.is_local_main_process):
            loss, logits = compute_loss(model, batch, loss_fn, mode, "box")
            pred = predict_index_mask(logits)
            batch_stats = segmentation_stats(pred, batch["mask"].long(), num_labels)
            stats.append(accelerator.gather_for_metrics(batch_stats))
            scans.append(accelerator.gather_for_metrics(batch["scan"].to(batch_stats.device)))
            losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(len(pred))))
    model.train()
    # Counts summed per B-scan: native-mode validation items are tiles of a B-scan, and a tile without a biomarker
    # but with a few false pixels would otherwise count as a Dice of 0 of its own (resize mode: one item per scan).
    tile_stats, scan_ids = torch.cat(stats), torch.cat(scans).long()
    _, scan_ids = torch.unique(scan_ids, return_inverse=True)
    all_stats = tile_stats.new_zeros((int(scan_ids.max()) + 1, *tile_stats.shape[1:])).index_add_(
        0, scan_ids, tile_stats
    )
    dice = dice_from_stats(all_stats).cpu()
    return {
        "val_loss": float(torch.cat(losses).mean()),
        "val_dice_per_class": [float(d) for d in dice],
        # over the classes in the validation truth: the divisor does not change between epochs
        "val_mean_dice": mean_dice_over_present(all_stats.cpu()),
        "val_scans": int(all_stats.shape[0]),
    }


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(asked: int) -> int:
    """Data-loader workers per process: at most the CPUs this process may use (more only contend)."""
    return max(0, min(asked, available_cpus()))


def warn_about_data(train_split, labels: list[str], data_args: DataArguments) -> None:
    """Say once what the run cannot learn or cannot use: absent classes (by name), workers beyond the CPUs."""
    from octsam.data.dataset import absent_classes

    missing = absent_classes(train_split, labels)
    if len(missing) == len(labels) - 1:
        logger.warning(
            "warning: the training split has no foreground pixel at all (only background); the model can learn "
            "nothing and every Dice will be 0. Check the masks (dataset_builder prints pixels per class)."
        )
    elif missing:
        logger.warning(
            f"warning: class(es) {', '.join(missing)} have no pixel in the training split: the model cannot learn "
            "them, and their Dice will be 0 or undefined."
        )
    if data_args.num_workers > available_cpus():
        logger.warning(
            f"num_workers {data_args.num_workers} is more than the {available_cpus()} CPU(s) available; using "
            f"{available_cpus()}."
        )


# ------------------------------------------------------------------------------------------------ main loop
def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> dict:
    """Train with the run folder locked (one run per folder; a crashed run's lock is taken over); SIGTERM stops it
    like Ctrl-C (the last complete checkpoint stays)."""
    main_process = is_main_launch_process()
    lock = FolderLock(train_args.output_dir, "training") if main_process else None
    if lock is not None:
        lock.acquire()
    try:
        with sigterm_as_interrupt():
            return _train(model_args, data_args, train_args, main_process)
    finally:
        if lock is not None:
            lock.release()


def _train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments, main_process: bool):
    """The run, top to bottom, in the shape of Hugging Face's ``*_no_trainer`` examples (setup, prepare, the epoch
    loop with validation, checkpoints and early stopping, finish). Long on purpose: it reads in order, and each step
    it calls (``build_model``, ``train_one_epoch``, ``validate``, ``save_checkpoint``, ``finish``) is its own function."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from octsam.data.dataset import load_oct_dataset

    out = prepare_output_dir(train_args, main_process)
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = effective_accumulation(train_args, num_processes)
    accelerator = build_accelerator(train_args, accumulation)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    set_seed(train_args.seed)
    effective = train_args.per_device_train_batch_size * accelerator.num_processes * accumulation
    logger.info(
        f"effective batch {effective} = {train_args.per_device_train_batch_size} per device x "
        f"{accelerator.num_processes} process(es) x {accumulation} accumulation step(s)"
        + ("" if effective == train_args.effective_batch_size else f" (asked for {train_args.effective_batch_size})")
    )

    dataset, labels = load_oct_dataset(data_args.dataset, revision=data_args.dataset_revision)
    for split in ("train", "validation", "test") if train_args.evaluate_test else ("train", "validation"):
        if split not in dataset or len(dataset[split]) == 0:
            raise OctSamError(
                f"Dataset {data_args.dataset} has no (or an empty) {split!r} split; build it with dataset_builder, "
                "which makes train/validation/test."
            )
    train_split = dataset["train"]
    if data_args.max_train_samples:
        train_split = train_split.select(range(min(data_args.max_train_samples, len(train_split))))
    if accelerator.is_main_process:
        warn_about_data(train_split, labels, data_args)

    if model_args.input_mode != "native" and effective > len(train_split):  # checked before the model loads
        raise OctSamError(
            f"The effective batch ({effective}) is larger than the training split ({len(train_split)} scans): every "
            f"epoch would be one smaller, uneven step. Set --effective-batch-size to at most {len(train_split)}."
        )

    resume_path = find_checkpoint(train_args) if train_args.resume_from_checkpoint else None
    best_ckpt = best_checkpoint_for(resume_path) if resume_path is not None else None  # refused before training
    if resume_path is not None:
        saved = OctSamConfig.from_json_file(resume_path / ADAPTER_CONFIG_NAME)
        if list(saved.labels) != list(labels):
            raise OctSamError(
                f"Checkpoint {resume_path} was trained for labels {saved.labels} ({len(saved.labels)} classes) but "
                f"dataset {data_args.dataset} has {labels} ({len(labels)}); resume with the dataset it was trained "
                "on or start a new run."
            )
    model = build_model(model_args, labels, train_args.seed)
    config = model.config
    if resume_path is not None:
        check_same_network(saved, config, resume_path)
    logger.info(model.parameter_summary())
    if train_args.gradient_checkpointing and model.image_encoder is not None:
        model.image_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.image_encoder.train()

    prompts = None
    if config.mode == "prompted" and base_of(config).has_embeddings:
        prompts = prompt_config(data_args)
    augment = augment_config(data_args)
    if train_args.cache_embeddings and not (train_args.compile and torch.cuda.is_available()):
        from octsam.training.embedding_cache import enable_embedding_cache

        enable_embedding_cache(
            model, augmented=augment is not None and not augment.finite, directory=train_args.embedding_cache_dir
        )
    tiles = tile_config(config, data_args)
    train_data = SegmentationSamples(
        train_split,
        config.image_size,
        config.num_labels,
        augment,
        prompts,
        seed=train_args.seed,
        resize=config.resize,
        tiles=tiles,
    )
    val_data = SegmentationSamples(
        dataset["validation"], config.image_size, config.num_labels, None, prompts, resize=config.resize, tiles=tiles,
        validation=True,
    )  # fmt: skip
    if tiles is not None and effective > len(train_data):  # native mode: an epoch is its crops
        raise OctSamError(
            f"The effective batch ({effective}) is larger than the training crops of an epoch ({len(train_data)}): "
            f"every epoch would be one smaller, uneven step. Set --effective-batch-size to at most {len(train_data)} "
            "or raise --crops-per-scan."
        )
    if tiles is not None:
        logger.info(
            f"native tiles of {tiles.size} px: {len(train_data)} training crops per epoch ({tiles.crop_sampling}), "
            f"{len(val_data)} validation tiles"
        )
    sampler = EpochSampler(len(train_data), seed=train_args.seed)
    loader_kwargs = dict(
        collate_fn=collate,
        num_workers=loader_workers(data_args.num_workers),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=loader_workers(data_args.num_workers) > 0,
    )
    train_loader = DataLoader(
        train_data,
        batch_size=train_args.per_device_train_batch_size,
        sampler=sampler,
        drop_last=False,
        **loader_kwargs,
    )
    val_loader = DataLoader(val_data, batch_size=train_args.per_device_eval_batch_size, **loader_kwargs)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=train_args.learning_rate, weight_decay=train_args.weight_decay, fused=torch.cuda.is_available()
    )
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / accumulation)
    total_steps = steps_per_epoch * train_args.num_train_epochs
    scheduler = get_scheduler(
        train_args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(train_args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    from octsam.speed import plan_speed

    speed = plan_speed(
        accelerator.device.type,
        "train",
        fast_attention=model_args.fast_attention,
        attention_mode=model_args.attention_mode,
        compile=None if train_args.compile else False,
        architecture=base_of(config).name,
    )
    logger.info(
        f"attention: {'transformers' if speed.attention is None else 'octsam fast (' + speed.attention + ')'}; "
        f"torch.compile {'on' if speed.compile else 'off'} ({speed.why})"
    )
    if speed.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    eval_model = validation_model(accelerator, model, speed.compile)
    loss_fn = SegmentationLoss(config.class_activation, train_args.dice_weight, train_args.ce_weight)

    state = {"epoch": 0, "global_step": 0, "best_metric": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if resume_path is not None:
        state = load_checkpoint(resume_path, accelerator, model, optimizer, scheduler)
        resumed_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        if not math.isclose(resumed_lr, train_args.learning_rate, rel_tol=1e-9):
            logger.warning(
                f"warning: --learning-rate {train_args.learning_rate:g} is ignored: a resumed run continues its "
                f"checkpoint's schedule (learning rate {resumed_lr:g}) so that it equals an uninterrupted run. "
                "Start a new run to change the learning rate."
            )
        if best_ckpt is not None:
            restore_best_adapter(accelerator, model, best_ckpt, out)
        logger.info(f"resumed from {resume_path} (epoch {state['epoch']}, step {state['global_step']})")

    if accelerator.is_main_process and train_args.report_to != "none":
        run_config = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for a in (model_args, data_args, train_args)
            for k, v in asdict(a).items()
        }
        accelerator.init_trackers("octsam", config=run_config)
    elif train_args.report_to != "none":
        accelerator.init_trackers("octsam")

    model.train()
    stopped_early = False
    first_epoch = state["epoch"]
    speed_log = {"compiled": speed.compile, "compile_reported": False}
    parts = TrainingParts(accelerator, model, train_loader, optimizer, scheduler, loss_fn, config, data_args,
                          train_args, out, steps_per_epoch)  # fmt: skip
    for epoch in range(first_epoch, train_args.num_train_epochs):
        if train_args.stop_after_epochs is not None and epoch >= train_args.stop_after_epochs:
            logger.info(f"stopping after epoch {epoch} as asked (--stop-after-epochs)")
            accelerator.end_training()
            return {"stopped_after_epoch": epoch}
        train_loader.set_epoch(epoch)  # Accelerate's loader passes it to EpochSampler (and keeps its own count)
        epoch_loss = train_one_epoch(parts, state, epoch, speed_log)
        if epoch == first_epoch and state.get("foreground_pixels") == 0 and accelerator.is_main_process:
            logger.warning(
                f"warning: the training split of {data_args.dataset} has no foreground pixel (every mask is all "
                "background, or 255 = ignored): the model cannot learn any biomarker and its Dice will be 0. Check "
                "the masks and --labels of the dataset build."
            )
        metrics = validate(accelerator, eval_model, val_loader, loss_fn, config.mode, config.num_labels)
        metrics.update(epoch=epoch + 1, train_loss=epoch_loss, lr=scheduler.get_last_lr()[0])
        metrics.update({k: speed_log[k] for k in ("train_images_per_s", "train_images_per_s_after_first_step")})
        if "compile_s" in speed_log:
            state.setdefault("compile_s", speed_log["compile_s"])
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        per_class = ", ".join(f"{n} {d:.3f}" for n, d in zip(config.labels[1:], metrics["val_dice_per_class"]))
        logger.info(
            f"epoch {epoch + 1}: train loss {epoch_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
            f"val mean Dice {metrics['val_mean_dice']:.4f} ({per_class}); "
            f"{metrics['train_images_per_s']:.1f} training images/s "
            f"({metrics['train_images_per_s_after_first_step']:.1f} after the epoch's first step)"
        )
        log = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        log.update({f"val_dice/{n}": d for n, d in zip(config.labels[1:], metrics["val_dice_per_class"])})
        accelerator.log(log, step=state["global_step"])
        if metrics["val_mean_dice"] > state["best_metric"]:
            state.update(best_metric=metrics["val_mean_dice"], best_epoch=epoch + 1, bad_epochs=0)
            if accelerator.is_main_process:
                write_atomic_folder(accelerator.unwrap_model(model).save_pretrained, out / BEST_ADAPTER_DIR)
        else:
            state["bad_epochs"] += 1
        save_checkpoint(accelerator, model, optimizer, scheduler, state, out, train_args.keep_checkpoints)
        if train_args.early_stopping_patience and state["bad_epochs"] >= train_args.early_stopping_patience:
            logger.info(
                f"early stopping: no better validation Dice for {state['bad_epochs']} epochs "
                f"(best {state['best_metric']:.4f} at epoch {state['best_epoch']})"
            )
            stopped_early = True
            break

    accelerator.wait_for_everyone()
    results = finish(accelerator, model, dataset, labels, state, out, train_args, data_args, stopped_early)
    accelerator.end_training()
    return results


@dataclass
class TrainingParts:
    """What every epoch of one run uses (prepared by Accelerate), passed as one."""

    accelerator: Any
    model: Any
    loader: Any
    optimizer: Any
    scheduler: Any
    loss_fn: Any
    config: OctSamConfig
    data_args: DataArguments
    train_args: TrainArguments
    out: Path
    steps_per_epoch: int


def train_one_epoch(parts: TrainingParts, state: dict, epoch: int, speed_log: dict | None = None) -> float:
    """One pass over the training data; returns the mean training loss. Stops the run on a non-finite loss.

    ``speed_log`` receives the epoch's training images/s (all processes; data loading included, validation not),
    once over the whole epoch and once after its first step (which holds the compilation in a compiled run), and
    ``compile_s`` (the first step of a compiled run, logged once). One device sync after the first step of an
    epoch is the only one this adds; the epoch's end syncs anyway (the loss reduce).
    """
    accelerator, model, loader, optimizer = parts.accelerator, parts.model, parts.loader, parts.optimizer
    scheduler, loss_fn, config, out = parts.scheduler, parts.loss_fn, parts.config, parts.out
    data_args, train_args, steps_per_epoch = parts.data_args, parts.train_args, parts.steps_per_epoch
    speed_log = {} if speed_log is None else speed_log
    total = torch.zeros((), device=accelerator.device)
    count = 0
    first_bad = None
    epoch_steps = 0
    images = 0
    first_images, after_first = 0, None
    started = time.perf_counter()
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}", disable=not accelerator.is_local_main_process)
    foreground = torch.zeros((), device=accelerator.device)
    for batch in loader:
        images += int(batch["pixels"].shape[0])
        foreground += ((batch["mask"] > 0) & (batch["mask"] != IGNORE_INDEX)).sum()
        with accelerator.accumulate(model):
            kind = pick_prompt_kind(data_args, train_args.seed, epoch, state["global_step"])
            loss, _ = compute_loss(model, batch, loss_fn, config.mode, kind)
            if first_bad is None:
                first_bad = torch.zeros((), device=loss.device)
            first_bad = torch.where(
                torch.isfinite(loss) | (first_bad > 0), first_bad, loss.new_tensor(state["global_step"] + 1.0)
            )
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach().float()
        count += 1
        if after_first is None:
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize(accelerator.device)
            after_first, first_images = time.perf_counter(), images
            if speed_log.get("compiled") and not speed_log.get("compile_reported"):
                speed_log.update(compile_s=after_first - started, compile_reported=True)
                logger.info(f"torch.compile: the first training step took {after_first - started:.1f} s (compilation)")
        if accelerator.sync_gradients:
            scheduler.step()
            state["global_step"] += 1
            epoch_steps += 1
            bar.update(1)
            # every process must take this branch together (it all-reduces): count steps, not the bar (rank 0 only)
            if state["global_step"] % train_args.logging_steps == 0 or epoch_steps == steps_per_epoch:
                check_finite(accelerator, first_bad, out)
                mean = accelerator.reduce(total / max(count, 1), "mean").item()
                bar.set_postfix(loss=f"{mean:.4f}")
                accelerator.log({"train_loss": mean, "lr": scheduler.get_last_lr()[0]}, step=state["global_step"])
    bar.close()
    state["foreground_pixels"] = int(accelerator.reduce(foreground.float(), "sum").item())
    if first_bad is not None:
        check_finite(accelerator, first_bad, out)
    mean_loss = accelerator.reduce(total / max(count, 1), "mean").item()  # syncs: the epoch's work is done
    elapsed = time.perf_counter() - started
    procs = accelerator.num_processes
    speed_log["train_images_per_s"] = images * procs / elapsed if elapsed > 0 else 0.0
    rest = elapsed - (after_first - started) if after_first is not None else 0.0
    speed_log["train_images_per_s_after_first_step"] = (
        (images - first_images) * procs / rest
        if rest > 0 and images > first_images
        else speed_log["train_images_per_s"]
    )
    return mean_loss


def check_finite(accelerator, first_bad: torch.Tensor, out: Path) -> None:
    bad = accelerator.reduce(first_bad.reshape(1).float(), "max").item()
    if bad > 0:
        ckpts = list_checkpoints(out / CHECKPOINT_DIR)
        kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        raise OctSamError(
            f"Non-finite loss at optimizer step {int(bad)}; stopping ({kept}). Lower --learning-rate, check the "
            "dataset for broken masks, or try --mixed-precision no."
        )


def finish(accelerator, model, dataset, labels, state, out, train_args, data_args, stopped_early) -> dict:
    """Best adapter -> test metrics, all_results.json, curves; optional push to the Hub."""
    results = {
        "best_epoch": state["best_epoch"],
        "best_val_mean_dice": state["best_metric"],
        "epochs_trained": state["epoch"],
        "global_step": state["global_step"],
        "stopped_early": stopped_early,
        "labels": labels,
        "train_images_per_s_per_epoch": [round(h.get("train_images_per_s", 0.0), 2) for h in state["history"]],
        "train_images_per_s_after_first_step_per_epoch": [
            round(h.get("train_images_per_s_after_first_step", 0.0), 2) for h in state["history"]
        ],
    }
    if state.get("compile_s") is not None:
        results["compile_s"] = round(state["compile_s"], 2)
    if state["best_metric"] <= 0:
        results["warning"] = (
            "validation Dice stayed 0: the model never found a biomarker (all-background masks, a too short run or "
            "a broken label set); do not publish this adapter as is"
        )
        logger.warning(f"warning: {results['warning']}.")
    if accelerator.is_main_process:
        from octsam.evaluation.plots import plot_training_curves

        plot_training_curves(state["history"], out / "training_curves.png", class_names=labels)
        if train_args.evaluate_test:
            from octsam.evaluation.predict import evaluate_model

            test = evaluate_model(
                str(out / BEST_ADAPTER_DIR),
                dataset["test"],
                labels,
                out / "test_results",
                method="fine-tuned",
                device=accelerator.device,
            )
            results.update({f"test_{k}": v for k, v in test.headline.items()})
        from octsam.cards import write_adapter_card

        write_adapter_card(
            out / BEST_ADAPTER_DIR,
            metrics=test.to_dict() if train_args.evaluate_test else None,
            training={
                "train_scans": len(dataset["train"]),
                "best_epoch": state["best_epoch"],
                "epochs_trained": state["epoch"],
                "best_val_mean_dice": state["best_metric"],
                "learning_rate": train_args.learning_rate,
                "effective_batch_size": train_args.effective_batch_size,
                "seed": train_args.seed,
            },
            dataset=data_args.dataset,
            repo_id=train_args.hub_model_id,
        )
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        logger.info(f"best adapter: {out / BEST_ADAPTER_DIR}; results: {out / RESULTS_FILE}")
        if train_args.push_to_hub:
            from octsam.hub import push_adapter

            push_adapter(out / BEST_ADAPTER_DIR, train_args.hub_model_id, private=train_args.hub_private)
    accelerator.wait_for_everyone()
    return results
