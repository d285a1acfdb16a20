"""Image-quality metrics beyond PSNR: LPIPS with the real AlexNet, offline too.

``recstab.metrics.lpips(x, y)`` is the function (the module of the same name is
:mod:`recstab.metrics.lpips`; import its helpers with ``from recstab.metrics.lpips import ...``).
"""

from recstab.metrics.lpips import FrameLPIPS, ensure_alexnet_weights, lpips, make_lpips_metric

__all__ = ["FrameLPIPS", "ensure_alexnet_weights", "lpips", "make_lpips_metric"]
