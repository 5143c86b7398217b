"""The training loop, the variants and the Figure 3 protocol (grid rule, target, counts)."""
import dataclasses
import json

import keras
import numpy as np
import pytest

from examples import protocol, training, variants
from examples.data import load_dataset
from examples.history import History


@pytest.fixture(scope="module")
def digits_images():
    data = load_dataset("digits")
    data.x_train, data.y_train = data.x_train[:128], data.y_train[:128]
    data.x_test, data.y_test = data.x_test[:64], data.y_test[:64]
    return data


def test_load_digits_shapes():
    images = load_dataset("digits")
    flat = load_dataset("digits", flatten=True)
    assert images.x_train.shape[1:] == (8, 8, 1) and flat.x_train.shape[1:] == (64,)
    assert len(images.x_train) + len(images.x_test) == 1797
    assert images.classes == 10 and abs(float(images.x_train.mean())) < 1e-5
    up = load_dataset("digits", image_size=(16, 16))
    assert up.x_train.shape[1:] == (16, 16, 1)


def test_load_dataset_rejects_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="Received: source='nope'"):
        load_dataset("nope")
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(ValueError, match="lacks"):
        load_dataset(str(bad))


def test_load_mnist_npz_and_cifar_batches(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
             y_train=np.arange(20) % 10, x_test=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
             y_test=np.arange(5))
    mnist = load_dataset(str(path), flatten=True)
    assert mnist.x_train.shape == (20, 784) and mnist.classes == 10
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                         b"labels": [0, 1, 2, 9]}, f)
    cifar = load_dataset(str(folder))
    assert cifar.x_train.shape == (20, 32, 32, 3) and cifar.x_test.shape == (4, 32, 32, 3)


def test_batch_indices_fixed_order_vs_reshuffle():
    fixed = training.batch_indices(10, 5, 6, reshuffle=False, seed=0)
    shuffled = training.batch_indices(10, 5, 6, reshuffle=True, seed=0)
    assert (fixed[0] == fixed[2]).all() and (fixed[1] == fixed[5]).all()  # same batches each epoch
    assert sorted(np.concatenate(shuffled[2:4])) == list(range(10))  # every epoch covers all
    assert not all((shuffled[k] == shuffled[k + 2]).all() for k in (0, 2))


def test_variants_map_the_papers_changes():
    base, x5 = variants.VARIANTS["Inception"], variants.VARIANTS["BN-x5"]
    assert not base.batch_norm and base.dropout and base.local_response_normalization
    assert x5.batch_norm and x5.lr_multiplier == 5 and not x5.dropout
    assert x5.l2_multiplier == pytest.approx(0.2) and x5.decay_speedup == 6 and x5.reshuffle
    assert variants.VARIANTS["BN-x30"].lr_multiplier == 30
    assert variants.VARIANTS["BN-x5-Sigmoid"].activation == "sigmoid"
    config = training.Config(family="inception", learning_rate=0.01, steps=600)
    model = variants.build_variant("BN-x5", config, (8, 8, 1), 10)
    schedule = model.optimizer.learning_rate if not hasattr(model.optimizer, "_learning_rate") \
        else model.optimizer._learning_rate
    assert float(schedule(0)) == pytest.approx(0.05)
    assert float(schedule(100)) == pytest.approx(0.05 * 0.25, rel=1e-5)  # 6x faster: 600/6 steps


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_each_variant_trains_a_few_steps(digits_images, name):
    # Eager execution: two steps of a 70-conv graph run faster than its compilation.
    config = training.Config(family="inception", learning_rate=0.01, steps=2, eval_every=1,
                             statistics="moving", final_population=False, run_eagerly=True)
    model = variants.build_variant(name, config, digits_images.input_shape, 10, seed=0)
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    history = training.train_and_track(model, digits_images, config,
                                       reshuffle=variants.VARIANTS[name].reshuffle, verbose=0)
    assert history.steps == [0, 1, 2] and len(history.accuracy) == 3
    assert all(np.isfinite(history.loss[1:]))
    assert history.seconds[-1] > 0 and history.final_accuracy is not None
    changed = [not np.allclose(b, keras.ops.convert_to_numpy(w)) for b, w in
               zip(before, model.trainable_weights)]
    assert all(changed)


