"""Adapters on the Hugging Face Hub: resolve a folder or repo id, push a trained folder."""

from __future__ import annotations

import os
from pathlib import Path

from octsam.errors import OctSamError


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
        raise OctSamError(f"Adapter {adapter!r} is neither a local folder nor a valid Hub repo id.") from err
    except Exception as err:  # offline, missing repo, no access
        raise OctSamError(
            f"Cannot find adapter {adapter!r} as a local folder or on the Hub ({type(err).__name__}: {err}). "
            f"Check the path, or download it with `huggingface-cli download {adapter}` where there is internet."
        ) from err
