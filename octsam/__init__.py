"""octsam: fine-tune Segment Anything (SAM) with LoRA adapters on retinal OCT B-scans."""

__version__ = "0.1.0"

from octsam.errors import OctSamError  # noqa: E402

__all__ = ["OctSamError", "Segmenter", "__version__"]


def __getattr__(name: str):
    """``octsam.Segmenter`` without importing torch and transformers at ``import octsam``."""
    if name == "Segmenter":
        from octsam.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'octsam' has no attribute {name!r}")
