"""Peak memory of `export.to_onnx`, phase by phase, with and without collecting tf2onnx's dropped
graph copies (`export.conversion._collected_between_optimizers`, the anchor being without).

Each run is a process of its own (`keras.applications` model, weights=None, 32x32, 10 classes): a
thread samples the resident memory every 20 ms, and every log line of `to_onnx` closes a phase
(freezing, converting with tf2onnx, verifying, writing). Writes
benchmarks/results/conversion_memory.{json,md}.

    python -m benchmarks.conversion_memory                  # VGG19, VGG16 (about 3 minutes)
    python -m benchmarks.conversion_memory --models ResNet50
"""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import machine

DEFAULT_MODELS = ("VGG19", "VGG16")


def _resident_gib():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_one(name, collect, folder):
    """One export in this process: `{"phases": [[message, seconds, peak GiB]], ...}`."""
    import logging

    import keras

    import export
    from export import conversion

    if not collect:
        conversion._collected_between_optimizers = contextlib.nullcontext
    peak, phases, start = [0.0], [], time.perf_counter()

    def sample():
        while True:
            peak[0] = max(peak[0], _resident_gib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    class Phases(logging.Handler):
        def emit(self, record):
            phases.append([record.getMessage()[:80], round(time.perf_counter() - start, 1),
                           round(max(peak[0], _resident_gib()), 2)])
            peak[0] = 0.0

    logger = logging.getLogger("export")
    logger.setLevel(logging.INFO)
    logger.addHandler(Phases())
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    weights = sum(w.nbytes for w in model.get_weights())
    built = _resident_gib()
    export.to_onnx(model, os.path.join(folder, f"{name}.onnx"), openvino=False)
    return {"model": name, "collect": collect, "weights_mib": round(weights / 2**20, 1),
            "after_building_gib": round(built, 2), "phases": phases,
            "peak_gib": max(p[2] for p in phases),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(__file__),
                                                             "results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--no-collect", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run_one(args.one, not args.no_collect, folder)))
        return 0

    runs = []
    for name in args.models:
        for collect in (False, True, False, True):  # A B A B
            command = [sys.executable, "-m", "benchmarks.conversion_memory", "--one", name]
            process = subprocess.run(command + ([] if collect else ["--no-collect"]),
                                     capture_output=True, text=True)
            if process.returncode != 0:
                runs.append({"model": name, "collect": collect,
                             "error": f"exit status {process.returncode}"})
            else:
                runs.append(json.loads(process.stdout.strip().splitlines()[-1]))
            print(name, "collected" if collect else "anchor", runs[-1].get("peak_gib"),
                  runs[-1].get("seconds"), flush=True)
    lines = ["Peak resident memory of `export.to_onnx` (float, verified) per model: tf2onnx's "
             "dropped graph copies left to Python's collector (anchor) or collected before each "
             "of its optimizers, A B A B, each run a process of its own. "
             f"`python -m benchmarks.conversion_memory --models {' '.join(args.models)}` on "
             f"{machine.cpu_facts()['model_name']}.", "",
             "| model | weights (MiB) | anchor peak (GiB) | collected peak (GiB) | ratio | "
             "anchor s | collected s |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for name in args.models:
        mine = [r for r in runs if r["model"] == name and "peak_gib" in r]
        anchor = sorted(r["peak_gib"] for r in mine if not r["collect"])
        collected = sorted(r["peak_gib"] for r in mine if r["collect"])
        if not anchor or not collected:
            continue
        a, c = anchor[len(anchor) // 2], collected[len(collected) // 2]
        seconds = {k: sorted(r["seconds"] for r in mine if r["collect"] == k) for k in (0, 1)}
        summary[name] = {"anchor_peak_gib": a, "collected_peak_gib": c, "ratio": round(c / a, 3),
                         "anchor_seconds": seconds[0][len(seconds[0]) // 2],
                         "collected_seconds": seconds[1][len(seconds[1]) // 2]}
        lines.append(f"| {name} | {mine[0]['weights_mib']} | {a} | {c} | {c / a:.2f} | "
                     f"{summary[name]['anchor_seconds']} | {summary[name]['collected_seconds']} |")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "conversion_memory.json"), "w") as file:
        json.dump({"cpu": machine.cpu_facts(), "load_average": os.getloadavg(),
                   "summary": summary, "runs": runs}, file, indent=1)
    with open(os.path.join(args.output_dir, "conversion_memory.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
