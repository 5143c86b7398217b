"""Results on disk: JSON written atomically, accuracy plots, and the Figure 3 markdown table."""
import json
import math
import os
import tempfile

import numpy as np


def write_json(path, payload):
    """Write `payload` as JSON, complete or not at all (a temporary file renamed into place)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=_jsonable)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def merge_json(path, key, value):
    """Set `key` to `value` in the JSON object at `path` (created if missing), keeping the other
    keys: how benchmarks keep one file with a section per backend or part."""
    payload = {}
    if os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)
    payload[key] = value
    return write_json(path, payload)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_accuracy_curves(result, path, title=None):
    """Figure 2: test accuracy vs training steps of every variant (median over seeds, seed band)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in result["variants"].items():
        histories = list(entry["histories"].values())
        length = min(len(h["steps"]) for h in histories)
        steps = np.asarray(histories[0]["steps"][:length])
        acc = np.asarray([h["accuracy"][:length] for h in histories])
        line = ax.plot(steps, np.median(acc, axis=0), label=name)[0]
        if len(histories) > 1:
            ax.fill_between(steps, acc.min(axis=0), acc.max(axis=0), alpha=0.15,
                            color=line.get_color())
    target = float(np.median(list(result["targets"].values())))
    ax.axhline(target, color="gray", linestyle=":", linewidth=1,
               label=f"{result['baseline']} best ({target:.3f})")
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, target - 0.5), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"{result['family']} on {result['data']}: accuracy vs steps")
    save_figure(fig, path)
    plt.close(fig)
    return path


def _fmt_steps(value):
    return "never" if value is None else f"{value:,.0f}"


def _fmt_ratio(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}x"


def without_histories(result):
    """A `protocol.steps_to_accuracy` result without the per-evaluation histories (those stay in
    the full JSON): the summary that aggregate files keep."""
    out = {k: v for k, v in result.items() if k != "variants"}
    out["variants"] = {
        name: {k: v for k, v in entry.items() if k != "histories"}
        for name, entry in result["variants"].items()
    }
    return out


def steps_table(result):
    """Figure 3 as markdown: steps to the baseline's best accuracy, the ratio, and best accuracy."""
    target = float(np.median(list(result["targets"].values())))
    lines = [
        f"{result['family']} on {result['data']}, seeds {result['seeds']}, baseline lr "
        f"{result['learning_rate_grid']['chosen']:.4g} (grid "
        f"{', '.join(f'{r:.3g}' for r in result['learning_rate_grid']['rates'])})",
        "",
        f"| model | steps to {target:.1%} (median) | per seed | ratio (steps) | ratio (seconds) "
        "| max accuracy (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in result["variants"].items():
        per_seed = ", ".join(_fmt_steps(s) for s in entry["steps_to_target"]["per_seed"])
        lines.append(
            f"| {name} | {_fmt_steps(entry['steps_to_target']['median'])} | {per_seed} | "
            f"{_fmt_ratio(entry['ratio'])} | {_fmt_ratio(entry['wall_clock_ratio'])} | "
            f"{entry['best_accuracy']['median']:.1%} |"
        )
    plateau = result.get("baseline_plateau")
    if plateau:
        by = np.median(np.array(list(plateau.values()), dtype=float), axis=0)
        lines += ["", f"{result['baseline']}'s best accuracy by 50% / 75% / 100% of its "
                  f"{result['config']['steps']}-step budget (median of seeds): "
                  + " / ".join(f"{b:.1%}" for b in by)]
    return "\n".join(lines) + "\n"


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
