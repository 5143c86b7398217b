"""The light install: keras-bn needs only Keras and NumPy; export is the `export` extra.

Each check runs in a fresh Python process that refuses to import what a light install lacks, so
what the test process itself has imported cannot hide a dependency.
"""

import configparser
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A meta-path finder placed first refuses the named top-level packages (and their submodules) as
# an uninstalled package would; `ATTEMPTS` records who asked for them.
BLOCKER = """
import sys

BLOCKED = {blocked!r}
ATTEMPTS = []


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""

LIBRARY_WITHOUT_TENSORFLOW = """
import json

import keras
import numpy as np

import keras_bn

rng = np.random.default_rng(0)
x = rng.normal(1.0, 2.0, (32, 5)).astype("float32")
y = rng.normal(size=(32, 2)).astype("float32")

inputs = keras.Input((5,))
hidden = keras.layers.Dense(4, name="dense")(inputs)
normalized = keras_bn.BatchNormalization(name="bn")(hidden)
model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(normalized))
bn = model.get_layer("bn")

# Algorithm 1: a training step moves gamma (a gradient) and the moving mean (the batch statistics).
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
loss = float(model.train_on_batch(x, y))
trained = bool(np.any(bn.gamma.numpy() != 1.0)) and bool(np.any(bn.moving_mean.numpy() != 0.0))

# Algorithm 2: population statistics over 4 batches of 8, against NumPy (unbiased variance).
keras_bn.estimate_population_statistics(model, x, batch_size=8, verbose=0)
kernel, bias = (np.asarray(w, "float64") for w in model.get_layer("dense").get_weights())
batches = (x.astype("float64") @ kernel + bias).reshape(4, 8, 4)
mean_error = float(np.max(np.abs(bn.moving_mean.numpy() - batches.mean(axis=1).mean(axis=0))))
variance_error = float(np.max(np.abs(
    bn.moving_variance.numpy() - batches.var(axis=1, ddof=1).mean(axis=0))))

# Inference: the normalization uses the population statistics.
gamma, beta, mean, variance = (np.asarray(w, "float64") for w in bn.get_weights())
expected = (batches.reshape(32, 4) - mean) / np.sqrt(variance + bn.epsilon) * gamma + beta
logits_kernel, logits_bias = model.get_layer("logits").get_weights()
expected = expected @ logits_kernel + logits_bias
predicted = model.predict(x, verbose=0)
inference_error = float(np.max(np.abs(predicted - expected)))

folded = keras_bn.fold_batchnorm(model)
fold_error = float(np.max(np.abs(folded.predict(x, verbose=0) - predicted)))

