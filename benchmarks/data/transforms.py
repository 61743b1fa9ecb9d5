"""Image transforms: a batched random affine map for images held in memory, and the
standard crop-and-flip transforms of image files."""

import numpy as np
import torch

from .splits import TensorImageDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class RandomAffineImages(TensorImageDataset):
    """Training images held in memory, each batch drawn with its own small random affine map.

    Rotation up to ``degrees``, shear up to ``shear`` degrees, scale within ``1 +- scale``
    and shift up to ``translate`` of the side, sampled per image from torch's generator
    (seeded by the harness) and applied to the whole batch at once with ``affine_grid`` /
    ``grid_sample`` (torchvision's per-image RandomAffine costs as much as a training step
    here). What comes into view is filled with -1 (the glyphs' normalised background), or
    with ``padding="border"`` by the nearest edge pixel (images on a background of any colour).
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, degrees=8.0, shear=8.0, scale=0.1, translate=0.06,
                 padding="background"):
        super().__init__(images, labels)
        if padding not in ("background", "border"):
            raise ValueError(f"padding must be 'background' or 'border', got {padding!r}")
        self.degrees, self.shear, self.scale, self.translate, self.padding = degrees, shear, scale, translate, padding

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        """The batch of ``indices`` (DataLoader calls this once per batch), augmented."""
        images = self.images[indices]
        n = len(indices)

        def uniform(bound):
            return (torch.rand(n) * 2 - 1) * bound

        angle, shear = torch.deg2rad(uniform(self.degrees)), torch.deg2rad(uniform(self.shear))
        scale = 1 + uniform(self.scale)
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        theta = torch.stack([
            torch.stack([cos * scale, (cos * tan - sin) * scale, 2 * uniform(self.translate)], dim=1),
            torch.stack([sin * scale, (sin * tan + cos) * scale, 2 * uniform(self.translate)], dim=1),
        ], dim=1)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        if self.padding == "border":
            warped = torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)
        else:
            warped = torch.nn.functional.grid_sample(images + 1, grid, align_corners=False) - 1
        return [(image, int(label)) for image, label in zip(warped, self.labels[indices])]

    def subset(self, indices):
        return RandomAffineImages(self.images[indices], self.labels[indices], self.degrees, self.shear,
                                  self.scale, self.translate, self.padding)

    def unaugmented(self) -> TensorImageDataset:
        return TensorImageDataset(self.images, self.labels)

def _to_rgb(image):
    return image.convert("RGB")


def image_transforms(image_size: int, train: bool):
    """Standard DML transforms: random resized crop and flip to train, resize+centre crop to test."""
    from torchvision import transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return transforms.Compose([
            transforms.Lambda(_to_rgb),
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize(int(round(image_size * 256 / 224))),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])