def test_population_statistics_evaluation_sets_moving_statistics(digits_images):
    config = training.Config(family="mlp", learning_rate=0.1, steps=3, eval_every=3, batch_size=32)
    data = dataclasses.replace(
        digits_images, x_train=digits_images.x_train.reshape(128, -1),
        x_test=digits_images.x_test.reshape(64, -1))
    model = variants.build_variant("BN-x5", config, data.input_shape, 10)
    training.train_and_track(model, data, config, verbose=0)
    bn = model.get_layer("hidden1_bn")
    dense = keras.Model(model.inputs[0], model.get_layer("hidden1_dense").output)
    values = keras.ops.convert_to_numpy(dense(data.x_train[:128]))
    batches = values.reshape(4, 32, -1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                               batches.mean(axis=1).mean(axis=0), rtol=1e-4, atol=1e-5)


def _fake_history(best, steps_to_best, diverged=False):
    history = History()
    for step in range(0, 101, 10):
        acc = best if step >= steps_to_best else best * step / max(1, steps_to_best) * 0.9
        history.steps.append(step)
        history.accuracy.append(acc)
        history.loss.append(1.0)
        history.seconds.append(step * 0.01)
    history.diverged = diverged
    return history


def _fake_training(monkeypatch):
    """Replace training by histories: the baseline's best accuracy rises with lr up to 0.09, then
    degrades; BN variants reach 0.95 fast. Returns what each variant was told, by variant name."""
    def fake_build(variant, config, input_shape, classes, seed=0):
        return (variant, config.learning_rate, seed)

    targets_seen = {}

    def fake_train(model, data, config, **kwargs):
        variant, lr, _ = model
        targets_seen[variant.name] = (kwargs.get("target"), kwargs.get("eval_every_after_target"))
        if variant.name == "Inception":
            best = {0.01: 0.80, 0.03: 0.85, 0.09: 0.90, 0.27: 0.60}.get(round(lr, 4), 0.5)
            return _fake_history(best, 80)
        return _fake_history(0.95, 10 if variant.lr_multiplier > 1 else 40)

    monkeypatch.setattr(variants, "build_variant", lambda v, *a, **k: fake_build(
        variants.VARIANTS[v] if isinstance(v, str) else v, *a, **k))
    monkeypatch.setattr(training, "train_and_track", fake_train)
    return targets_seen


def test_protocol_grid_extends_until_degrades_and_counts_steps(monkeypatch, digits_images):
    targets_seen = _fake_training(monkeypatch)
    config = training.Config(family="inception", learning_rate=0.01, steps=100, eval_every=10)
    result = protocol.steps_to_accuracy(digits_images, config, seeds=(0, 1), verbose=0,
                                        variants=("Inception", "BN-Baseline", "BN-x5"))
    grid = result["learning_rate_grid"]
    assert [round(r, 4) for r in grid["rates"]] == [0.01, 0.03, 0.09, 0.27]
    assert round(grid["chosen"], 4) == 0.09 and grid["chosen_inside_grid"]
    assert result["targets"] == {"0": 0.9, "1": 0.9}
    x5 = result["variants"]["BN-x5"]
    assert x5["learning_rate"] == pytest.approx(0.45)
    assert x5["steps_to_target"]["per_seed"] == [10, 10]
    assert result["variants"]["Inception"]["steps_to_target"]["median"] == 80
    assert x5["ratio"] == pytest.approx(8.0)
    assert result["variants"]["BN-Baseline"]["ratio"] == pytest.approx(2.0)
    # BN variants are told the target, and evaluated 5x less often once they reach it.
    assert targets_seen["BN-x5"] == (0.9, 50) and targets_seen["Inception"][0] is None
    # The baseline's best by 50/75/100% of its budget: reached at step 80 here.
    half, three_quarters, whole = result["baseline_plateau"]["0"]
    assert half < three_quarters < whole == 0.9


def test_protocol_records_the_steps_each_variant_trained(monkeypatch, digits_images):
    _fake_training(monkeypatch)
    config = training.Config(family="inception", learning_rate=0.01, steps=100, eval_every=10)
    result = protocol.steps_to_accuracy(digits_images, config, seeds=(0,), verbose=0,
                                        variants=("Inception", "BN-x5"), variant_steps=30)
    assert result["variant_steps"] == {"Inception": 100, "BN-x5": 30}


