"""Adapters on the Hugging Face Hub: resolve a folder or repo id, push a trained folder.

python -m octsam.hub push runs/amd/best_adapter ORG/octsam-amd [--private] [--revision BRANCH]

Loading by repo id goes through ``huggingface_hub.snapshot_download``, so the cache (``HF_HOME``), offline mode
(``HF_HUB_OFFLINE=1``) and ``revision=`` behave as everywhere else on the Hub; a local folder is read as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from octsam.errors import OctSamError, cli_main

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


def resolve_adapter(adapter: str, revision: str | None = None) -> Path:
    """A local adapter folder, or a Hub repo id downloaded through huggingface_hub's cache (HF_HOME,
    HF_HUB_OFFLINE and ``revision`` are honoured)."""
    if os.path.isdir(adapter):
        return Path(adapter)
    if os.path.exists(adapter):
        raise OctSamError(f"Adapter {adapter} is a file; pass the adapter folder that holds octsam_config.json.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(adapter, revision=revision, repo_type="model"))
    except HFValidationError as err:
        raise OctSamError(
            f"Adapter {adapter!r} is neither an existing local folder nor a valid Hub repo id (ORG/NAME)."
        ) from err
    except Exception as err:  # offline, missing repo, no access
        at = f" --revision {revision}" if revision else ""
        raise OctSamError(
            f"Cannot find adapter {adapter!r}{' at revision ' + revision if revision else ''} as a local folder or on "
            f"the Hub ({type(err).__name__}: {err}). Check the path or repo id; for a private repo log in with "
            f"`hf auth login`; to use it offline, download it once where there is internet with "
            f"`hf download {adapter}{at}` (`huggingface-cli download` before huggingface_hub 1.0) and run with "
            "HF_HUB_OFFLINE=1, or pass the downloaded folder."
        ) from err


def check_adapter_folder(folder: str | os.PathLike):
    """The folder's ``OctSamConfig`` after checking it holds everything the loader needs."""
    from octsam.modeling import ADAPTER_CONFIG_NAME, OctSamConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise OctSamError(f"Adapter folder {folder} does not exist.")
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise OctSamError(
            f"{folder} has no {ADAPTER_CONFIG_NAME}: it is not an octsam adapter folder. Push the best_adapter "
            "folder that train.py writes."
        )
    config = OctSamConfig.from_json_file(folder / ADAPTER_CONFIG_NAME)
    if config.architecture == "unet":
        from octsam.unet import UNET_WEIGHTS

        needed = [UNET_WEIGHTS]
    else:
        needed = ["adapter_config.json", "adapter_model.safetensors"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise OctSamError(f"Adapter folder {folder} lacks {', '.join(missing)}; save it again with train.py.")
    return config


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload octsam adapter",
    card: bool = True,
) -> str:
    """Upload an adapter folder to the Hub repo ``repo_id`` (created if missing) and return the commit URL.

    With ``card``, a ``README.md`` that is not octsam's (missing, or PEFT's template) is replaced by the adapter card
    (without metrics: write it with ``octsam.cards.write_adapter_card`` first to include them), and the card's
    ``ORG/NAME`` placeholder becomes ``repo_id``. Training checkpoints and temporary files are never uploaded
    (``HUB_IGNORE_PATTERNS``).
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
            ignore_patterns=list(HUB_IGNORE_PATTERNS),  # upload_folder extends the list it is given
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m octsam.hub", description="Share octsam adapters on the Hub.")
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="Upload an adapter folder to a Hub model repo.")
    push.add_argument("folder", help="Adapter folder (e.g. runs/amd/best_adapter).")
    push.add_argument("repo_id", help="Hub repo id ORG/NAME (created if missing).")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument("--revision", default=None, help="Branch to push to (created if missing; default main).")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one or HF_TOKEN).")
    push.add_argument("--commit-message", default="Upload octsam adapter", help="Commit message.")
    push.add_argument("--no-card", action="store_true", help="Upload README.md as it is (no octsam card).")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    """``python -m octsam.hub push DIR ORG/NAME`` (also ``octsam-hub``); user errors print without a traceback."""
    args = build_parser().parse_args(argv)
    url = push_adapter(
        args.folder,
        args.repo_id,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
        card=not args.no_card,
    )
    print(f"pushed {args.folder} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
