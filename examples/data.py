"""Data sets for the examples, read from local files only (nothing downloads at run time).

`load_dataset(source, ...)` accepts:
    "digits"                 scikit-learn's bundled 8x8 digits (1,797 images), split 75/25
    "fashion-mnist"          Fashion-MNIST (60,000 + 10,000 28x28 images) in MNIST's IDX format,
                             from $KERAS_BN_DATA/fashion-mnist/, $KERAS_BN_DATA/ or Debian's
                             `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist/)
    path/to/folder/          a folder of MNIST-format IDX files: train-images-idx3-ubyte,
                             train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
                             t10k-labels-idx1-ubyte, each plain or gzipped (.gz)
    path/to/mnist.npz        an MNIST `.npz` with x_train, y_train, x_test, y_test (Keras's format)
    path/to/cifar-10-batches-py/   the CIFAR-10 python batches (data_batch_1..5, test_batch)
    path/to/folder/          an ImageNet-style folder: train/<class>/*.jpg and val/<class>/*.jpg

and returns a `Dataset` of float32 numpy arrays, scaled to [0, 1] and centred by the training mean,
either as images (N, H, W, C) or flattened (N, H*W*C) for the MNIST network.
"""
import dataclasses
import gzip
import os
import pickle
import zlib

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


# Where a named IDX data set is looked for, after $KERAS_BN_DATA/<name>/ and $KERAS_BN_DATA/.
NAMED_IDX_SOURCES = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
_DATA_ENVIRONMENT = "KERAS_BN_DATA"
_IDX_SPLITS = ("train", "t10k")
_IDX_KINDS = (("images", 3), ("labels", 1))
_IDX_UNSIGNED_BYTE = 0x08


def _idx_name(split, kind, ndim):
    return f"{split}-{kind}-idx{ndim}-ubyte"


def _idx_files(folder):
    """{(split, kind): path} of the IDX files in `folder`, plain or gzipped."""
    found = {}
    for split in _IDX_SPLITS:
        for kind, ndim in _IDX_KINDS:
            for suffix in ("", ".gz"):
                path = os.path.join(folder, _idx_name(split, kind, ndim) + suffix)
                if os.path.isfile(path):
                    found[(split, kind)] = path
                    break
    return found


def _read_idx(path, ndim):
    """The uint8 array of an IDX file (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a
    magic number 0x0000 0x08 `ndim`, `ndim` big-endian int32 sizes, then the bytes."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is corrupt: it cannot be read ({error}).") from None
    header = 4 + 4 * ndim
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _IDX_UNSIGNED_BYTE or raw[3] != ndim:
        raise ValueError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes: its magic number is "
            f"{raw[:4].hex() or 'missing'}, expected 000008{ndim:02x}."
        )
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its header.")
    shape = tuple(int(v) for v in np.frombuffer(raw[4:header], dtype=">i4"))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"{path} is {'truncated' if len(raw) < expected else 'corrupt'}: {len(raw)} bytes, "
            f"its header {shape} says {expected}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_folder(folder, how_to_get):
    """The train and t10k images and labels of an MNIST-format IDX folder, images in [0, 1]."""
    found = _idx_files(folder)
    missing = [_idx_name(split, kind, ndim) + "[.gz]" for split in _IDX_SPLITS
               for kind, ndim in _IDX_KINDS if (split, kind) not in found]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}. {how_to_get}")
    arrays = []
    for split in _IDX_SPLITS:
        images = _read_idx(found[(split, "images")], 3)
        labels = _read_idx(found[(split, "labels")], 1)
        if len(images) != len(labels):
            raise ValueError(
                f"{found[(split, 'images')]} holds {len(images)} images but "
                f"{found[(split, 'labels')]} {len(labels)} labels; they must match."
            )
        arrays += [images.astype("float32")[..., None] / 255.0, labels.astype("int32")]
    return tuple(arrays)


def _how_to_get(name):
    """One sentence on where the IDX files of `name` come from."""
    files = ", ".join(_idx_name(s, k, n) for s in _IDX_SPLITS for k, n in _IDX_KINDS)
    where = (f"set ${_DATA_ENVIRONMENT} or --data to a folder holding MNIST-format IDX files "
             f"({files}; plain or .gz)")
    if name == "fashion-mnist":
        return ("Install it with `apt-get install dataset-fashion-mnist` (Debian, Ubuntu), or "
                f"{where}.")
    return f"Expected a folder holding MNIST-format IDX files ({files}; plain or .gz)."


def find_idx_folder(name):
    """The folder of the named IDX data set (`NAMED_IDX_SOURCES`): $KERAS_BN_DATA/<name>/, then
    $KERAS_BN_DATA/, then the system folder; the first that holds any of its IDX files."""
    candidates = []
    root = os.environ.get(_DATA_ENVIRONMENT, "").strip()
    if root:
        candidates += [os.path.join(root, name), root]
    candidates.append(NAMED_IDX_SOURCES[name])
    for folder in candidates:
        if os.path.isdir(folder) and _idx_files(folder):
            return folder
    raise ValueError(f"{name} not found (looked in {', '.join(candidates)}). {_how_to_get(name)}")


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
        source: "digits", "fashion-mnist", or a path to a folder of MNIST-format IDX files, an
            MNIST `.npz`, a CIFAR-10 python batch folder or an ImageNet-style folder.
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
    elif source in NAMED_IDX_SOURCES:
        arrays = _idx_folder(find_idx_folder(source), _how_to_get(source))
        classes, name = int(max(arrays[1].max(), arrays[3].max())) + 1, source
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source) and _idx_files(source):
        arrays = _idx_folder(os.fspath(source), _how_to_get(None))
        classes = int(max(arrays[1].max(), arrays[3].max())) + 1
        name = os.path.basename(os.path.normpath(source))
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
            "`source` must be 'digits', 'fashion-mnist', a folder of MNIST-format IDX files, an "
            "MNIST .npz file, a CIFAR-10 python batch folder or an ImageNet-style folder (train/ "
            f"and val/). Received: source={source!r}"
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
