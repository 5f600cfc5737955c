"""Saved configs from older layouts: a project target's old name (before the modules were grouped
into packages) reads back under today's name, so runs saved by an earlier layout of 0.1.0 still
resume, evaluate, predict and export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Where a project target lived before the modules were grouped into packages (0.1.0's first
# layout): a run saved then names these, and reads back under the current name.
RENAMED = {
    "imgcls.digits.DigitsData": "imgcls.data.digits.DigitsData",
    "imgcls.losses.CrossEntropyLoss": "imgcls.training.losses.CrossEntropyLoss",
    "imgcls.losses.FocalLoss": "imgcls.training.losses.FocalLoss",
    "imgcls.recipes.WarmupCosineLR": "imgcls.training.recipes.WarmupCosineLR",
    "imgcls.sweep.SweepSummary": "imgcls.sweeps.summary.SweepSummary",
    "imgcls.gpu_slots.OneGpuPerJob": "imgcls.sweeps.gpu_slots.OneGpuPerJob",
    "imgcls.preflight.BeforeRun": "imgcls.config.preflight.BeforeRun",
    # the models wing (issue 27): models.py, timm_models.py became imgcls.models.torchvision, .timm
    "imgcls.models.create_model": "imgcls.models.torchvision.create_model",
    "imgcls.timm_models.create_model": "imgcls.models.timm.create_model",
}


def current_names(node: Any) -> Any:
    """A saved config (plain containers) with the old names of project targets (RENAMED) replaced
    by today's; everything else, including what the registry refuses, is left for the check."""
    if isinstance(node, Mapping):
        return {
            k: RENAMED.get(v, v) if k == "_target_" and isinstance(v, str) else current_names(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [current_names(v) for v in node]
    return node
