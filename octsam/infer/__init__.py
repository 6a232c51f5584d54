"""Segmenting files: find the inputs (``inputs``), run the ``Segmenter`` on them and write masks, overlays and
``summary.csv`` (``run``, ``outputs``)."""
