"""The compression report: `compression_report.json` is the source of truth; markdown and tables render it."""

import os
import platform
import resource
import sys

from .evaluations import evaluations_markdown
from .format import human_bytes

SCHEMA = "lowrank.compression"
SCHEMA_VERSION = 1
# Optional, beside the report: each factorized layer's full spectrum, for `lowrank report --plot`.
SPECTRA_FILE = "lowrank_spectra.safetensors"


def versions():
    """Versions that produced a result, read from the installed distributions (importing transformers only to ask
    its version would cost `lowrank squeeze` seconds)."""
    import torch

    from .. import __version__
    from ..environment import package_version

    return {"lowrank": __version__, "torch": torch.__version__, "transformers": package_version("transformers"),
            "python": platform.python_version()}


def peak_rss_bytes():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _fraction(after, before):
    return after / before if before else 1.0


def layer_entry(layer):
    entry = {
        "name": layer.name,
        "shape": [layer.out_features, layer.in_features],
        "rank": layer.rank,
        "dense": layer.rank is None,
        "params_before": layer.params_before,
        "params_after": layer.params_after,
        "energy_kept": round(layer.energy_kept, 6),
        "predicted_energy_kept": round(layer.predicted_energy_kept, 6),
        "rel_error": round(layer.rel_error, 6),
    }
    if layer.dense_reason:
        entry["dense_reason"] = layer.dense_reason
    if layer.info:
        entry["info"] = layer.info
    return entry


def build_report(*, result, settings, calibration, source, model_params_before, model_params_after,
                 bytes_dense, bytes_after, files, dtype, command, timings, run, input_bytes=None, verify=None,
                 coverage=None, fused=None):
    """The whole report, built once when the weights are written: `timings` in the order the phases ran, `run`
    how the run was carried out (streamed, offload budget, processes, where it resumed), `input_bytes` the size
    of a quantized input file (GGUF), `verify` the verdict on held-out text (verify.py) or why there is none,
    `coverage` how much of the model is targeted and what stays dense and why (coverage.py), `fused` the fused
    projections among the targets and their slices (fused.py)."""
    target_before = sum(layer.params_before for layer in result.layers)
    target_after = sum(layer.params_after for layer in result.layers)
    kept_t = _fraction(target_after, target_before)
    kept_m = _fraction(model_params_after, model_params_before)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "compress",
        "versions": versions(),
        "command": command,
        "model": {"source": source.spec, "kind": source.kind, "dtype": dtype, "blocks": result.blocks_name},
        "method": {"name": settings.method, "propagate": settings.propagate, "damp": settings.damp,
                   "alpha": settings.alpha if settings.method_spec.uses_alpha else None, "alloc": settings.alloc,
                   "anchor": settings.anchor, "refit": settings.refit, "refine_steps": settings.refine_steps,
                   **({"refine_target": settings.refine_target, "refine_batch": settings.refine_batch}
                      if settings.refine_steps else {}),
                   "error_definition": "||W x - W' x'|| / ||W x|| against the original model's stream"
                   if settings.anchor or settings.refit else "||(W - W') x|| / ||W x|| on the layer's inputs"},
        "ratio": {
            "requested": settings.ratio,
            "definition": "fraction of the targeted linear layers' parameters kept",
            "targets": {"params_before": target_before, "params_after": target_after,
                        "kept": round(kept_t, 6), "removed": round(1 - kept_t, 6)},
            "model": {"params_before": model_params_before, "params_after": model_params_after,
                      "kept": round(kept_m, 6), "removed": round(1 - kept_m, 6)},
        },
        **({"coverage": coverage.as_dict(), "coverage_warning": coverage.warning(settings.ratio)}
           if coverage is not None else {}),
        **({"fused": fused} if fused else {}),
        "size": {"bytes_dense": bytes_dense, "bytes_after": bytes_after, "files": files,
                 **({"bytes_input": input_bytes, "input_dequantized": True} if input_bytes else {})},
        "layers": {
            "factorized": sum(1 for layer in result.layers if layer.rank is not None),
            "dense": sum(1 for layer in result.layers if layer.rank is None),
            "list": [layer_entry(layer) for layer in result.layers],
        },
        "calibration": calibration,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "evaluations": [],
        **({"verify": verify} if verify is not None else {}),
        **run,
    }


def spectra_bytes(layers):
    """The spectra file's content: per factorized layer (keyed by name; a per-slice layer's slices by
    LAYER:SLICE) the singular values of the matrix its method decomposed (the weighted W), descending, float32.
    None when no layer carries a spectrum."""
    import torch
    from safetensors.torch import save

    tensors = {name: sigma.to(torch.float32).contiguous() for layer in layers for name, sigma in layer.spectra().items()}
    # One metadata key: safetensors keeps metadata in a hash map, so with two keys their order in the header (and
    # so the file's bytes) changed from one process to the next.
    return save(tensors, metadata={"format": "pt"}) if tensors else None


