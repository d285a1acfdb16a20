"""The published baselines of Table 1: each a class (``conf/model/<name>.yaml`` names it by ``_target_``, its
keys the class's arguments), also reachable by its ``name`` with ``build_model(backbone=<name>)``.

========== ========================================================== ============
name       model                                                      parameters
========== ========================================================== ============
fastdvdnet FastDVDnet, two-stage U-Nets on a causal 5-frame window    2 477 476
frvsr      FRVSR adapted to denoising: flow net + warped previous out 2 489 317
dbdnet     Deep Burst Denoising: single-frame + feature-recurrent     964 712
bm3d       per-frame CBM3D through the PyPI ``bm3d`` package          none
========== ========================================================== ============

(parameter counts for RGB, ``task="denoise"``, at the published width ``channels=64``; Table 1: 2.49M,
2.49M, 965k. ``channels`` and, for FRVSR and DBDNet, ``depth`` resize them: tests run them at 8.)
VNLB, the other non-learned method of Table 1, has no Python release and is not included.

Every baseline is a :class:`recstab.models.interface.VideoModel` (``model(x)``,
``process(x, state)``, ``streamable``, ``is_recurrent``, ``dampening``, ``recurrent_convs()``,
``loop_certificate()``). Only ``task="denoise"`` is supported.

A new baseline is one class and one config file (``_target_: mypackage.MyNet`` and its arguments): nothing to
register. Listing it in :data:`BASELINES` below only adds the Python shorthand ``build_model("<its name>")``.
"""

from recstab.models.baselines.bm3d_baseline import BM3D
from recstab.models.baselines.dbdnet import DBDNet
from recstab.models.baselines.fastdvdnet import FastDVDnet
from recstab.models.baselines.frvsr import FRVSR

BASELINES = {cls.name: cls for cls in (FastDVDnet, FRVSR, DBDNet, BM3D)}  # build_model(backbone=<name>)

__all__ = ["BASELINES", "BM3D", "DBDNet", "FastDVDnet", "FRVSR"]
