"""Batch norm over the global batch when several processes train (``model.sync_bn``).

With plain DDP every device normalises with its own batch's statistics, so N devices x batch B is not the
same computation as one device x batch N*B. Synchronised batch norm makes it the same. timm's
``convert_sync_batchnorm`` turns both ``BatchNorm2d`` and timm's ``BatchNormAct2d`` (the MobileNet
encoder's) into torch's ``SyncBatchNorm`` variants on CUDA. torch refuses those on CPU, so on CPU (gloo:
debugging, and the DDP-equivalence test) the same layers get the global statistics from one autograd-aware
all-reduce of per-channel (sum, sum of squares, count), whose backward all-reduces the gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlobalBatchStats:
    """Mixin put in front of a batch-norm class (``BatchNorm2d``, timm's ``BatchNormAct2d``): in training
    with a process group of more than one, normalise with the statistics of the global batch. Not a
    ``SyncBatchNorm`` subclass: DDP refuses those on CPU modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([xf.numel() // c])])
        stats = dist_fn.all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), f)
                self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), f)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        y = y.to(x.dtype)
        if hasattr(self, "drop"):  # timm's BatchNormAct2d: norm, then dropout, then activation
            y = self.drop(y)
        if hasattr(self, "act"):
            y = self.act(y)
        return y


_VARIANTS: dict[type, type] = {}


def _global_variant(cls: type) -> type:
    if cls not in _VARIANTS:
        _VARIANTS[cls] = type(f"Global{cls.__name__}", (GlobalBatchStats, cls), {})
    return _VARIANTS[cls]


def convert_sync_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Every batch-norm layer of ``module`` synchronised across the process group; state_dict keys unchanged."""
    if cuda:
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module)
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not isinstance(sub, GlobalBatchStats):
            sub.__class__ = _global_variant(type(sub))
    return module
