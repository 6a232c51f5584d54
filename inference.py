"""Segment OCT B-scans with a trained adapter: ``python inference.py --adapter DIR_OR_REPO --input PATH... --output DIR``.

Thin wrapper around ``octsam.cli.infer.main`` (also installed as ``octsam-infer``); ``--help`` lists the options.
"""

import sys

from octsam.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
