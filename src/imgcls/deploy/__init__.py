"""Deployable models: the export formats (ONNX, TorchScript, safetensors) written and read back.

Owns: writing each format with its class names and preprocessing and checking it against PyTorch
(`formats`), and reading an exported model back without PyTorch (`exported`: metadata, integrity,
preprocessing), which the ONNX predictor relies on.

May import: `imgcls.errors` and the torch-free parts of `imgcls.data` (`images`, `listing`); `exported`
imports no torch at all.
"""
