"""examples.data's MNIST-format IDX reader and the "fashion-mnist" source, on tiny IDX files the
tests write themselves (never the real data set)."""
import gzip
import struct

import numpy as np
import pytest

from examples import data as data_module
from examples.data import load_dataset

TRAIN, TEST = 12, 5


def idx_bytes(array, magic_dtype=0x08):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, magic_dtype, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.tobytes()


def write_idx_folder(folder, compress=True, seed=0):
    """A tiny MNIST-format folder; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (TRAIN, 6, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (TEST, 6, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 3, 3, 1], dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if compress:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(array))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_reads_images_and_labels_exactly(tmp_path, compress):
    arrays = write_idx_folder(tmp_path / "idx", compress=compress)
    loaded = load_dataset(str(tmp_path / "idx"))
    assert loaded.x_train.shape == (TRAIN, 6, 5, 1) and loaded.x_test.shape == (TEST, 6, 5, 1)
    assert loaded.classes == 10 and loaded.name == "idx"
    np.testing.assert_array_equal(loaded.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(loaded.y_test, arrays["t10k-labels-idx1-ubyte"])
    # Pixels keep their order and scale: [0, 1], centred by the training mean only.
    train = arrays["train-images-idx3-ubyte"].astype("float32")[..., None] / 255.0
    test = arrays["t10k-images-idx3-ubyte"].astype("float32")[..., None] / 255.0
    np.testing.assert_allclose(loaded.x_train, train - train.mean(), atol=1e-6)
    np.testing.assert_allclose(loaded.x_test, test - train.mean(), atol=1e-6)
    assert load_dataset(str(tmp_path / "idx"), flatten=True).x_train.shape == (TRAIN, 30)


def test_fashion_mnist_found_through_keras_bn_data(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "fashion-mnist")
    monkeypatch.setenv("KERAS_BN_DATA", str(tmp_path))
    monkeypatch.setitem(data_module.NAMED_IDX_SOURCES, "fashion-mnist", str(tmp_path / "none"))
    loaded = load_dataset("fashion-mnist")
    assert loaded.name == "fashion-mnist" and loaded.x_test.shape == (TEST, 6, 5, 1)
    # $KERAS_BN_DATA may also be the IDX folder itself.
    monkeypatch.setenv("KERAS_BN_DATA", str(tmp_path / "fashion-mnist"))
    assert load_dataset("fashion-mnist").x_train.shape == (TRAIN, 6, 5, 1)


def test_fashion_mnist_found_in_the_system_folder(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "datasets" / "fashion-mnist", compress=False)
    monkeypatch.delenv("KERAS_BN_DATA", raising=False)
    monkeypatch.setitem(data_module.NAMED_IDX_SOURCES, "fashion-mnist",
                        str(tmp_path / "datasets" / "fashion-mnist"))
    assert load_dataset("fashion-mnist").x_train.shape == (TRAIN, 6, 5, 1)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BN_DATA", str(tmp_path))
    monkeypatch.setitem(data_module.NAMED_IDX_SOURCES, "fashion-mnist", str(tmp_path / "none"))
    with pytest.raises(ValueError) as error:
        load_dataset("fashion-mnist")
    message = str(error.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "KERAS_BN_DATA" in message and "train-images-idx3-ubyte" in message
    assert str(tmp_path / "none") in message


def test_missing_file_is_named(tmp_path):
    write_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]") as error:
        load_dataset(str(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file_is_named(tmp_path, compress):
    write_idx_folder(tmp_path, compress=compress)
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=name) as error:
        load_dataset(str(tmp_path))
    assert "\n" not in str(error.value)
    # A header cut short too.
    path.write_bytes(idx_bytes(np.zeros((2, 2, 2)))[:9] if not compress
                     else gzip.compress(idx_bytes(np.zeros((2, 2, 2)))[:9]))
    with pytest.raises(ValueError, match=f"{name} is truncated"):
        load_dataset(str(tmp_path))


def test_wrong_magic_and_mismatched_counts_are_named(tmp_path):
    write_idx_folder(tmp_path, compress=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(TEST), magic_dtype=0x0D))  # float32 IDX
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte is not an IDX file"):
        load_dataset(str(tmp_path))
    path.write_bytes(idx_bytes(np.zeros((TEST, 1))))  # 2-d where labels are 1-d
    with pytest.raises(ValueError, match="magic number is 00000802"):
        load_dataset(str(tmp_path))
    path.write_bytes(idx_bytes(np.zeros(TEST + 1)))
    with pytest.raises(ValueError, match="holds 5 images but .* 6 labels"):
        load_dataset(str(tmp_path))
    path.write_bytes(b"not gzip")
    (tmp_path / "t10k-labels-idx1-ubyte").rename(tmp_path / "x")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is corrupt"):
        load_dataset(str(tmp_path))


def test_command_line_prints_one_line_for_missing_data(tmp_path, monkeypatch, capsys):
    from examples import cli

    monkeypatch.setenv("KERAS_BN_DATA", str(tmp_path))
    monkeypatch.setitem(data_module.NAMED_IDX_SOURCES, "fashion-mnist", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(lambda: load_dataset("fashion-mnist"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset-fashion-mnist" in err


def test_figure1_on_an_idx_folder_names_its_results_after_the_data(tmp_path, monkeypatch, capsys):
    from examples import figure1

    write_idx_folder(tmp_path / "fashion-mnist")
    monkeypatch.setenv("KERAS_BN_DATA", str(tmp_path))
    figure1.main(["--quick", "--steps", "4", "--batch-size", "4", "--data", "fashion-mnist",
                  "--output-dir", str(tmp_path / "out"), "--verbose", "0"])
    payload = json_load(tmp_path / "out" / "figure1_fashion-mnist.json")
    assert payload["data"] == "fashion-mnist" and payload["test_examples"] == TEST
    interval = payload["results"]["with BN"]["final_interval"]
    assert interval["n"] == TEST and interval["low"] <= interval["accuracy"] <= interval["high"]
    assert "5 test images" in (tmp_path / "out" / "figure1_fashion-mnist.md").read_text()
    assert not (tmp_path / "out" / "figure1.json").exists()  # digits' results stay as they are
    assert "Wrote figure1_fashion-mnist.json" in capsys.readouterr().out


def json_load(path):
    import json

    return json.loads(path.read_text())


def test_demo_takes_fashion_mnist_and_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    # `make demo DATA=fashion-mnist`: without the data set, one line before any training
    from examples import cli, demo

    monkeypatch.setenv("KERAS_BN_DATA", str(tmp_path))
    monkeypatch.setitem(data_module.NAMED_IDX_SOURCES, "fashion-mnist", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(lambda: demo.main(["--quick", "--data", "fashion-mnist",
                                        "--output-dir", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "apt-get install dataset-fashion-mnist" in error
    assert not (tmp_path / "out").exists()
