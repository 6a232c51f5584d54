"""Adapters on the Hugging Face Hub: resolve a folder or repo id, push a trained folder.

octsam-hub push runs/amd/best_adapter ORG/octsam-amd [--private] [--revision BRANCH]

Loading by repo id goes through ``huggingface_hub.snapshot_download``, so the cache (``HF_HOME``), offline mode
(``HF_HUB_OFFLINE=1``) and ``revision=`` behave as everywhere else on the Hub; a local folder is read as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from octsam.adapter import check_adapter_folder
from octsam.errors import OctSamError

# Never uploaded: training checkpoints, half-written or replaced folders/files, logs, caches.
HUB_IGNORE_PATTERNS = [
    "checkpoints/*",
    "*.tmp",
    "*.tmp/*",
    "*.tmp-*",
    "*.old",
    "*.old/*",
    "*.old-*",
    "tmp*",
    "logs/*",
    "runs/*",
    "events.out.tfevents.*",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "__pycache__/*",
    "*.pyc",
    ".*",
    ".*/*",
]


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload octsam adapter",
    card: bool = True,
    with_onnx: bool = False,
) -> str:
    """Upload an adapter folder to the Hub repo ``repo_id`` (created if missing) and return the commit URL.

    With ``card``, a ``README.md`` that is not octsam's (missing, or PEFT's template) is replaced by the adapter card
    (without metrics: write it with ``octsam.cards.write_adapter_card`` first to include them), and the card's
    ``ORG/NAME`` placeholder becomes ``repo_id``. Training checkpoints and temporary files are never uploaded
    (``HUB_IGNORE_PATTERNS``). ``with_onnx`` also uploads the folder's ``onnx/`` (``octsam-export --output
    FOLDER/onnx``), checked first; without it ``onnx/`` stays local.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from octsam.cards import REPO_PLACEHOLDER, is_octsam_card, write_adapter_card

    folder = Path(folder)
    config = check_adapter_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise OctSamError(f"{repo_id!r} is not a valid Hub repo id; use ORG/NAME ({err}).") from err
    if "/" not in repo_id:
        raise OctSamError(f"Hub repo id {repo_id!r} needs an owner: use ORG/NAME (your user name or an organisation).")
    if card:
        readme = folder / "README.md"
        text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
        if not is_octsam_card(text):
            write_adapter_card(folder, config, repo_id=repo_id)
        elif REPO_PLACEHOLDER in text:
            readme.write_text(text.replace(REPO_PLACEHOLDER, repo_id), encoding="utf-8")

    from octsam.export.spec import ONNX_SUBFOLDER, read_spec

    if with_onnx:  # the exported folder must be complete and of this adapter's format
        if not (folder / ONNX_SUBFOLDER).is_dir():
            raise OctSamError(
                f"--with-onnx: {folder} has no {ONNX_SUBFOLDER}/ folder; export it first with `octsam-export "
                f"--adapter {folder} --output {folder / ONNX_SUBFOLDER}`."
            )
        read_spec(folder / ONNX_SUBFOLDER)
    keep_local = not with_onnx and (folder / ONNX_SUBFOLDER).is_dir()
    ignore = list(HUB_IGNORE_PATTERNS) + ([f"{ONNX_SUBFOLDER}/*"] if keep_local else [])

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=ignore,  # upload_folder extends the list it is given
            token=token,
        )
    except OctSamError:
        raise
    except Exception as err:  # network, authentication, permissions
        raise OctSamError(
            f"Could not push {folder} to the Hub repo {repo_id} ({type(err).__name__}: {err}). Log in with "
            "`hf auth login` (or set HF_TOKEN) with a write token, check that you may write to that owner, and that "
            "HF_HUB_OFFLINE is not set."
        ) from err
    return str(getattr(info, "commit_url", info))
