"""Segment OCT B-scans with a trained adapter: ``python inference.py --adapter DIR_OR_REPO --input PATH... --output DIR``.

Thin wrapper around ``octsam.inference.main`` (also installed as ``octsam-infer``); ``--help`` lists the options.
"""

import sys

from octsam.inference import main

if __name__ == "__main__":
    sys.exit(main())
