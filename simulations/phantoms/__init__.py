"""Synthetic multi-center, multi-phase liver MRI phantoms (LiQA-like) and an ATLAS-like pretraining set."""

from simulations.phantoms.atlas import generate_atlas_tree
from simulations.phantoms.centers import training_center_names
from simulations.phantoms.generator import (
    DEFAULT_CENTERS, CenterSummary, PhantomConfig, PhantomSummary, generate_liqa_tree, render_case,
)
from simulations.phantoms.preview import render_preview, write_preview

__all__ = [
    "DEFAULT_CENTERS", "CenterSummary", "PhantomConfig", "PhantomSummary", "generate_liqa_tree",
    "generate_atlas_tree", "render_case", "render_preview", "write_preview", "training_center_names",
]