def read_spectra(directory):
    """{layer name: 1-D float32 tensor} from the spectra file in `directory`, or {} when there is none."""
    path = os.path.join(directory, SPECTRA_FILE)
    if not os.path.isfile(path):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def worst_layers(report, count=None):
    layers = [layer for layer in report["layers"]["list"] if not layer["dense"]]
    layers.sort(key=lambda layer: -layer["rel_error"])
    return layers if count is None else layers[:count]


def compression_rows(report):
    """(label, value) pairs of a compression report, shared by `lowrank compress`'s table, the report's markdown
    and `lowrank report`'s summary of a compress run."""
    ratio = report["ratio"]
    t, m = ratio["targets"], ratio["model"]
    return [
        ("method", report["method"]["name"] + ("" if report["method"]["propagate"] else " (no propagation)")),
        ("ratio (kept, targeted layers)", f"{ratio['requested']:g} requested"),
        ("targeted layers", f"{t['params_before']:,} -> {t['params_after']:,} params: "
                            f"kept {t['kept']:.1%}, removed {t['removed']:.1%}"),
        ("whole model", f"{m['params_before']:,} -> {m['params_after']:,} params: "
                        f"kept {m['kept']:.1%}, removed {m['removed']:.1%}"),
        *coverage_rows(report),
        ("size", size_row(report)),
        ("layers", f"{report['layers']['factorized']} factorized, {report['layers']['dense']} kept dense"),
        *fused_rows(report),
        *expert_rows(report),
        *speed_rows(report),
        ("calibration", compression_calibration(report["calibration"])),
        *verify_rows(report.get("verify")),
        ("time", ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())),
        ("peak memory (RSS)", human_bytes(report["peak_rss_bytes"])),
    ]


def speed_rows(report):
    """--speed-aware: the time of the targeted layers' products (at the rows timed) that its timings predict."""
    speed = report.get("speed")
    if not speed:
        return []
    t, profile = speed.get("targets_us") or speed["targets_batch1_us"], speed["profile"]  # (older reports)
    rows = speed.get("rows", 1)
    return [("expected speed", f"targeted layers' batch-{rows} products {t['dense'] / 1000:.2f} ms -> "
                               f"{t['factorized'] / 1000:.2f} ms per step ({t['speedup']:.2f}x), timed in "
                               f"{profile['dtype']} on {profile['device']} with {profile['threads']} threads")]


def coverage_rows(report):
    """What the ratio could act on: the targeted share of the model and what stays dense, by reason; the warning
    when parameters nobody chose to exclude stay dense in amounts that matter."""
    coverage = report.get("coverage")
    if not coverage:
        return []
    rows = [("targeted share", f"{coverage['targeted']['fraction']:.1%} of the model's parameters are in targeted "
                               "layers (the ratio applies to them only)")]
    dense = "; ".join(f"{part['fraction']:.1%} {part['why']}" for part in coverage["not_targeted"])
    if dense:
        rows.append(("stays dense", dense))
    if report.get("coverage_warning"):
        rows.append(("warning", report["coverage_warning"]))
    return rows


def fused_rows(report):
    """One row per fused layer (Phi-3 qkv_proj, GPT-NeoX query_key_value, ...): how it was factorized and which
    rows are which projection (compression/fused.py)."""
    return [("fused layer", f"{entry['layer']} ({entry['count']}x {'x'.join(map(str, entry['shape']))}, factorized "
                            f"{entry['factorized']}): {entry['description']}{_slice_ranks(entry)}")
            for entry in report.get("fused") or []]


def _slice_ranks(entry):
    """'; mean ranks q 138, k 120 (18 dense), v 134 (29 dense)' for a fused layer factorized per slice."""
    ranks = entry.get("ranks")
    if not ranks:
        return ""
    parts = [f"{name} " + ("dense" if value["mean"] is None else f"{value['mean']:.0f}")
             + (f" ({value['dense']} dense)" if value["dense"] and value["mean"] is not None else "")
             for name, value in ranks.items()]
    return "; mean ranks " + ", ".join(parts)


def _expert_layers(report):
    return [layer for layer in report["layers"]["list"] if "tokens" in layer.get("info", {})]


