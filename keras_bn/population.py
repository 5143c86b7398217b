"""PLACEHOLDER (issue 2)."""


def estimate_population_statistics(model, data, steps=None, batch_size=32, verbose="auto"):
    raise NotImplementedError
