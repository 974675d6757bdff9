"""Image encoder of Diffusion Policy's CNN policy: ResNet-18 + spatial softmax.

ResNet-18 (He et al. 2016) written out here because torchvision does not load
beside every torch build; BatchNorm is replaced by GroupNorm (groups =
channels // 16) because batch statistics are unstable with the small batches
and EMA weights of policy training (Chi et al. 2023). The global pool and
classifier are replaced by robomimic's spatial-softmax keypoint layer and a
linear projection. No pretrained weights: Diffusion Policy trains from scratch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtdp.errors import ConfigError, ObservationError


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(channels // 16, channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected) identity shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNet18Conv(nn.Module):
    """ResNet-18 trunk without pooling and classifier; (B, 3, H, W) -> (B, 512, ~H/32, ~W/32)."""

    out_channels = 512

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            _norm(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 512, H', W')."""
        return self.layers(self.stem(x))


class SpatialSoftmax(nn.Module):
    """Keypoints as expected image coordinates of softmax attention maps.

    robomimic's ``SpatialSoftmax`` (Levine et al. 2016): a 1x1 conv makes
    ``num_kp`` maps, each is softmaxed over space, and the expected (x, y) in
    [-1, 1] of each map is a keypoint.

    Args:
        in_channels: channels of the feature map.
        height: feature map height.
        width: feature map width.
        num_kp: number of keypoints.
        temperature: softmax temperature.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_kp: int = 32, temperature: float = 1.0):
        super().__init__()
        self.num_kp = num_kp
        self.temperature = temperature
        self.keypoint_conv = nn.Conv2d(in_channels, num_kp, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("pos", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 2 * num_kp), keypoints as (x0, y0, x1, y1, ...)."""
        maps = self.keypoint_conv(features).flatten(2)  # (B, K, H*W)
        attention = torch.softmax(maps / self.temperature, dim=-1)
        return (attention @ self.pos).flatten(1)  # (B, K, 2) -> (B, 2K)


class ResNetImageEncoder(nn.Module):
    """Camera image -> feature vector: crop, ResNet-18 (GroupNorm), spatial softmax, linear.

    Args:
        image_shape: (H, W, 3) of the incoming images.
        crop_shape: (h, w) random crop in training, center crop otherwise; None keeps the full image.
        num_kp: spatial-softmax keypoints.
        feature_dim: output width.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        crop_shape: tuple[int, int] | None = (84, 84),
        num_kp: int = 32,
        feature_dim: int = 64,
    ) -> None:
        super().__init__()
        height, width, channels = (int(v) for v in image_shape)
        if channels != 3:
            raise ConfigError(f"image_shape must be (H, W, 3), got {tuple(image_shape)}")
        if crop_shape is not None:
            crop_shape = (int(crop_shape[0]), int(crop_shape[1]))
            if not (0 < crop_shape[0] <= height and 0 < crop_shape[1] <= width):
                raise ConfigError(f"crop_shape must fit inside the image {(height, width)}, got {crop_shape}")
        self.image_shape = (height, width, channels)
        self.crop_shape = crop_shape
        self.feature_dim = feature_dim
        self.backbone = ResNet18Conv(channels)
        in_h, in_w = crop_shape if crop_shape is not None else (height, width)
        with torch.no_grad():
            fh, fw = self.backbone(torch.zeros(1, channels, in_h, in_w)).shape[-2:]
        self.pool = SpatialSoftmax(self.backbone.out_channels, fh, fw, num_kp)
        self.proj = nn.Linear(2 * num_kp, feature_dim)

    def crop(self, images: torch.Tensor, random: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop channels-last images to ``crop_shape``.

        Args:
            images: (B, H, W, C).
            random: independent random offset per image, else the center.
            generator: source of the random offsets.

        Returns:
            (B, h, w, C).
        """
        if self.crop_shape is None:
            return images
        (h, w), (height, width) = self.crop_shape, images.shape[1:3]
        if not random:
            top, left = (height - h) // 2, (width - w) // 2
            return images[:, top : top + h, left : left + w]
        batch = images.shape[0]
        gen_device = generator.device if generator is not None else images.device
        top = torch.randint(0, height - h + 1, (batch,), generator=generator, device=gen_device).to(images.device)
        left = torch.randint(0, width - w + 1, (batch,), generator=generator, device=gen_device).to(images.device)
        rows = (top[:, None] + torch.arange(h, device=images.device))[:, :, None]
        cols = (left[:, None] + torch.arange(w, device=images.device))[:, None, :]
        return images[torch.arange(batch, device=images.device)[:, None, None], rows, cols]

    def forward(
        self, images: torch.Tensor, *, random_crop: bool | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Encode images.

        Args:
            images: (B, H, W, 3), uint8 or float in 0..255, channels last.
            random_crop: random (True) or center (False) crop; None follows ``self.training``.
            generator: source of the random crop offsets.

        Returns:
            features, (B, feature_dim).

        Raises:
            ObservationError: images are not (B, H, W, 3) with this encoder's H, W.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ObservationError(
                f"images must have shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}"
            )
        random_crop = self.training if random_crop is None else random_crop
        x = self.crop(images, random_crop, generator)
        dtype = self.proj.weight.dtype
        x = x.permute(0, 3, 1, 2).to(dtype) / 255.0
        return self.proj(self.pool(self.backbone(x.contiguous())))
