"""Adapters on the Hugging Face Hub: resolve a folder or repo id, push a trained folder.

octsam-hub push runs/amd/best_adapter ORG/octsam-amd [--private] [--revision BRANCH] [--dry-run]

A push sends an allow-list, never "whatever lies in the folder": the adapter's own files (``ADAPTER_FILES``) and,
when asked, the ``onnx/`` folder of an ONNX export (``.onnx`` graphs, their external ``.data`` and ``.json``). Other
files (credentials, keys, logs, checkpoints), symbolic links and pickles (``.bin``/``.pt``/``.pkl`` ...) are never
sent; the list is shown before anything is sent (``--dry-run`` shows it and sends nothing). The model card is
rendered in memory and uploaded from there: a push, failed or not, changes nothing in the folder.

Loading by repo id goes through ``huggingface_hub.snapshot_download``, so the cache (``HF_HOME``), offline mode
(``HF_HUB_OFFLINE=1``) and ``revision=`` behave as everywhere else on the Hub; a local folder is read as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from octsam.adapter import ADAPTER_FILES, CARD_NAME, check_adapter_folder
from octsam.errors import OctSamError

logger = logging.getLogger("octsam.hub")

ONNX_FOLDER = "onnx"  # written by an ONNX export; sent only when asked (``include_onnx``)
ONNX_SUFFIXES = (".onnx", ".data", ".onnx_data", ".json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")


@dataclass
class UploadPlan:
    """What a push sends: ``files`` (paths inside the folder, posix) read from disk, the card text (from memory) and
    what lies in the folder but is left out."""

    folder: Path
    files: list[str]
    card: str | None
    left_out: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return sorted(self.files + ([CARD_NAME] if self.card is not None else []))

    def describe(self) -> str:
        lines = [f"  {name}" + (" (model card, rendered for this repo)" if name == CARD_NAME and self.card else "")
                 for name in self.names]  # fmt: skip
        text = f"files to send from {self.folder}:\n" + "\n".join(lines)
        if self.left_out:
            shown = ", ".join(self.left_out[:20]) + (
                f" ... and {len(self.left_out) - 20} more" if len(self.left_out) > 20 else ""
            )
            text += f"\nnot sent (not an adapter file): {shown}"
        return text


def _regular_file(path: Path, folder: Path) -> bool:
    if path.is_symlink():
        raise OctSamError(
            f"{path} is a symbolic link; a push never sends a link's target. Replace it by the file itself "
            f'(e.g. cp --remove-destination "$(readlink -f {path.name})" {path.name}) in {folder}.'
        )
    return path.is_file()


def upload_plan(folder: str | os.PathLike, repo_id: str, card: bool = True, include_onnx: bool = False) -> UploadPlan:
    """The allow-listed files of an adapter folder (see the module docstring) and the card to upload."""
    from octsam.cards import REPO_PLACEHOLDER, is_octsam_card, render_adapter_card

    folder = Path(folder)
    config = check_adapter_folder(folder)
    files = [name for name in ADAPTER_FILES if name != CARD_NAME and _regular_file(folder / name, folder)]
    if include_onnx:
        onnx = folder / ONNX_FOLDER
        if onnx.is_symlink() or not onnx.is_dir():
            raise OctSamError(f"{folder} has no {ONNX_FOLDER}/ folder to send; export the adapter to ONNX first.")
        for path in sorted(onnx.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.name.lower().endswith(ONNX_SUFFIXES) and not path.name.lower().endswith(PICKLE_SUFFIXES):
                if _regular_file(path, folder) and not any(
                    part.startswith(".") for part in path.relative_to(onnx).parts
                ):
                    files.append(name)
    text = None
    readme = folder / CARD_NAME
    if card:
        existing = readme.read_text(encoding="utf-8") if _regular_file(readme, folder) else ""
        if not is_octsam_card(existing):
            text = render_adapter_card(config, repo_id=repo_id)
        else:
            text = existing.replace(REPO_PLACEHOLDER, repo_id)
    elif _regular_file(readme, folder):
        files.append(CARD_NAME)
    sent = set(files) | ({CARD_NAME} if text is not None else set())
    left_out = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() not in sent
    )
    return UploadPlan(folder, sorted(files), text, left_out)


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload octsam adapter",
    card: bool = True,
    include_onnx: bool = False,
    dry_run: bool = False,
    show: Callable[[str], None] | None = None,
) -> str:
    """Upload an adapter folder's allow-listed files to the Hub repo ``repo_id`` (created if missing) and return the
    commit URL (``dry_run``: send nothing and return the list).

    With ``card``, a ``README.md`` that is not octsam's (missing, or PEFT's template) is replaced on the Hub by the
    adapter card (without metrics: write it with ``octsam.cards.write_adapter_card`` first to include them), and the
    card's ``ORG/NAME`` placeholder becomes ``repo_id`` - in the uploaded copy; the folder is never written.
    ``show`` receives the list of what will be sent before anything is.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    check_adapter_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise OctSamError(f"{repo_id!r} is not a valid Hub repo id; use ORG/NAME ({err}).") from err
    if "/" not in repo_id:
        raise OctSamError(f"Hub repo id {repo_id!r} needs an owner: use ORG/NAME (your user name or an organisation).")
    if include_onnx:  # the exported folder must be complete and of this adapter's format, checked before sending
        from octsam.export.spec import ONNX_SUBFOLDER, read_spec

        if not (folder / ONNX_SUBFOLDER).is_dir():
            raise OctSamError(
                f"--onnx: {folder} has no {ONNX_SUBFOLDER}/ folder; export it first with `octsam-export "
                f"--adapter {folder} --output {folder / ONNX_SUBFOLDER}`."
            )
        read_spec(folder / ONNX_SUBFOLDER)
    plan = upload_plan(folder, repo_id, card=card, include_onnx=include_onnx)
    (show or logger.info)(plan.describe())
    if dry_run:
        return "\n".join(plan.names)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in plan.files]
    if plan.card is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=plan.card.encode("utf-8")))

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
        info = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message,
            repo_type="model",
            revision=revision,
            token=token,
        )
    except OctSamError:
        raise
    except Exception as err:  # network, authentication, permissions
        raise OctSamError(
            f"Could not push {folder} to the Hub repo {repo_id} ({type(err).__name__}: {err}). Log in with "
            "`hf auth login` (or set HF_TOKEN) with a write token, check that you may write to that owner, and that "
            "HF_HUB_OFFLINE is not set. Nothing in the folder was changed."
        ) from err
    return str(getattr(info, "commit_url", info))
