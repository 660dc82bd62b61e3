"""Evaluation images in numpy/PIL, with the arithmetic of training's TensorFlow path.

`data_pipelines/image_ops.preprocess_image` (no augmentation) is: resize keeping the
aspect ratio so the longer side is `size` (bilinear with antialiasing, on 0..255 values),
divide by 255 and clip to [0, 1], normalize with the ImageNet mean/std, centre-pad to a
square with zeros. `preprocess` repeats it without TensorFlow: the resize reproduces
`tf.image.resize(..., "bilinear", antialias=True)` (TF's scale-and-translate with a
triangle kernel widened by the downscale factor), so evaluation sees the pixels training
saw, to float32 rounding.
"""

import functools

import numpy as np
from PIL import Image

MEAN_RGB = np.array((0.485, 0.456, 0.406), np.float32)
STDDEV_RGB = np.array((0.229, 0.224, 0.225), np.float32)
_FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] rows of TF's antialiased bilinear (triangle) resampling weights."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv_scale = np.float32(1.0) / scale
    kernel_scale = max(inv_scale, np.float32(1.0))  # widen the kernel when downsampling
    radius = kernel_scale  # the triangle kernel's radius is 1
    weights = np.zeros((out_size, in_size), np.float32)
    for x in range(out_size):
        sample = (np.float32(x) + np.float32(0.5)) * inv_scale
        start = int(np.clip(np.ceil(sample - radius - 0.5), 0, in_size - 1))
        end = int(np.clip(np.floor(sample + radius - 0.5), 0, in_size - 1)) + 1
        src = np.arange(start, end, dtype=np.float32)
        w = np.maximum(0.0, 1.0 - np.abs((src + np.float32(0.5) - sample) / kernel_scale))
        total = w.sum(dtype=np.float32)
        weights[x, start:end] = w / total if total > 0 else w
    return weights


def resize_keep_aspect(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [h', w', 3] in [0, 1] with max(h', w') = size."""
    h, w = image.shape[:2]
    scale = np.float32(size) / np.float32(max(h, w))
    new_h = max(1, int(np.round(np.float32(h) * scale)))  # round half to even, as tf.round
    new_w = max(1, int(np.round(np.float32(w) * scale)))
    pixels = image.astype(np.float32)
    rows = _resize_weights(h, new_h)  # [h', h]
    cols = _resize_weights(w, new_w)  # [w', w]
    resized = np.einsum("ih,hwc->iwc", rows, pixels)
    resized = np.einsum("jw,iwc->ijc", cols, resized)
    return np.clip(resized / np.float32(255.0), 0.0, 1.0)


def normalize(image: np.ndarray) -> np.ndarray:
    return (image - MEAN_RGB) / STDDEV_RGB


def pad_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """[h, w, 3] with h, w <= size -> [size, size, 3], centred, zero border."""
    h, w = image.shape[:2]
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size, image.shape[2]), np.float32)
    out[top:top + h, left:left + w] = image
    return out


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [size, size, 3], training's evaluation-time transform."""
    return pad_to_square(normalize(resize_keep_aspect(image, size)), size)


def read_rgb(path: str) -> np.ndarray:
    """uint8 [h, w, 3] of an image file (grey and RGBA become RGB)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist; fix the dataset paths in "
                                "config.eval.tasks") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError(f"image file {path} cannot be decoded ({type(e).__name__}: {e}); "
                         "replace or remove it") from None


@functools.lru_cache(maxsize=512)
def load_image(path: str, size: int) -> np.ndarray:
    """float32 [size, size, 3] of an image file; support images repeat, so cached."""
    return preprocess(read_rgb(path), size)


def frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """[num_frames] evenly spread indices into num_available frames (as training picks)."""
    t = np.arange(num_frames, dtype=np.float32) + 0.5
    idx = np.floor(t * np.float32(num_available) / np.float32(num_frames)).astype(np.int64)
    return np.minimum(idx, num_available - 1)


def load_media(paths, size: int, num_frames: int) -> np.ndarray:
    """float32 [num_frames, size, size, 3]: an image (repeated) or frames spread over a clip."""
    chosen = [paths[i] for i in frame_indices(len(paths), num_frames)]
    return np.stack([load_image(p, size) for p in chosen])
