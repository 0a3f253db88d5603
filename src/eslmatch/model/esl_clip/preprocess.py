"""CLIP's image preprocessing without torchvision: the branch's ``clip`` transform.

Resize the shorter side to ``size`` (bicubic), centre-crop ``size x size``, RGB, to floats
in [0, 1], normalise with CLIP's mean and standard deviation -> ``(3, size, size)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class ClipPreprocess:
    """PIL image -> normalised pixels ``(3, size, size)`` (picklable, for DataLoader workers)."""

    def __init__(self, size: int = 224) -> None:
        self.size = size

    def __call__(self, image: Any) -> Tensor:
        from PIL import Image  # an optional dependency (the extract extra)

        w, h = image.size
        # torchvision's Resize(int): the shorter side becomes size, the longer one is truncated
        if w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        if (w, h) != new:
            image = image.resize(new, Image.Resampling.BICUBIC)
        left = int(round((new[0] - self.size) / 2.0))
        top = int(round((new[1] - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size)).convert("RGB")
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
