"""octsam: fine-tune Segment Anything (SAM) with LoRA adapters on retinal OCT B-scans."""

__version__ = "0.1.0"

from octsam.errors import OctSamError  # noqa: E402

__all__ = ["OctSamError", "__version__"]
