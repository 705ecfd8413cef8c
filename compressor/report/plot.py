"""`lowrank report --plot FILE.png`: per-layer ranks and energy kept, and the singular-value spectra.

Top: the rank of each listed layer (bars, in the report's layer order) and its energy kept (line; one per run
when two runs are compared). Bottom: each layer's spectrum sigma_i / sigma_1 on a log scale, with a dot where its
rank cuts it, when the run's directory has the optional spectra file (lowrank_spectra.safetensors, written by
compress). matplotlib is optional (`pip install 'lowrank[plot]'`) and imported only here.
"""

import importlib.util
import os

from ..errors import UsageError
from ..io.publish import replacing


def check_available():
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'lowrank[plot]' (or pip install matplotlib)")


def _short(name):
    parts = name.split(".")
    numbers = [p for p in parts if p.isdigit()]
    return (numbers[-1] + "." if numbers else "") + parts[-1]


def plot(runs, path, spectra):
    """Write the PNG for `runs` (one or two) to `path`. `spectra`: {layer name: 1-D tensor} of the last run."""
    check_available()
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI backend is ever started
    import matplotlib.pyplot as plt

    run = runs[-1]
    order = run["report"]["layers"]["list"]  # the model's layer order, not worst-first
    panels = 2 if spectra else 1
    figure, axes = plt.subplots(panels, 1, figsize=(11, 3.6 * panels), squeeze=False)
    ax = axes[0][0]
    x = list(range(len(order)))
    ranks = [layer["rank"] or 0 for layer in order]
    ax.bar(x, ranks, color="#9db4d6", label=f"rank ({os.path.basename(os.path.normpath(run['path']))})")
    ax.set_ylabel("rank")
    ax.set_xlabel("layer (model order)")
    if len(order) <= 40:
        ax.set_xticks(x, [_short(layer["name"]) for layer in order], rotation=90, fontsize=7)
    energy_axis = ax.twinx()
    for index, each in enumerate(runs):
        by_name = {layer["name"]: layer["energy_kept"] for layer in each["report"]["layers"]["list"]}
        energy_axis.plot(x, [by_name.get(layer["name"], float("nan")) for layer in order], marker=".",
                         color=("#c0392b", "#27ae60")[index % 2] if len(runs) > 1 else "#c0392b",
                         label=f"energy kept ({'AB'[index] + ': ' if len(runs) > 1 else ''}"
                               f"{os.path.basename(os.path.normpath(each['path']))})")
    energy_axis.set_ylabel("energy kept")
    energy_axis.set_ylim(min(0.9, min((layer["energy_kept"] for layer in order), default=1)) - 0.02, 1.01)
    handles = ax.get_legend_handles_labels()[0] + energy_axis.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax.set_title(f"lowrank {run['kind']}: per-layer rank and energy kept")
    if spectra:
        ax = axes[1][0]
        ranks_by_name = {}  # in layer order (the colours); a per-slice layer's spectra are its slices', LAYER:SLICE
        for layer in order:
            ranks_by_name[layer["name"]] = layer["rank"]
            for part in (layer.get("info") or {}).get("slices") or []:
                ranks_by_name[f"{layer['name']}:{part['name']}"] = part["rank"]
        colors = plt.get_cmap("viridis")
        names = [name for name in ranks_by_name if name in spectra]
        for index, name in enumerate(names):
            sigma = spectra[name].double()
            if sigma.numel() == 0 or float(sigma[0]) <= 0:
                continue
            values = (sigma / sigma[0]).clamp_min(1e-12).tolist()
            color = colors(index / max(len(names) - 1, 1))
            ax.plot(range(1, len(values) + 1), values, linewidth=0.7, alpha=0.6, color=color)
            rank = ranks_by_name.get(name)
            if rank and rank <= len(values):
                ax.plot([rank], [values[rank - 1]], marker="o", markersize=2.5, color=color)
        ax.set_yscale("log")
        ax.set_xlabel("index i")
        ax.set_ylabel("sigma_i / sigma_1")
        ax.set_title(f"singular-value spectra of the decomposed (weighted) matrices, {len(names)} layers "
                     "(dot: kept rank; colour: layer order)")
    figure.tight_layout()
    try:
        with replacing(path) as temporary:  # its name ends in .lowrank-partial: the format is given
            figure.savefig(temporary, format="png", dpi=100, metadata={"Software": None})
    finally:
        plt.close(figure)
