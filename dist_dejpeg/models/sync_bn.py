"""Batch norm over the global batch when several processes train (``model.sync_bn``).

With plain DDP every device normalises with its own batch's statistics, so N devices x batch B is not the
same computation as one device x batch N*B. Synchronised batch norm makes it the same. timm's
``convert_sync_batchnorm`` turns both ``BatchNorm2d`` and timm's ``BatchNormAct2d`` (the MobileNet
encoder's) into torch's ``SyncBatchNorm`` variants. torch's kernels refuse CPU tensors, so on CPU (gloo:
debugging, and the DDP-equivalence test) the same layers compute the statistics with one autograd-aware
all-reduce of per-channel (sum, sum of squares, count); its backward all-reduces the gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class CpuSyncBatchNorm(nn.SyncBatchNorm):
    """``SyncBatchNorm`` that also runs on CPU tensors (any process group backend)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return nn.modules.batchnorm._BatchNorm.forward(self, x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([xf.numel() // c])])
        stats = dist_fn.all_reduce(stats, group=group)
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
        return y.to(x.dtype)


_CPU_VARIANTS: dict[type, type] = {nn.SyncBatchNorm: CpuSyncBatchNorm}


def _cpu_variant(cls: type) -> type:
    """timm's SyncBatchNormAct calls ``super().forward`` and then its activation: put the CPU statistics
    under it in the MRO instead of replacing its forward."""
    if cls not in _CPU_VARIANTS:
        _CPU_VARIANTS[cls] = type(f"Cpu{cls.__name__}", (cls, CpuSyncBatchNorm), {})
    return _CPU_VARIANTS[cls]


def convert_sync_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Every batch-norm layer of ``module`` synchronised across the process group; state_dict keys unchanged."""
    from timm.layers import convert_sync_batchnorm as timm_convert

    module = timm_convert(module)
    if not cuda:
        for sub in module.modules():
            if isinstance(sub, nn.SyncBatchNorm) and not isinstance(sub, CpuSyncBatchNorm):
                sub.__class__ = _cpu_variant(type(sub))
    return module
