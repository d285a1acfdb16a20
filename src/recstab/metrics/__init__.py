"""Image-quality metrics beyond PSNR: LPIPS with the real ImageNet AlexNet, offline too.

``recstab.metrics.lpips(x, y)`` is the function (the module of the same name is
:mod:`recstab.metrics.lpips`; import its helpers with ``from recstab.metrics.lpips import ...``).
"""

from recstab.metrics.lpips import FrameLPIPS, alexnet_features, lpips, make_lpips_metric

__all__ = ["FrameLPIPS", "alexnet_features", "lpips", "make_lpips_metric"]
