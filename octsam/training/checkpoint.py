"""Checkpoints that resume exactly: trainable tensors, optimiser, scheduler, every process's RNG state and the
early-stopping state, written to a temporary folder and swapped into place; best, latest and a few others kept."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from octsam.config import TrainArguments
from octsam.errors import OctSamError
from octsam.folders import atomic_folder

CHECKPOINT_DIR = "checkpoints"


# ------------------------------------------------------------------------------------------------ checkpoints
def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise OctSamError(
            f"Checkpoint {source} does not match this model (missing {missing}, unexpected {extra}); it was written "
            "with another model, mode or label set."
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise OctSamError(
                    f"Checkpoint {source}: {name} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(params[name].shape)} (different label count or LoRA rank)."
                )
            params[name].copy_(value)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, model, optimizer, scheduler, trainer_state: dict, out: Path, keep: int) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically; every process stores its RNG state, the main one the rest."""
    from safetensors.torch import save_file

    ckpt_root = out / CHECKPOINT_DIR
    final = ckpt_root / f"epoch-{trainer_state['epoch']:04d}"
    tmp = ckpt_root / f"{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file(trainable_state(unwrapped), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        unwrapped.config.to_json_file(tmp / "octsam_config.json")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(ckpt_root, best_epoch=trainer_state["best_epoch"], keep=keep)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("epoch-[0-9][0-9][0-9][0-9]") if (p / "trainer_state.json").is_file())


def prune_checkpoints(root: Path, best_epoch: int, keep: int) -> None:
    """Keep the latest, the best and ``keep`` more recent ones."""
    ckpts = list_checkpoints(root)
    protected = {ckpts[-1].name, f"epoch-{best_epoch:04d}"} if ckpts else set()
    others = [p for p in ckpts if p.name not in protected]
    for path in others[: max(0, len(others) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(args: TrainArguments) -> Path:
    if args.resume_from_checkpoint == "latest":
        ckpts = list_checkpoints(Path(args.output_dir) / CHECKPOINT_DIR)
        if not ckpts:
            raise OctSamError(f"--resume-from-checkpoint latest: no checkpoint in {args.output_dir}/{CHECKPOINT_DIR}.")
        return ckpts[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise OctSamError(f"{path} is not an octsam checkpoint folder (no trainer_state.json).")
    return path


def write_atomic_folder(save, final: Path) -> None:
    """Call ``save(tmp_folder)`` then move it over ``final`` (a reader never sees a half-written adapter)."""
    with atomic_folder(final) as tmp:
        save(tmp)
