"""One process of the two-process data-parallel test (`test_multiprocess.py`), JAX backend.

    KERAS_BACKEND=jax python tests/jax_backend/multiprocess_worker.py COORDINATOR N PROCESS_ID OUT

joins JAX's multi-process runtime of N processes (CPU collectives over gloo), and under
`keras.distribution.DataParallel(auto_shard_dataset=False)` trains on its share of every global
batch, estimates population statistics from its share of every global population batch, and
trains on with `keras_bn.PopulationStatistics`; process 0 saves the model. The test runs the same
`run` in one process on the whole data and compares. Then (`different_shards`) each process
estimates on a shard of its own, of its own mean, scale and length, and trains with the callback
on it; the test compares with the global-batch statistics in NumPy. Last, it estimates on a shard
that holds a NaN, and on one of the wrong shape, in process 1. It writes what it ended with to
the `.npz` file OUT.
"""

import sys

import keras
import numpy as np

import keras_bn

EXAMPLES = 64
GLOBAL_BATCH = 32
EPOCHS = 2
POPULATION_BATCH = 16  # global: each of N processes estimates on batches of 16 / N
# Shards that differ (`different_shards`): each process's mean, scale and number of examples.
# In batches of 16, process 0 has 6 full batches and one of 4, process 1 has 5 full batches and
# one of 4: global batches 0-4 hold 16 + 16 examples, 5 holds 16 + 4, 6 holds process 0's 4.
SHARDS = ((3.0, 1.0, 100), (-3.0, 2.0, 84))
SHARD_BATCH = 16
SHARD_TRAINING_EXAMPLES = 64  # fit needs as many steps in every process
# The table: two shards of 256 examples centred at +3 and -3, standard deviation 1.
TABLE_SHARDS = ((3.0, 1.0, 256), (-3.0, 1.0, 256))
LAYERS = {"keras_bn": keras_bn.BatchNormalization, "keras": keras.layers.BatchNormalization}


def training_data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (EXAMPLES, 6, 6, 3)).astype("float32")
    # The second half of every global batch (process 1's share) has statistics of its own.
    halves = x.reshape(EXAMPLES // GLOBAL_BATCH, 2, GLOBAL_BATCH // 2, *x.shape[1:])
    halves[:, 1] = 3.0 * halves[:, 1] - 1.0
    y = rng.normal(0.0, 1.0, (EXAMPLES, 1)).astype("float32")
    x_val = rng.normal(1.0, 2.0, (GLOBAL_BATCH, 6, 6, 3)).astype("float32")
    y_val = rng.normal(0.0, 1.0, (GLOBAL_BATCH, 1)).astype("float32")
    return x, y, x_val, y_val


def build_model(layer):
    # Seeded initializers rather than keras.utils.set_random_seed, which would import TensorFlow
    # (seconds) in each process.
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, use_bias=False, name="conv",
                                kernel_initializer=keras.initializers.GlorotUniform(seed=1)),
            LAYERS[layer](momentum=0.5, name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, name="dense",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=2)),
        ],
        name="model",
    )


def process_share(array, process_id, num_processes, global_batch=GLOBAL_BATCH):
    """This process's slice of every global batch, in order: what it feeds `fit`."""
    local = global_batch // num_processes
    batches = array.reshape(-1, num_processes, local, *array.shape[1:])
    return batches[:, process_id].reshape(-1, *array.shape[1:])


def shard(process_id, shards=SHARDS, features=4):
    """Process `process_id`'s own training data: normal, of its own mean, scale and length."""
    mean, scale, examples = shards[process_id]
    rng = np.random.default_rng(10 + process_id)
    return rng.normal(mean, scale, (examples, features)).astype("float32")


def global_batches(shards, batch_size):
    """The global batches of a multi-process estimate: step k's holds the k-th batch of every
    shard that has one, in process order."""
    per_shard = [[x[i : i + batch_size] for i in range(0, len(x), batch_size)] for x in shards]
    return [np.concatenate([b[k] for b in per_shard if k < len(b)])
            for k in range(max(map(len, per_shard)))]


def dense_model(layer):
    """Dense -> BN -> ReLU -> Dense -> BN: the second BN sees what the first normalized."""
    def initializer(seed):
        return keras.initializers.GlorotUniform(seed=seed)

    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="dense_1", kernel_initializer=initializer(3)),
            LAYERS[layer](name="bn_1"),
            keras.layers.ReLU(),
            keras.layers.Dense(3, name="dense_2", kernel_initializer=initializer(4)),
            LAYERS[layer](name="bn_2"),
        ],
        name="dense_model",
    )