def test_evaluations_thin_out_after_the_target(digits_images):
    data = dataclasses.replace(
        digits_images, x_train=digits_images.x_train.reshape(128, -1),
        x_test=digits_images.x_test.reshape(64, -1))
    config = training.Config(family="mlp", learning_rate=0.1, steps=12, eval_every=2, batch_size=32,
                             statistics="moving", final_population=False)
    model = variants.build_variant("BN-x5", config, data.input_shape, 10)
    dense = training.train_and_track(model, data, config, verbose=0)
    assert dense.steps == [0, 2, 4, 6, 8, 10, 12]
    # A target of 0 is reached at step 0: from then on every 5 steps, and the budget still ends it.
    sparse = training.train_and_track(model, data, config, verbose=0, target=0.0,
                                      eval_every_after_target=5)
    assert sparse.steps == [0, 5, 10, 12]
    # An unreachable target keeps the dense schedule.
    never = training.train_and_track(model, data, config, verbose=0, target=1.1,
                                     eval_every_after_target=5)
    assert never.steps == dense.steps


def test_protocol_resumes_from_its_checkpoint(monkeypatch, digits_images, tmp_path):
    _fake_training(monkeypatch)
    config = training.Config(family="inception", learning_rate=0.01, steps=100, eval_every=10)
    path = str(tmp_path / "runs.json")
    kwargs = dict(seeds=(0, 1), verbose=0, variants=("Inception", "BN-x5"), checkpoint=path)
    first = protocol.steps_to_accuracy(digits_images, config, **kwargs)
    # 4 grid rates (seed 0), the baseline's seed 1, BN-x5's two seeds.
    assert len(json.loads(open(path).read())["runs"]) == 7

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(training, "train_and_track", no_training)
    assert protocol.steps_to_accuracy(digits_images, config, **kwargs) == first
    # Another configuration must not read these runs, nor can a run without models be returned.
    other = dataclasses.replace(config, steps=200)
    with pytest.raises(ValueError, match="another protocol"):
        protocol.steps_to_accuracy(digits_images, other, **kwargs)
    with pytest.raises(ValueError, match="exclude each other"):
        protocol.Runs(digits_images, config, checkpoint=path, keep_models=True)
    with pytest.raises(TypeError, match="checkpoint"):
        protocol.steps_to_accuracy_with_models(digits_images, config, **kwargs)


def test_protocol_with_models_returns_the_last_seed_at_the_chosen_rate(monkeypatch,
                                                                       digits_images):
    _fake_training(monkeypatch)
    config = training.Config(family="inception", learning_rate=0.01, steps=100, eval_every=10)
    kwargs = dict(seeds=(0, 1), verbose=0, variants=("Inception", "BN-x5"))
    result, models = protocol.steps_to_accuracy_with_models(digits_images, config, **kwargs)
    assert result == protocol.steps_to_accuracy(digits_images, config, **kwargs)
    chosen = result["learning_rate_grid"]["chosen"]
    assert round(chosen, 4) == 0.09
    # The fake models are (variant, the baseline's learning rate, seed).
    assert models == {"Inception": (variants.VARIANTS["Inception"], chosen, 1),
                      "BN-x5": (variants.VARIANTS["BN-x5"], chosen, 1)}
    with pytest.raises(ValueError, match="keep_models=True"):
        protocol.Runs(digits_images, config).model("BN-x5", 1, chosen)


def _history_reaching(best, step):
    history = History(steps=[0, step, 100], accuracy=[0.1, best, best], loss=[1.0] * 3,
                      seconds=[0.0, 1.0, 2.0])
    return history


def test_choose_learning_rate_prefers_the_fastest_within_tolerance():
    tried = {0.01: _history_reaching(0.900, 80), 0.03: _history_reaching(0.898, 40),
             0.09: _history_reaching(0.880, 10)}
    # 0.03 is within 0.005 of the top and reaches its best first; 0.09 is too far below.
    assert protocol.choose_learning_rate(tried, tolerance=0.005) == 0.03
    assert protocol.choose_learning_rate(tried, tolerance=0.0) == 0.01
    diverged = _history_reaching(0.99, 10)
    diverged.diverged = True
    assert protocol.grid_score(diverged) == -1.0
    assert protocol.choose_learning_rate({**tried, 0.27: diverged}, tolerance=0.005) == 0.03


def test_run_keys_name_what_sets_each_run_apart():
    # The checkpoint's keys: a file written by an earlier run must still be read back.
    assert protocol.Run("BN-x5", 1, 0.03, 500, target=0.9).key == \
        "BN-x5 seed=1 lr=0.03 steps=500 target=0.9"
    assert protocol.Run("Inception", 0, 0.01, 1000).key == \
        "Inception seed=0 lr=0.01 steps=1000 target=None"
