"""Fingerprints and sharpness of a normalised photo.

Both are computed on the normalised 512x512 result, never on the upload, so two uploads of one
photo (different format, size or EXIF rotation) are measured on the same pixels.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
from PIL import Image

PHASH_SIDE = 32
"""pHash looks at the lowest 8x8 frequencies of a 32x32 copy: detail finer than that (JPEG
noise, resampling) does not move the hash, composition and lighting do."""


def pixel_sha256(image: Image.Image) -> str:
    """Exact-duplicate key: SHA-256 of the size and the raw RGB pixel bytes."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash), bit 63 first, of a photo's luminance.

    Each bit says whether one of the 8x8 lowest DCT frequencies of a 32x32 grayscale copy is
    above their median, so re-encoding or slight resizing flips few bits, another photo ~half.
    """
    small = image.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    low = cv2.dct(np.asarray(small, dtype=np.float32))[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian of an 8-bit grayscale image: low when edges are soft (blur)."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())
