"""Frame preprocessing for the UMT encoder, as the official ``UMTImageProcessor`` (spec §1).

uint8 RGB frames -> resize straight to a ``size x size`` square (PIL bicubic, no aspect-preserving
resize, no crop) -> scale by 1/255 to float32 -> ImageNet mean/std -> channels first.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_square(frame: np.ndarray, size: int) -> np.ndarray:
    """One uint8 frame [H, W, 3] -> [size, size, 3] with PIL bicubic (antialiased when shrinking).

    Returned unchanged when it already has the target size (the official resize is then the
    identity).
    """
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    resized = Image.fromarray(frame).resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def preprocess_frames(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Frames [T, H, W, 3] uint8 RGB -> model input [T, 3, size, size] float32 (CPU).

    The caller moves the result to the model's device and dtype.
    """
    array = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {array.dtype} {array.shape}")
    resized = np.stack([resize_square(np.ascontiguousarray(f), size) for f in array])
    # u / 255 in float32 is the correctly rounded value the official float64 rescale casts to.
    x = torch.from_numpy(resized).float() / 255.0  # [T, S, S, 3]
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()  # [T, 3, S, S]
