"""`keras-bn-export --check`: whether an int8 ONNX file is right on this machine.

Reads the target the file records (`export.targets.metadata`), checks the target's static rules
(`export.targets.check`), and runs onnxruntime's fused kernels and OpenVINO against the file's
exact meaning (`export.runtimes.check`) on random inputs: a check that needs no data and shows
a saturating kernel, which puts most values many steps away whatever the inputs.
"""

import dataclasses

import numpy as np

from export import runtimes, targets
from export.quantization import cpu_has_vnni
from keras_bn.verification import VerificationError

# The size given to the dimensions a file leaves unknown, and the random batch checked.
UNKNOWN_SIZE = 32
BATCH_SIZE = 16


@dataclasses.dataclass
class FileCheck:
    """What `check_file` found.

    Attributes:
        path: the file checked.
        target: the target its metadata names, or `None` (then the rules of `cpu` are checked).
        metadata: its `keras_bn.*` metadata.
        problems: what breaks the target's rules, one line each.
        runtimes: one `export.runtimes.RuntimeCheck` per runtime.
        failure: the runtime disagreement found, or `None`.
        cpu_has_vnni: whether this CPU has VNNI.
    """

    path: str
    target: str
    metadata: dict
    problems: list
    runtimes: list
    failure: str
    cpu_has_vnni: bool

    @property
    def passed(self):
        return not self.problems and self.failure is None

    def summary(self):
        cpu = {True: "with VNNI", False: "without VNNI", None: "VNNI unknown"}[self.cpu_has_vnni]
        said = (f"target '{self.target}' (keras-bn {self.metadata.get('version', '?')}): right "
                f"on {self.metadata.get('right_on', '?')}" if self.target else
                "no keras-bn target in its metadata: checked by the rules of target 'cpu'")
        lines = [f"{self.path}: {said}"]
        lines.append("rules: " + ("kept" if not self.problems else "; ".join(self.problems)))
        lines.extend(check.summary() for check in self.runtimes)
        if self.failure:
            lines.append(f"FAILED on this CPU ({cpu}): {self.failure}")
        else:
            lines.append(f"passed on this CPU ({cpu})" if not self.problems else "FAILED")
        return "\n".join(lines)


def check_file(path, openvino="auto", seed=0):
    """Checks the int8 ONNX file at `path` on this machine; returns a `FileCheck`.

    Raises:
        ValueError: the file is not ONNX, or names a target keras-bn does not know.
    """
    import onnx

    try:
        proto = onnx.load(path)
    except Exception as error:  # protobuf's DecodeError and friends
        raise ValueError(f"{path} is not an ONNX file ({type(error).__name__})") from error
    metadata = targets.read_metadata(proto)
    name = metadata.get("target")
    target = targets.get(name or targets.DEFAULT_TARGET)
    problems = targets.check(proto, target)
    feed = _random_feed(proto, np.random.default_rng(seed))
    outputs = [value.name for value in proto.graph.output]
    vnni = cpu_has_vnni()
    failure, checks = None, []
    try:
        checks = runtimes.check(proto.SerializeToString(), [feed], outputs, target,
                                cpu_has_vnni=vnni, openvino=openvino, every_runtime=True)
    except VerificationError as error:
        failure = str(error).replace("; nothing was written", "")
    return FileCheck(path, name, metadata, problems, checks, failure, vnni)


def _random_feed(proto, rng):
    """Uniform [0, 1) inputs (integers 0-9 for integer inputs) of each graph input's shape."""
    from onnx import helper

    initializers = {init.name for init in proto.graph.initializer}
    feed = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [BATCH_SIZE if axis == 0 else (dim.dim_value or UNKNOWN_SIZE)
                 for axis, dim in enumerate(tensor_type.shape.dim)]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        values = rng.random(shape) if dtype.kind == "f" else rng.integers(0, 10, shape)
        feed[value.name] = values.astype(dtype)
    return feed