print(json.dumps({
    "backend": keras.backend.backend(),
    "loss": loss,
    "trained": trained,
    "mean_error": mean_error,
    "variance_error": variance_error,
    "inference_error": inference_error,
    "folded": [list(pair) for pair in folded.fold_report.folded],
    "fold_verified": folded.fold_report.max_error is not None,
    "fold_error": fold_error,
    "scale": float(np.max(np.abs(expected))),
    "tensorflow_imports_refused": ATTEMPTS,
    "tensorflow_loaded": any(m.split(".")[0] == "tensorflow" and sys.modules[m] is not None
                             for m in sys.modules),
}))
"""


def _run(blocked, body, backend="jax"):
    code = BLOCKER.replace("{blocked!r}", repr(set(blocked))) + textwrap.dedent(body)
    env = {**os.environ, "KERAS_BACKEND": backend}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _extras():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")

    def names(text):
        return {re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower()
                for line in text.splitlines() if line.strip()}

    extras = {name: names(value) for name, value in config["options.extras_require"].items()}
    return names(config["options"]["install_requires"]), extras


def test_install_requires_only_keras_and_numpy():
    required, extras = _extras()
    assert required == {"keras", "numpy"}
    assert extras["export"] == {"tensorflow", "tf2onnx", "onnx", "onnxruntime"}
    assert extras["export"] <= extras["dev"]
    assert extras["openvino"] == {"openvino"} and extras["openvino"] <= extras["dev"]
    assert {"pytest", "ruff", "mkdocs", "jax"} <= extras["dev"]
    assert "torch" in extras


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs JAX")
def test_library_runs_on_jax_without_tensorflow():
    """The layer (a training step and inference), population statistics and folding."""
    done = _run({"tensorflow"}, LIBRARY_WITHOUT_TENSORFLOW)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax" and not result["tensorflow_loaded"]
    assert result["trained"] and result["loss"] > 0
    assert result["mean_error"] < 1e-4 and result["variance_error"] < 1e-4
    assert result["inference_error"] < 1e-4 * max(1.0, result["scale"])
    assert result["folded"] == [["bn", "dense"]] and result["fold_verified"]
    assert result["fold_error"] < 1e-4 * max(1.0, result["scale"])


def test_import_without_a_backend_says_which_to_install():
    done = _run({"tensorflow"}, "import keras_bn\n", backend="tensorflow")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: keras-bn runs on Keras, whose backend is "
                           "missing (No module named 'tensorflow'). Install one: pip install "
                           "tensorflow"), last


@pytest.mark.parametrize("package", sorted(_extras()[1]["export"]))
def test_import_export_without_its_extra_names_the_extra(package):
    done = _run({package}, """
        import json

        try:
            import export
        except ImportError as error:
            print(json.dumps({"error": str(error), "keras": "keras" in sys.modules}))
    """)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # Run from the clone, as the README installs it: its own command, word for word.
    prefix = 'keras-bn\'s export needs its extra: pip install -e ".[export]" (missing: '
    assert result["error"].startswith(prefix) and result["error"].endswith(")")
    assert "\n" not in result["error"]
    assert package in result["error"][len(prefix):-1].split(", ")
    assert not result["keras"]  # found out without importing anything heavy


def test_import_export_with_its_extra_imports_no_keras():
    """The command line chooses the Keras backend after `import export.__main__`."""
    if any(importlib.util.find_spec(name) is None for name in _extras()[1]["export"]):
        pytest.skip("the export extra is not installed")
    done = _run(set(), """
        import export.__main__
        print(sorted({m.split(".")[0] for m in sys.modules} & {"keras", "tensorflow", "onnx"}))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_package_version_matches_the_installed_metadata():
    try:
        installed = importlib.metadata.version("keras-bn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("keras-bn is not installed (pip install -e .)")
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    # setup.cfg reads the version from keras_bn, so there is one place to change it.
    assert config["metadata"]["version"] == "attr: keras_bn.__version__"
    source = re.search(r'__version__ = "([^"]+)"', (ROOT / "keras_bn" / "__init__.py").read_text())
    assert installed == source.group(1)


# The Keras backends, as the README's install line names their packages.
BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax[cpu]": "jax", "jax": "jax", "torch": "torch"}
IMPORT_AS_INSTALLED = """
import json

import keras
import numpy as np

import keras_bn

model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras_bn.BatchNormalization()])
output = model.predict(np.ones((4, 3), "float32"), verbose=0)
print(json.dumps({"backend": keras.backend.backend(), "shape": list(output.shape)}))
"""


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_install_line_gives_a_working_import(page, tmp_path):
    """The page's first install line names a Keras backend besides `-e .`, and with only that
    backend present and no KERAS_BACKEND or keras.json to choose, `import keras_bn` works."""
    text = (ROOT / page).read_text()
    line = re.search(r"^pip install -e \. (\S+) +# ", text, re.MULTILINE)
    assert line, f"{page}: the first install line must name a Keras backend to install"
    package = line.group(1).strip('"')
    assert package in BACKEND_PACKAGES, f"{page}: {package} is not a Keras backend"
    backend = BACKEND_PACKAGES[package]
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed here")
    others = set(BACKEND_PACKAGES.values()) - {backend}
    code = BLOCKER.replace("{blocked!r}", repr(others)) + IMPORT_AS_INSTALLED
    env = {name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")  # no keras.json
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"backend": backend, "shape": [4, 2]}


def test_install_command_follows_the_installation(monkeypatch):
    """The extra's hint: from the clone (-e), from the folder pip installed from, or by name."""
    export = pytest.importorskip("export", reason="the export extra is not installed")
    monkeypatch.chdir(ROOT)
    assert export._install_command() == 'pip install -e ".[export]"'
    monkeypatch.chdir(ROOT / "docs")
    assert export._install_command() == f'pip install -e "{ROOT}[export]"'
    # Installed into site-packages: no setup.cfg beside the package.
    monkeypatch.setattr(export, "__file__", "/site-packages/export/__init__.py")

    class Distribution:
        def __init__(self, direct_url):
            self.direct_url = direct_url

        def read_text(self, name):
            assert name == "direct_url.json"
            return self.direct_url

    local = json.dumps({"url": "file:///home/me/keras-bn", "dir_info": {}})
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Distribution(local))
    assert export._install_command() == 'pip install "/home/me/keras-bn[export]"'
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Distribution(None))
    assert export._install_command() == 'pip install "keras-bn[export]"'


def _normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _resolve(requirements, tmp_path):
    """The distributions `pip install <requirements>` installs into an empty environment: pip's
    own resolver, a dry run against the package index (`--ignore-installed`: as if nothing were
    installed)."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", str(report), *requirements],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {_normalized(item["metadata"]["name"])
            for item in json.loads(report.read_text())["install"]}


def _top_level_modules(distribution):
    """The top-level import names an installed distribution provides."""
    text = distribution.read_text("top_level.txt")
    if text:
        return set(text.split())
    names = set()
    for file in distribution.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".egg-info", ".pth")):
            continue
        if len(file.parts) > 1 or first.endswith((".py", ".so", ".pyd")):
            names.add(first.split(".")[0])
    return names


def test_install_line_installs_what_import_needs(tmp_path):
    """README's first install line, resolved by pip as for an empty environment, and then
    `import keras_bn` with every other installed distribution's modules refused: what a fresh
    venv would hold after that line, without downloading a wheel."""
    line = re.search(r"^pip install (-e \. \S+) +# ", (ROOT / "README.md").read_text(),
                     re.MULTILINE).group(1)
    requirements = [str(ROOT) if word == "." else word.strip('"') for word in line.split()]
    resolved = _resolve(requirements, tmp_path)
    assert {"keras-bn", "keras", "numpy"} <= resolved
    installed = list(importlib.metadata.distributions())
    wanted = set().union(*(_top_level_modules(d) for d in installed
                           if _normalized(d.metadata["Name"]) in resolved))
    others = set().union(*(_top_level_modules(d) for d in installed
                           if _normalized(d.metadata["Name"]) not in resolved))
    blocked = others - wanted - set(sys.stdlib_module_names) - {"keras_bn", "export"}
    assert {"jax", "torch", "tf2onnx", "onnxruntime"} <= blocked  # the installed but not pulled
    code = BLOCKER.replace("{blocked!r}", repr(blocked)) + IMPORT_AS_INSTALLED
    env = {name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    backend = BACKEND_PACKAGES[requirements[-1]]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"backend": backend,
                                                               "shape": [4, 2]}
