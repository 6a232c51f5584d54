"""Command lines: each module parses its own arguments (kebab-case, ``--help`` with examples) and calls one library
function. Console scripts: octsam-train, octsam-infer, octsam-evaluate, octsam-hub, octsam-demo, octsam-build-dataset."""
