"""Deployable models: the export formats (ONNX, TorchScript, safetensors) written and read back.

Owns: writing each format with its class names and preprocessing and checking it against PyTorch
(`formats`), and reading an exported model back without PyTorch (`exported`: metadata, integrity,
preprocessing), which the ONNX predictor relies on; the export command behind imgcls.export
(`export_command`: a run's checkpoint loaded, exported and checked).

May import: `imgcls.errors` and the torch-free parts of `imgcls.data` (`images`, `listing`); `exported`
imports no torch at all. `export_command` also reads the run (`imgcls.runs`, `imgcls.evaluation.ensemble`).
"""
