"""Checkpoints that resume exactly: trainable tensors, optimiser, scheduler, every process's RNG state and the
early-stopping state, written to a temporary folder and swapped into place; best, latest and a few others kept."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from octsam.adapter import ADAPTER_CONFIG_NAME
from octsam.config import TrainArguments
from octsam.errors import OctSamError
from octsam.folders import atomic_folder, swap_into_place

# ------------------------------------------------------------------------------------------------ run folder names
# The run folder's layout lives in octsam.runs (read by evaluation and the demo too); re-exported here.
from octsam.runs import (  # noqa: E402, F401
    BEST_ADAPTER_DIR,
    CHECKPOINT_DIR,
    CHECKPOINT_GLOB,
    RESULTS_FILE,
    TRAINER_STATE,
    checkpoint_name,
    list_checkpoints,
    run_history,
)

SHARED_STAGING_SUFFIX = ".tmp"  # checkpoints/epoch-NNNN.tmp: one name for every process of a distributed run


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


# ------------------------------------------------------------------------------------------------ file format
# No file of a checkpoint is a pickle: tensors are safetensors, everything else JSON. Reading one can run no code.
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
LEGACY_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state_*.pt")


def rng_file(process_index: int) -> str:
    return f"rng_state_{process_index}.safetensors"


def _json_bytes(value, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except TypeError as err:
        raise OctSamError(f"Cannot store the {what} state in a checkpoint as JSON: {err}") from err


def save_rng_state(path: Path) -> None:
    from safetensors.torch import save_file

    state = rng_state()
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    for i, cuda in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = cuda
    meta = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "cuda_devices": str(len(state.get("cuda", []))),
    }
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, internal, gauss = json.loads(meta["python"])
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    state = {
        "python": (int(version), tuple(int(v) for v in internal), gauss),
        "numpy": (str(kind), keys, int(pos), int(has_gauss), float(cached)),
        "torch": tensors["torch"],
    }
    cuda = [tensors[f"cuda.{i}"] for i in range(int(meta.get("cuda_devices", "0")))]
    if cuda:
        state["cuda"] = cuda
    return state


def save_optimizer(optimizer, folder: Path) -> None:
    """Optimizer state: its tensors in safetensors, the structure (param groups, scalars) in JSON."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for index, values in sd["state"].items():
        entry = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                name = f"state.{index}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": name}
            else:
                entry[key] = {"value": value}
        state[str(index)] = entry
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    structure = {"state": state, "param_groups": sd["param_groups"]}
    (folder / OPTIMIZER_JSON).write_text(_json_bytes(structure, "optimizer"))


def optimizer_state_from(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    """The optimizer state dict from ``optimizer.safetensors`` and ``optimizer.json`` (see ``save_optimizer``)."""
    state = {}
    for index, values in structure["state"].items():
        state[int(index)] = {
            key: tensors[item["tensor"]] if "tensor" in item else item["value"] for key, item in values.items()
        }
    groups = structure["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(accelerator, model, optimizer, scheduler, trainer_state: dict, out: Path, keep: int) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically; every process stores its RNG state, the main one the rest."""
    from safetensors.torch import save_file

    ckpt_root = out / CHECKPOINT_DIR
    final = ckpt_root / checkpoint_name(trainer_state["epoch"])
    # Not octsam.folders.staging_path: every process writes its RNG state into the same folder, so its name cannot
    # hold a PID; the run's FolderLock makes it exclusive, and a run removes one left by a killed run.
    tmp = ckpt_root / f"{final.name}{SHARED_STAGING_SUFFIX}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        save_rng_state(tmp / rng_file(accelerator.process_index))
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            save_file(trainable_state(unwrapped), str(tmp / TRAINABLE_FILE))
            save_optimizer(optimizer, tmp)
            (tmp / SCHEDULER_JSON).write_text(_json_bytes(scheduler.state_dict(), "scheduler"))
            unwrapped.config.to_json_file(tmp / ADAPTER_CONFIG_NAME)
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk: the last complete checkpoint stays as it was
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_into_place(tmp, final)
        prune_checkpoints(ckpt_root, best_epoch=trainer_state["best_epoch"], keep=keep)
    accelerator.wait_for_everyone()
    return final


def _unreadable(path: Path, err: BaseException) -> OctSamError:
    return OctSamError(
        f"Checkpoint {path.parent} cannot be resumed: {path.name} is damaged or not what octsam writes "
        f"({type(err).__name__}: {str(err)[:200]}). Resume from another checkpoint (the folders next to it) or start "
        "a new run."
    )


def check_checkpoint_files(path: Path, process_index: int = 0) -> None:
    """Refuse a checkpoint that is incomplete or holds pickle files (octsam never unpickles: it could run code)."""
    legacy = sorted({p.name for pattern in LEGACY_PICKLES for p in path.glob(pattern)})
    if legacy and not (path / OPTIMIZER_TENSORS).is_file():
        raise OctSamError(
            f"Checkpoint {path} holds pickle files ({', '.join(legacy)}), written by an older octsam or by someone "
            "else. octsam does not load pickles (unpickling can run arbitrary code); resume from a checkpoint "
            "written by this octsam version, or start a new run (its best_adapter can still be used for inference)."
        )
    needed = [TRAINABLE_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON, TRAINER_STATE, ADAPTER_CONFIG_NAME]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise OctSamError(f"Checkpoint {path} is incomplete (no {', '.join(missing)}); resume from another one.")


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint written by ``save_checkpoint`` (safetensors + JSON only) and return its trainer state."""
    from safetensors.torch import load_file

    check_checkpoint_files(path, accelerator.process_index)
    current = path / TRAINABLE_FILE
    try:
        trainable = load_file(str(current))
        current = path / TRAINER_STATE
        state = json.loads(current.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not {"epoch", "global_step", "best_epoch", "history"} <= set(state):
            raise ValueError("not an octsam trainer state")
        current = path / OPTIMIZER_TENSORS
        optimizer_tensors = load_file(str(current))
        current = path / OPTIMIZER_JSON
        optimizer_state = optimizer_state_from(optimizer_tensors, json.loads(current.read_text(encoding="utf-8")))
        current = path / SCHEDULER_JSON
        scheduler_state = json.loads(current.read_text(encoding="utf-8"))
        if not isinstance(scheduler_state, dict):
            raise ValueError("not a scheduler state")
        current = path / rng_file(accelerator.process_index)
        rng = load_rng_state(current) if current.is_file() else None
    except OctSamError:
        raise
    except Exception as err:  # noqa: BLE001 - any damage to any file gets one message naming the file
        raise _unreadable(current, err) from err
    load_trainable_state(accelerator.unwrap_model(model), trainable, str(path))
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise _unreadable(path / OPTIMIZER_JSON, err) from err
    if rng is not None:
        set_rng_state(rng)
    return state


def prune_checkpoints(root: Path, best_epoch: int, keep: int) -> None:
    """Keep the latest, the best and ``keep`` more recent ones."""
    ckpts = list_checkpoints(root)
    protected = {ckpts[-1].name, checkpoint_name(best_epoch)} if ckpts else set()
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
    if not (path / TRAINER_STATE).is_file():
        raise OctSamError(f"{path} is not an octsam checkpoint folder (no {TRAINER_STATE}).")
    return path


def write_atomic_folder(save, final: Path) -> None:
    """Call ``save(tmp_folder)`` then move it over ``final`` (a reader never sees a half-written adapter)."""
    with atomic_folder(final) as tmp:
        save(tmp)
