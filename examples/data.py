"""Data sets for the examples, read from local files only (nothing downloads at run time).

`load_dataset(source, ...)` accepts:
    "digits"                 scikit-learn's bundled 8x8 digits (1,797 images), split 75/25
    path/to/mnist.npz        an MNIST `.npz` with x_train, y_train, x_test, y_test (Keras's format)
    path/to/cifar-10-batches-py/   the CIFAR-10 python batches (data_batch_1..5, test_batch)
    path/to/folder/          an ImageNet-style folder: train/<class>/*.jpg and val/<class>/*.jpg

and returns a `Dataset` of float32 numpy arrays, scaled to [0, 1] and centred by the training mean,
either as images (N, H, W, C) or flattened (N, H*W*C) for the MNIST network.
"""
import dataclasses
import os
import pickle

import numpy as np


@dataclasses.dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    name: str

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])


def _digits(test_fraction, seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype("float32")[..., None] / 16.0
    labels = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _mnist_npz(path):
    with np.load(path) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(
                f"{path} is not an MNIST .npz: it lacks {sorted(missing)}. Expected the arrays "
                f"x_train, y_train, x_test, y_test (Keras's mnist.npz); found {sorted(f.files)}."
            )
        x_train, y_train, x_test, y_test = (
            f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    scale = 255.0 if x_train.max() > 1 else 1.0

    def images(x):
        x = x.astype("float32") / scale
        return x[..., None] if x.ndim == 3 else x

    return images(x_train), y_train.astype("int32"), images(x_test), y_test.astype("int32")


def _cifar10(path):
    def batch(name):
        with open(os.path.join(path, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype="float32").reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x / 255.0, np.asarray(d[b"labels"], dtype="int32")

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        x_test,
        y_test,
    )


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _image_folder(path, image_size):
    import keras

    split_names = [s for s in ("train", "val", "validation", "test")
                   if os.path.isdir(os.path.join(path, s))]
    if "train" not in split_names or len(split_names) < 2:
        raise ValueError(
            f"{path} is not an ImageNet-style folder: expected train/<class>/ and val/<class>/ "
            f"subfolders; found {sorted(os.listdir(path))}."
        )
    classes = sorted(os.listdir(os.path.join(path, "train")))

    def load(split):
        xs, ys = [], []
        for label, name in enumerate(classes):
            folder = os.path.join(path, split, name)
            if not os.path.isdir(folder):
                continue
            for file in sorted(os.listdir(folder)):
                if file.lower().endswith(_IMAGE_SUFFIXES):
                    img = keras.utils.load_img(
                        os.path.join(folder, file), target_size=image_size, color_mode="rgb"
                    )
                    xs.append(keras.utils.img_to_array(img, dtype="float32") / 255.0)
                    ys.append(label)
        if not xs:
            raise ValueError(f"No images ({', '.join(_IMAGE_SUFFIXES)}) under {path}/{split}.")
        return np.stack(xs), np.asarray(ys, dtype="int32")

    x_train, y_train = load("train")
    x_test, y_test = load(split_names[1])
    return x_train, y_train, x_test, y_test


def _resize(images, size):
    """Nearest-neighbour upscaling by an integer factor, or bilinear otherwise (keras.ops)."""
    h, w = images.shape[1:3]
    if (h, w) == tuple(size):
        return images
    if size[0] % h == 0 and size[1] % w == 0:
        return np.repeat(np.repeat(images, size[0] // h, axis=1), size[1] // w, axis=2)
    import keras

    return keras.ops.convert_to_numpy(keras.ops.image.resize(images, size)).astype("float32")


def load_dataset(source="digits", flatten=False, image_size=None, test_fraction=0.25, seed=0):
    """Load a data set from a local source (see the module docstring) as float32 numpy arrays.

    Args:
        source: "digits", or a path to an MNIST `.npz`, a CIFAR-10 python batch folder or an
            ImageNet-style folder.
        flatten: return (N, features) for the MNIST network instead of (N, H, W, C) images.
        image_size: (height, width) to resize images to (None keeps the source size; an
            ImageNet-style folder defaults to 224x224).
        test_fraction: share of the digits held out for testing (other sources have a test split).
        seed: seed of the digits' train/test split.

    Returns:
        A `Dataset`.
    """
    if source == "digits":
        arrays, classes, name = _digits(test_fraction, seed), 10, "digits"
    elif isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        if not os.path.isfile(source):
            raise ValueError(f"MNIST file not found: {source}")
        arrays, name = _mnist_npz(source), "mnist"
        classes = int(max(arrays[1].max(), arrays[3].max())) + 1
    elif isinstance(source, (str, os.PathLike)) and os.path.isfile(
        os.path.join(source, "data_batch_1")
    ):
        arrays, classes, name = _cifar10(source), 10, "cifar10"
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        arrays = _image_folder(source, tuple(image_size or (224, 224)))
        classes, name = int(arrays[1].max()) + 1, os.path.basename(os.path.normpath(source))
    else:
        raise ValueError(
            "`source` must be 'digits', an MNIST .npz file, a CIFAR-10 python batch folder or an "
            f"ImageNet-style folder (train/ and val/). Received: source={source!r}"
        )
    x_train, y_train, x_test, y_test = arrays
    if image_size is not None:
        x_train, x_test = _resize(x_train, image_size), _resize(x_test, image_size)
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    x_train, x_test = x_train - mean, x_test - mean
    if flatten:
        x_train = x_train.reshape(len(x_train), -1)
        x_test = x_test.reshape(len(x_test), -1)
    return Dataset(
        x_train.astype("float32"), y_train, x_test.astype("float32"), y_test, classes, name
    )
