"""A generated captioned-image dataset for trying eslmatch without downloads.

Scenes of coloured shapes are rendered to PNG and described by five true captions each,
drawn from a small grammar whose meanings can be checked against the scene; *hard pairs*
of images differ only by a swapped colour, size or position, to test fine-grained matching.
See ``docs/demo_dataset.md``.
"""

from __future__ import annotations

from .grammar import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    Caption,
    Conj,
    Desc,
    Margins,
    Mention,
    Obj,
    Relation,
    Scene,
    Total,
    caption_is_true,
    describe,
    realize,
)
from .scenes import (
    COLOR_RGB,
    DemoConfig,
    HardCase,
    SceneConfig,
    SplitFiles,
    SplitSpec,
    generate_split,
    hard_case_captions,
    hard_case_scores,
    load_hard_cases,
    render_scene,
    sample_scene,
    write_demo_dataset,
    write_split,
)

__all__ = [
    "COLORS",
    "COLOR_RGB",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Caption",
    "Conj",
    "DemoConfig",
    "Desc",
    "HardCase",
    "Margins",
    "Mention",
    "Obj",
    "Relation",
    "Scene",
    "SceneConfig",
    "SplitFiles",
    "SplitSpec",
    "Total",
    "caption_is_true",
    "describe",
    "generate_split",
    "hard_case_captions",
    "hard_case_scores",
    "load_hard_cases",
    "realize",
    "render_scene",
    "sample_scene",
    "write_demo_dataset",
    "write_split",
]