def expert_rows(report):
    """MoE: how many expert matrices, and how many the calibration barely reached (compression/experts.py)."""
    experts = _expert_layers(report)
    if not experts:
        return []
    pooled = [layer for layer in experts if layer["info"]["pooled_tokens"]]
    least = min(layer["info"]["tokens"] for layer in experts)
    rows = [("experts", f"{len(experts)} expert matrices, statistics from the tokens the router sent them (fewest "
                        f"{least:,}); {len(pooled)} had fewer tokens than their input width and borrowed pooled "
                        "statistics of their layer's experts for the rest")]
    passes = max(layer["info"].get("statistics_passes", 1) for layer in experts)
    if passes > 1:  # the statistics of a block's experts outgrew --offload-budget (compression/sequential.py)
        why = (f"over --offload-budget: collected in up to {passes} passes a block, groups of experts parked on "
               "disk (same bytes, one more forward per pass)")
        rows.append(("expert statistics", why))
    shared = [layer["info"]["shared"] for layer in experts if layer["info"].get("shared", {}).get("basis_counted_here")]
    if shared:  # --experts shared-basis: the bases are parameters too, and counted once
        rows.append(("shared bases", f"{len(shared)} (one per layer and expert tensor), "
                                     f"{sum(s['basis_params'] for s in shared):,} parameters counted once, in the "
                                     "first expert of each layer's entry"))
    return rows


def expert_tokens_markdown(report):
    """The experts that borrowed pooled statistics, with their token counts."""
    pooled = [layer for layer in _expert_layers(report) if layer["info"]["pooled_tokens"]]
    if not pooled:
        return []
    lines = ["", f"## Experts the calibration barely reached ({len(pooled)})", "",
             "Each got the average statistics of its layer's experts for the tokens it lacked (up to its input "
             "width), then the method's damping.", "", "| expert matrix | tokens routed | tokens' worth pooled |",
             "|---|---|---|"]
    lines += [f"| {layer['name']} | {layer['info']['tokens']:,} | {layer['info']['pooled_tokens']:,} |"
              for layer in sorted(pooled, key=lambda layer: (layer["info"]["tokens"], layer["name"]))]
    return lines


def size_row(report):
    """Sizes that mean something: against the quantized file the user started from too, when there was one."""
    size, dtype = report["size"], report["model"]["dtype"]
    row = f"{human_bytes(size['bytes_dense'])} dense -> {human_bytes(size['bytes_after'])} ({dtype})"
    if size.get("bytes_input"):
        row += (f"; the input file was {human_bytes(size['bytes_input'])} (quantized GGUF, dequantized to "
                f"{dtype} here)")
    return row


def verify_rows(verify):
    """The verdict rows: the compressed model against the original on held-out text (compression/verify.py)."""
    if verify is None:
        return []
    if "skipped" in verify:
        return [("verdict", f"not measured: {verify['skipped']}")]
    rows = [("held-out text", f"perplexity {verify['perplexity_original']:.2f} -> "
                              f"{verify['perplexity_compressed']:.2f} ({verify['perplexity_ratio']:.2f}x), top-1 "
                              f"agreement {verify['top1_agreement']:.1%}, KL {verify['kl_mean']:.3f} nats/token "
                              f"({verify['tokens_scored']:,} tokens)"),
            ("verdict", verify["verdict"] + (f" (--ratio {verify['suggested_ratio']:g} is likely acceptable)"
                                             if verify.get("suggested_ratio") else ""))]
    return rows


def compression_calibration(calibration):
    """The calibration row of a compression report: "source (N x L tokens, seed S)". Strict, as compress always
    records all three; summary.describe_calibration is the tolerant line for any report kind."""
    if calibration.get("kind") == "audio":  # calibration/audio.py: windows of speech, the decoder's own text
        return (f"{calibration['source']} (audio: {calibration['num_samples']} windows of "
                f"{calibration['window_seconds']:g} s, the decoder reading {calibration['seq_len']} tokens of its "
                f"own transcription of each, seed {calibration['seed']})")
    tokens = f"{calibration['num_samples']} x {calibration['seq_len']} tokens, seed {calibration['seed']}"
    return f"{calibration['source']} ({tokens})"


def compression_markdown(report, worst=20):
    """compression_report.md: the summary, the worst layers, the evaluations recorded so far, the versions."""
    lines = ["# lowrank compression report", "", f"`{report['command']}`", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in compression_rows(report)]
    lines += ["", f"Ratio: {report['ratio']['definition']}.", ""]
    layers = worst_layers(report)
    lines += [f"## Layers, worst first ({min(worst, len(layers))} of {len(layers)} factorized)", "",
              "| layer | shape | rank | params kept | energy kept | rel. output error |", "|---|---|---|---|---|---|"]
    for layer in layers[:worst]:
        shape = "x".join(map(str, layer["shape"]))
        kept = layer["params_after"] / layer["params_before"]
        lines.append(f"| {layer['name']} | {shape} | {layer['rank']} | {kept:.1%} | {layer['energy_kept']:.4f} "
                     f"| {layer['rel_error']:.4f} |")
    dense = [layer["name"] for layer in report["layers"]["list"] if layer["dense"]]
    if dense:
        lines += ["", f"Kept dense ({len(dense)}): " + ", ".join(dense[:20]) + (" ..." if len(dense) > 20 else "")]
    lines += expert_tokens_markdown(report)
    if report.get("evaluations"):
        lines += ["", *evaluations_markdown(report["evaluations"], heading="##")]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
