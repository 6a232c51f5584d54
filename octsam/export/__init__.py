"""Export of a trained octsam model to ONNX (``octsam.export.onnx``) and its ONNX Runtime engine
(``octsam.export.runtime``). The folder format's names live in ``octsam.export.spec`` (no torch, no onnxruntime)."""
