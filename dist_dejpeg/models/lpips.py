"""LPIPS as a frozen network (eval mode, mixed-precision safe): the training loss and the validation metric.

LPIPS and mixed precision: the backbone runs under the caller's autocast (that is where the time goes),
but the per-layer unit normalisation, squared differences and linear heads run in float32 with autocast
off. In fp16, the sum of squares inside lpips' ``normalize_tensor`` overflows above 65504 and its 1e-10
epsilon underflows to zero, which is where NaNs come from; in float32 neither can happen.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import torch
from torch import nn

from dist_dejpeg.config.schema import LPIPS_MIN_SIDE
from dist_dejpeg.models.weights import load_lpips_backbone, lpips_backbone


class LPIPS(nn.Module):
    """LPIPS distance between images in [0, 1]; returns one value per image (N). Always frozen, eval."""

    def __init__(self, net: str = "vgg", pretrained: bool = True, weights_file: str = "",
                 key: str = "loss.lpips_weights"):
        super().__init__()
        import lpips

        # pnet_rand=True: build the backbone without lpips' own download; weights are loaded below, the
        # standard way, or the run says (in `pretrained`) that the backbone is random.
        with warnings.catch_warnings():
            # lpips 0.1.4 builds its backbone with torchvision's deprecated `pretrained=` argument; the warning
            # speaks of lpips' internals, not of anything the user can change (the weights are loaded below)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils",
                                    message=r"(The parameter 'pretrained' is deprecated|Arguments other than a weight enum)")
            self.inner = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if pretrained:
            # torch.hub writes 'Downloading: "https://..."' on stdout, where a command's results go (evaluate
            # --quiet prints nothing else there): a note kept until the download is done, then on stderr; a
            # failed one says nothing of a download that did not happen (the WeightsError says why)
            note = io.StringIO()
            with contextlib.redirect_stdout(note):
                state, self.unverified = lpips_backbone(net, weights_file, key)
            sys.stderr.write(note.getvalue())
            load_lpips_backbone(self.inner.net, state)
        self.net_name = net
        self.pretrained = pretrained
        self.requires_grad_(False)
        self.eval()

    unverified = ""  # a pretrained backbone's file that is not torchvision's: what it is not (lpips_backbone)

    @property
    def description(self) -> str:
        if not self.pretrained:
            return f"lpips-{self.net_name} (RANDOM backbone: not real LPIPS)"
        return f"lpips-{self.net_name}" + (f" (UNVERIFIED backbone: {self.unverified})" if self.unverified else "")

    def train(self, mode: bool = True) -> "LPIPS":  # noqa: ARG002 - frozen: never leaves eval mode
        return super().train(False)

    def check_size(self, hw) -> None:
        """A ValueError naming the smallest side the backbone takes, for images of ``hw`` (H, W) below it (torch's
        pooling error would name channels)."""
        if min(hw) < LPIPS_MIN_SIDE.get(self.net_name, 1):
            other = " or LPIPS-vgg (loss.lpips_net, loss.metric_net: 16 px)" if self.net_name == "alex" else ""
            raise ValueError(f"LPIPS-{self.net_name} needs images of at least {LPIPS_MIN_SIDE[self.net_name]} px a "
                             f"side, got {hw[0]} x {hw[1]}: use larger crops (data.crop, data.val_crop){other}")

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.check_size(tuple(image.shape[-2:]))
        inner = self.inner
        features = lambda x: inner.net(inner.scaling_layer(x * 2 - 1))  # noqa: E731 - under the caller's autocast
        # Two passes, the target's without autograd when it needs no gradient (the clean image of a training
        # loss): the backward then runs through the restored half only, a third less backbone work per step
        # than one pass over the concatenated pair (the backbones have no batch norm: same values).
        feats_image = features(image)
        with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
            feats_target = features(target)
        total = torch.zeros(image.shape[0], device=image.device, dtype=torch.float32)
        with torch.autocast(device_type=image.device.type, enabled=False):
            for k, (fi, ft) in enumerate(zip(feats_image, feats_target)):
                diff = (_unit(fi.float()) - _unit(ft.float())).pow(2)
                total = total + inner.lins[k](diff).mean(dim=(1, 2, 3))
        return total


def _unit(feat: torch.Tensor) -> torch.Tensor:
    """lpips' normalize_tensor: unit length over channels, in float32."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
