"""octsam's web app: open OCT B-scans or volumes, segment them with an adapter, prompt and correct the masks, export
them as training data (``python -m octsam.app --adapter ORG/NAME_OR_FOLDER``).

The logic (``Session``) is plain Python and needs no Gradio; ``octsam.app.ui`` builds the Gradio page over it.
"""

from octsam.app.session import Scan, Session, new_export_folder

__all__ = ["Scan", "Session", "new_export_folder"]