def different_shards(layer, process_id):
    """Estimates on this process's own shard (`shard`), then trains on its first examples with
    `keras_bn.PopulationStatistics` on the whole shard; the weights after each, by name."""
    x = shard(process_id)
    model = dense_model(layer)
    out = weights(model, f"shards/{layer}/initial")
    out[f"shards/{layer}/batches"] = np.array(
        keras_bn.estimate_population_statistics(model, x, batch_size=SHARD_BATCH, verbose=0))
    out.update(weights(model, f"shards/{layer}/estimate"))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    train = x[:SHARD_TRAINING_EXAMPLES]
    model.fit(train, np.tanh(train[:, :3]), batch_size=SHARD_BATCH, epochs=1, shuffle=False,
              verbose=0,
              callbacks=[keras_bn.PopulationStatistics(x, batch_size=SHARD_BATCH)])
    out.update(weights(model, f"shards/{layer}/callback"))
    return out


def table(process_id):
    """The issue's table: BN on the inputs themselves, shards centred at +3 and -3."""
    model = keras.Sequential([keras.Input((4,)), keras_bn.BatchNormalization(name="bn")],
                             name="table")
    keras_bn.estimate_population_statistics(model, shard(process_id, TABLE_SHARDS),
                                            batch_size=SHARD_BATCH, verbose=0)
    return weights(model, "table")


def weights(model, prefix):
    return {f"{prefix}/{v.path}": keras.ops.convert_to_numpy(v) for v in model.weights}


def run(layer, process_id=0, num_processes=1, global_batch=GLOBAL_BATCH, train_only=False,
        save_to=None):
    """Trains, estimates and trains on with the callback; returns every result by name. Process
    0 then saves the model to `save_to`, if given."""
    x, y, x_val, y_val = training_data()

    def share(array):
        return process_share(array, process_id, num_processes, global_batch)

    model = build_model(layer)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    batch_size = global_batch // num_processes
    model.fit(share(x), share(y), batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0)
    out = weights(model, f"trained/{layer}")
    if train_only:
        return out
    population = process_share(x, process_id, num_processes, POPULATION_BATCH)
    population_batch = POPULATION_BATCH // num_processes
    out[f"batches/{layer}"] = np.array(
        keras_bn.estimate_population_statistics(
            model, population, batch_size=population_batch, verbose=0
        )
    )
    out.update(weights(model, f"population/{layer}"))
    history = model.fit(
        share(x), share(y), batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
        validation_data=(share(x_val), share(y_val)),
        callbacks=[keras_bn.PopulationStatistics(population, batch_size=population_batch)],
    )
    out[f"val_loss/{layer}"] = np.array(history.history["val_loss"])
    out.update(weights(model, f"callback/{layer}"))
    if save_to and process_id == 0:
        save_outside_the_distribution(model, save_to)
    return out


def save_outside_the_distribution(model, path):
    """`model.save` from one process. Saving creates a variable (Keras's optimizer check), which
    under the multi-process distribution would wait for every process to create it too."""
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        model.save(path)
    finally:
        keras.distribution.set_distribution(distribution)


def failed_estimates(process_id):
    """The errors `estimate_population_statistics` raises in this process when process 1's shard
    holds a NaN (`nan`) or is of the wrong shape (`shape`), and whether every weight is as it
    was."""
    out = {}
    for failure in ("nan", "shape"):
        model = build_model("keras_bn")
        x = training_data()[0][:16].copy()
        if process_id == 1 and failure == "nan":
            x[9] = np.nan
        if process_id == 1 and failure == "shape":
            x = x[:, :, :5]
        before = [keras.ops.convert_to_numpy(v) for v in model.weights]
        try:
            keras_bn.estimate_population_statistics(model, x, batch_size=8, verbose=0)
            message = ""
        except ValueError as error:
            message = str(error)
        unchanged = all(np.array_equal(a, keras.ops.convert_to_numpy(v))
                        for a, v in zip(before, model.weights))
        out[f"failure/{failure}/message"] = np.array(message)
        out[f"failure/{failure}/unchanged"] = np.array(unchanged)
    return out


def main(coordinator, num_processes, process_id, output):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # keras.distribution.initialize(...) calls this too, and then agrees a random seed across
    # processes through keras.utils.set_random_seed, which imports TensorFlow (seconds); the
    # model's initializers are seeded instead.
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
    out = {"process_count": np.array(jax.process_count()),
           "device_count": np.array(jax.device_count())}
    for layer in LAYERS:
        out.update(run(layer, process_id, num_processes,
                       save_to=output.replace(".npz", f"_{layer}.keras")))
        out.update(different_shards(layer, process_id))
    out.update(table(process_id))
    out.update(failed_estimates(process_id))
    np.savez(output, **out)


if __name__ == "__main__":
    coordinator, num_processes, process_id, output = sys.argv[1:]
    main(coordinator, int(num_processes), int(process_id), output)
