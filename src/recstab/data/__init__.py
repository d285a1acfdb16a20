"""Data: degradations, download-free synthetic clips, Vimeo-90k septuplets.

Every dataset item is ``{"input": T x C x h x w, "target": T x C x H x W, "index": int}``
with float32 values, targets in [0, 1] and h = H / scale.
"""

from recstab.data.degradations import TASKS, Degradation, check_task, make_generator
from recstab.data.synthetic import (
    SPLITS,
    SceneChangeVideo,
    SyntheticClips,
    load_still,
    render_clip,
    synthetic_scene_changes,
)
from recstab.data.vimeo90k import Vimeo90k, check_root

__all__ = [
    "TASKS", "Degradation", "check_task", "make_generator",
    "SPLITS", "SceneChangeVideo", "SyntheticClips", "load_still", "render_clip", "synthetic_scene_changes",
    "Vimeo90k", "check_root",
]
