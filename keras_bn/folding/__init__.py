"""PLACEHOLDER (issue 3)."""


class FoldReport:
    pass


def fold_batchnorm(model, verify=True):
    raise NotImplementedError
