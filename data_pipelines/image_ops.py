"""Image preprocessing in TensorFlow (SPEC §4): decode, resize keeping the aspect ratio,
normalize, pad to a square; random flip and colour jitter in training.

Order: decode -> resize (longer side = size) -> augment (values in [0, 1]) -> normalize
-> centre-pad to [size, size] with zeros. Padding after normalization makes the padded
border exactly 0, the mean colour, whatever the normalization constants.
Randomness is stateless, from a per-example seed, so the same example index always gets
the same augmentation (which makes input positions restorable).
"""

import tensorflow as tf

# NFNet/ImageNet statistics, for RGB values in [0, 1].
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)

_MAGIC = (  # (offset, prefix) of the encodings tf.io.decode_image reads
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"\x89PNG"),
    (0, b"GIF8"),
    (0, b"BM"),
    (8, b"WEBP"),
)


def looks_like_image(data: tf.Tensor) -> tf.Tensor:
    """Elementwise bool: each string of `data` starts like an encoding decode_image reads."""
    padded = data + b"\0" * 12  # substr fails past the end of short strings
    checks = [tf.equal(tf.strings.substr(padded, off, len(p)), p) for off, p in _MAGIC]
    return tf.reduce_any(tf.stack(checks, axis=-1), axis=-1)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 [h, w, 3] (grey and RGBA become RGB)."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_keep_aspect(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8/float [h, w, 3] -> float32 [h', w', 3] in [0, 1] with max(h', w') = size."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.maximum(h, w)
    new_h = tf.maximum(1, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(1, tf.cast(tf.round(w * scale), tf.int32))
    resized = tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w], method="bilinear",
                              antialias=True)
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def normalize(image: tf.Tensor) -> tf.Tensor:
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def pad_to_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """[..., h, w, 3] with h, w <= size -> [..., size, size, 3], centred, zero border."""
    shape = tf.shape(image)
    h, w = shape[-3], shape[-2]
    top, left = (size - h) // 2, (size - w) // 2
    rank = len(image.shape)
    paddings = [[0, 0]] * (rank - 3) + [[top, size - h - top], [left, size - w - left], [0, 0]]
    out = tf.pad(image, paddings)
    out.set_shape(image.shape[:-3].concatenate([size, size, 3]))
    return out


def augment(images: tf.Tensor, seed: tf.Tensor, flip: bool, colour: bool) -> tf.Tensor:
    """Same random flip / colour jitter for all of `images` [..., h, w, 3] in [0, 1].

    Applying one draw to every frame keeps a clip's motion consistent. The jitter changes
    brightness, contrast and saturation mildly and never the hue, so colour names stay true.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    if flip:
        do_flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
        images = tf.cond(do_flip, lambda: tf.reverse(images, axis=[-2]), lambda: images)
    if colour:
        brightness = tf.random.stateless_uniform([], seeds[1], -0.1, 0.1)
        contrast = tf.random.stateless_uniform([], seeds[2], 0.85, 1.15)
        saturation = tf.random.stateless_uniform([], seeds[3], 0.85, 1.15)
        images = images + brightness
        mean = tf.reduce_mean(images, axis=[-3, -2, -1], keepdims=True)
        images = (images - mean) * contrast + mean
        grey = tf.reduce_mean(images, axis=-1, keepdims=True)
        images = (images - grey) * saturation + grey
        images = tf.clip_by_value(images, 0.0, 1.0)
    return images


def preprocess_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Evaluation-time path: uint8 [h, w, 3] -> float32 [size, size, 3], no randomness."""
    return pad_to_square(normalize(resize_keep_aspect(image, size)), size)


def preprocess_encoded(encoded: tf.Tensor, size: int, seed: tf.Tensor | None = None,
                       flip: bool = False, colour: bool = False) -> tf.Tensor:
    """Encoded frames [n, T] (n media of T frames) -> float32 [n, T, size, size, 3].

    With seeds [n, 2], media i draws its own augmentation and all T frames of it share
    that draw (stateless draws from one seed are identical), so a clip's motion and
    colours stay consistent.
    """
    augmenting = seed is not None and (flip or colour)
    num_frames = encoded.shape[1]
    flat = tf.reshape(encoded, [-1])  # [n * T]

    def one(data, frame_seed):
        image = resize_keep_aspect(decode_image(data), size)
        if augmenting:
            image = augment(image, frame_seed, flip, colour)
        return pad_to_square(normalize(image), size)

    if augmenting:
        frame_seeds = tf.repeat(seed, num_frames, axis=0)  # [n * T, 2]
    else:
        frame_seeds = tf.zeros([tf.size(flat), 2], tf.int64)
    if encoded.shape[0] == 1 and num_frames == 1:  # a pair: no loop needed
        out = one(flat[0], frame_seeds[0])[None]
    else:
        out = tf.map_fn(lambda args: one(*args), (flat, frame_seeds),
                        fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
    return tf.reshape(out, [-1, num_frames, size, size, 3])
