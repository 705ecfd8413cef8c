"""EoRA compensation (`lowrank compensate`): repair a compressed model with a training-free low-rank correction.

For each layer, the error dW = W_original - W_compressed is projected into the eigenspace of the ORIGINAL
model's input covariance (eigenvalues as importance), truncated to rank k and mapped back: with S S^T = X^T X,
SVD of dW S, B = U_k Sigma_k^1/2, A = Sigma_k^1/2 V_k^T S^-1. That is the whitened kernel of decompose.py
applied to dW, so B A is the rank-k correction that removes the most calibration output error.

The correction is written as a standard PEFT LoRA adapter (r = lora_alpha = k, scale 1) for the compressed
model, which may be a lowrank checkpoint or any dense checkpoint with the same module names (pruned,
dequantized, ...). For lowrank checkpoints `merge=True` folds it into the factors instead: up' = [up, B],
down' = [down; A], so each rank grows by k.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass

import torch

from ..compression.experts import unpack_like
from ..compression.sequential import WalkOptions, walk_blocks
from ..compression.targets import dense_weight, select_targets
from ..core import decompose
from ..environment import invocation
from ..errors import UsageError
from ..io.checkpoint import MODEL_TYPE_PREFIX, load_pretrained, write_checkpoint
from ..io.loading import load_model, read_config, resolve_model
from ..io.modeling_lowrank import LowRankLinear, SharedBasisLinear, SlicedLowRankLinear, linear_shape
from ..io.publish import check_output, publish, staging_dir
from ..io.shards import ShardWriter
from ..methods.whiten import whiten_weighting
from ..progress import SILENT, Progress
from ..report.compression import peak_rss_bytes, versions

SCHEMA = "lowrank.compensate"


@dataclass
class Correction:
    name: str
    out_features: int
    in_features: int
    rank: int
    up: torch.Tensor  # B (m x k), in the compressed model's dtype
    down: torch.Tensor  # A (k x n)
    error_before: float  # relative calibration output error of the compressed layer
    error_after: float  # ... after adding B A

    @property
    def rel_error(self):
        return self.error_after


def _load_compressed(spec, dtype, trust_remote_code):
    source = resolve_model(spec)
    config = read_config(source) or {}
    if str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX):
        from ..io.loading import torch_dtype

        return source, load_pretrained(source.path, dtype=torch_dtype(dtype)), True
    return source, load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)[0], False


def check_match(original, compressed, names, rank):
    """Every target exists in the compressed model with the same shape, and can hold a rank-`rank` correction."""
    for name in names:
        try:
            other = compressed.get_submodule(name)
        except AttributeError:
            raise UsageError(f"the compressed model has no module {name}: the two models do not match") from None
        a, b = linear_shape(original.get_submodule(name))[:2], linear_shape(other)[:2]
        if a != b:
            raise UsageError(f"{name} is {a[0]}x{a[1]} in the original and {b[0]}x{b[1]} in the compressed model")
        if rank > min(a):
            raise UsageError(f"--rank {rank} exceeds what {name} ({a[0]}x{a[1]}) allows: at most {min(a)}")


def _dense_on(module, device):
    """A compressed layer's (out x in) weight on `device`: a factorized layer's product up @ down is formed there,
    not on the CPU where the compressed model is held."""
    if isinstance(module, LowRankLinear):
        return module.up.weight.detach().to(device) @ module.down.weight.detach().to(device)
    return dense_weight(module).to(device)


@torch.no_grad()
def layer_correction(name, original_module, compressed_module, stats, rank, damp):
    w = dense_weight(original_module).to(torch.float64)  # on the walk's device, with the statistics
    wc = _dense_on(compressed_module, w.device).to(torch.float64)  # the compressed model stays on the CPU
    dtype = compressed_module.up.weight.dtype if isinstance(compressed_module, LowRankLinear) else \
        compressed_module.weight.dtype
    delta = w - wc
    m, n = delta.shape
    before, ref = decompose.output_error(w, wc, stats.gram)
    if not delta.any():
        return None
    factors = decompose.factorize(delta, whiten_weighting(stats, damp), rank)
    up, down = factors.up.to(dtype), factors.down.to(dtype)
    after, _ = decompose.output_error(w, wc + up.double() @ down.double(), stats.gram)
    scale = ref if ref > 0 else 1.0
    # kept on the CPU, beside the compressed model they are merged into or written with
    return Correction(name, m, n, rank, up.cpu(), down.cpu(), (before / scale) ** 0.5, (after / scale) ** 0.5)


def compute_corrections(original, compressed, input_ids, rank, targets=None, ignore=None, damp=1e-4, batch_size=8,
                        device="cpu", progress=SILENT):
    """{name: Correction} for every target layer where the two models differ, in block order."""
    unpack_like(original, compressed)  # MoE: the compressed model's experts are per-expert linears
    blocks_name, _, selected = select_targets(original, targets, ignore)
    check_match(original, compressed, [n for names in selected.values() for n in names], rank)
    corrections = {}

    def visit(index, block, names, collector):
        found = []
        for name, rel in names.items():
            correction = layer_correction(name, block.get_submodule(rel), compressed.get_submodule(name),
                                          collector.stats_of(name), rank, damp)
            if correction is not None:
                corrections[name] = correction
                found.append(correction)
        return found

    # The statistics are the ORIGINAL model's: every block sees the original block's outputs (no propagation).
    walk_blocks(original, input_ids, selected, blocks_name, visit,
                WalkOptions(batch_size=batch_size, device=device, propagate=False), progress=progress)
    return corrections


def adapter_config(corrections, compressed_model, base_spec, rank):
    from ..core.fisher import has_lm_head

    conv1d = any(type(compressed_model.get_submodule(n)).__name__ == "Conv1D" for n in corrections)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if has_lm_head(compressed_model) else None,
        "base_model_name_or_path": base_spec,
        "r": rank,
        "lora_alpha": rank,  # scale 1: the factors carry the correction as computed
        "target_modules": sorted(corrections),
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": conv1d,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_adapter(corrections, output, config, report):
    staging = staging_dir(output)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        writer = ShardWriter(staging, 1 << 62, prefix="adapter_model")
        for name, correction in corrections.items():
            writer.add(f"base_model.model.{name}.lora_A.weight", correction.down.contiguous())
            writer.add(f"base_model.model.{name}.lora_B.weight", correction.up.contiguous())
        writer.finish()
        report["size"] = {"bytes": os.path.getsize(os.path.join(staging, "adapter_model.safetensors"))}
        with open(os.path.join(staging, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        write_reports(staging, report)
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_mergeable(model, names):
    """--merge folds a correction B A into a layer's factors; a per-slice fused layer has no single pair."""
    for name in names:
        if isinstance(model.get_submodule(name), SlicedLowRankLinear):
            raise UsageError(f"{name} is a fused projection factorized per slice: --merge cannot fold a correction "
                             "into its factors yet; write the correction as an adapter (without --merge)")
        if isinstance(model.get_submodule(name), SharedBasisLinear):
            raise UsageError(f"{name} shares a basis with its layer's other experts (--experts shared-basis): "
                             "--merge cannot fold a correction into it; write the correction as an adapter")


@torch.no_grad()
def merge_corrections(model, corrections):
    """Fold B A into the compressed model: factorized layers grow rank by k, dense layers add B A to W."""
    check_mergeable(model, list(corrections))
    for name, correction in corrections.items():
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            module.up.weight = torch.nn.Parameter(torch.cat([module.up.weight, correction.up], dim=1))
            module.down.weight = torch.nn.Parameter(torch.cat([module.down.weight, correction.down], dim=0))
            module.rank = module.down.weight.shape[0]
            module.up.in_features = module.down.out_features = module.rank
        else:
            delta = (correction.up.double() @ correction.down.double())
            weight = module.weight
            weight.copy_((weight.double() + (delta.T if type(module).__name__ == "Conv1D" else delta)).to(weight.dtype))


def build_report(corrections, *, original, compressed, rank, merge, calibration, timings, command):
    layers = []
    for c in corrections.values():
        params = c.rank * (c.out_features + c.in_features)
        layers.append({
            "name": c.name, "shape": [c.out_features, c.in_features], "rank": c.rank, "params_before": 0,
            "params_after": params, "error_before": round(c.error_before, 6), "rel_error": round(c.error_after, 6),
            "energy_kept": round(1 - c.error_after**2, 6),
        })
    before = [c.error_before for c in corrections.values()]
    after = [c.error_after for c in corrections.values()]
    return {
        "schema": SCHEMA, "schema_version": 1, "kind": "compensate", "versions": versions(), "command": command,
        "original": original, "compressed": compressed, "rank": rank, "merged": merge,
        "method": "EoRA: eigenspace (whitened) projection of W_original - W_compressed, original-model statistics",
        "summary": {
            "layers": len(layers), "params_added": sum(layer["params_after"] for layer in layers),
            "mean_error_before": sum(before) / max(len(before), 1), "mean_error_after": sum(after) / max(len(after), 1),
            "max_error_before": max(before, default=0.0), "max_error_after": max(after, default=0.0),
            "rank_growth": rank if merge else 0,
        },
        "layers": {"list": layers},
        "calibration": calibration,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "evaluations": [],
    }


def compensation_markdown(report):
    """compensation_report.md: what was corrected and each layer's error before and after, worst first."""
    s = report["summary"]
    lines = ["# lowrank compensation report (EoRA)", "", f"`{report['command']}`", "", "| | |", "|---|---|",
             f"| original | {report['original']} |", f"| compressed | {report['compressed']} |",
             f"| rank | {report['rank']}" + (f" (merged: every factorized rank grew by {report['rank']})" if
                                              report["merged"] else " (PEFT LoRA adapter, scale 1)") + " |",
             f"| layers corrected | {s['layers']} (+{s['params_added']:,} parameters) |",
             f"| mean rel. output error | {s['mean_error_before']:.4f} -> {s['mean_error_after']:.4f} |",
             f"| max rel. output error | {s['max_error_before']:.4f} -> {s['max_error_after']:.4f} |", "",
             "| layer | shape | rank | error before | error after |", "|---|---|---|---|---|"]
    for layer in sorted(report["layers"]["list"], key=lambda x: -x["rel_error"]):
        lines.append(f"| {layer['name']} | {'x'.join(map(str, layer['shape']))} | {layer['rank']} | "
                     f"{layer['error_before']:.4f} | {layer['rel_error']:.4f} |")
    return "\n".join(lines) + "\n"


def write_reports(directory, report):
    with open(os.path.join(directory, "compensation_report.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(directory, "compensation_report.md"), "w") as f:
        f.write(compensation_markdown(report))


def write_merged(repaired, corrections, report, output, compressed_source, rank):
    """Fold the corrections into the factorized checkpoint and write it, with the compensation report beside the
    compression history it came with."""
    merge_corrections(repaired, corrections)
    block = dict(repaired.config.lowrank)
    block["ranks"] = {name: module.rank for name, module in repaired.named_modules()
                      if isinstance(module, LowRankLinear)}
    block["compensation"] = {"method": "eora", "rank": rank, "layers": len(corrections)}

    def extra_files(weight_bytes, files, seconds):
        report["size"] = {"bytes": weight_bytes, "files": files}
        text = {"compensation_report.json": json.dumps(report, indent=2) + "\n",
                "compensation_report.md": compensation_markdown(report)}
        for name in ("compression_report.json", "compression_report.md", "README.md"):
            path = os.path.join(compressed_source.path, name)
            if os.path.exists(path):  # the compression history stays with the checkpoint
                text[name] = open(path).read()
        return text

    write_checkpoint(repaired, output, source=compressed_source, tokenizer=None, block=block,
                     extra_files=extra_files, max_shard_bytes=5 * 10**9)


def _seeded_cuda_devices(device):
    """The CUDA devices whose RNG state is saved and restored around the seeded work: every one on a CUDA run
    (torch.manual_seed seeds them all), none on the CPU (so a CPU run never initializes CUDA)."""
    return list(range(torch.cuda.device_count())) if device.startswith("cuda") else []


def compensate(original: str, compressed: str, output: str, *, rank: int = 32, merge: bool = False,
               targets: list[str] | None = None, ignore: list[str] | None = None, calib: str = "auto",
               num_samples: int = 128, seq_len: int | None = None, batch_size: int = 8, seed: int = 0,
               device: str = "auto", dtype: str = "auto", damp: float = 1e-4, text_column: str = "text",
               calib_split: str = "train", overwrite: bool = False, trust_remote_code: bool = False,
               progress: Progress = SILENT, command: str | None = None) -> dict:
    """Write an EoRA repair for `compressed` (relative to `original`) to `output`: a PEFT adapter, or with
    merge=True a new lowrank checkpoint whose factors include the correction. Returns the report."""
    from ..device import resolve_device

    check_options(original, compressed, rank=rank, calib=calib, num_samples=num_samples, seq_len=seq_len,
                  batch_size=batch_size, damp=damp, dtype=dtype)
    device = resolve_device(device)
    original_source = resolve_model(original)
    check_output(output, original_source.local_dir, overwrite)
    compressed_source = resolve_model(compressed)
    check_output(output, compressed_source.local_dir, overwrite)
    # `seed` makes the calibration sample reproducible. It is set inside fork_rng, so the process-wide RNG is
    # restored on return: a library call leaves the caller's random state as it found it.
    with torch.random.fork_rng(devices=_seeded_cuda_devices(device)):
        torch.manual_seed(seed)
        return _repair(original_source, compressed_source, output, original=original, compressed=compressed,
                       rank=rank, merge=merge, targets=targets, ignore=ignore, calib=calib, num_samples=num_samples,
                       seq_len=seq_len, batch_size=batch_size, seed=seed, device=device, dtype=dtype, damp=damp,
                       text_column=text_column, calib_split=calib_split, trust_remote_code=trust_remote_code,
                       progress=progress, command=command)


def check_options(original, compressed, *, rank, calib, num_samples, seq_len, batch_size, damp, dtype):
    """Everything compensate can refuse before a model is loaded (a bad option must cost nothing), for the CLI and
    the Python API alike."""
    from ..calibration.text import check_source
    from ..compression.config import DTYPES
    from ..io.loading import check_different_models
    from ..validation import check_calibration, check_number

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"--rank must be at least 1 (a whole number), got {rank!r}")
    check_calibration(num_samples, seq_len, batch_size)
    check_number("--damp", damp, 0)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_source(calib)
    check_different_models(original, compressed)


def _repair(original_source, compressed_source, output, *, original, compressed, rank, merge, targets, ignore,
            calib, num_samples, seq_len, batch_size, seed, device, dtype, damp, text_column, calib_split,
            trust_remote_code, progress, command):
    """compensate's work once the arguments are checked: load, calibrate, correct, write."""
    from lowrank.calibration import load_calibration

    timings = {}
    start = time.perf_counter()
    progress.log(f"loading {original} and {compressed}")
    reference, tokenizer = load_model(original_source, dtype=dtype, trust_remote_code=trust_remote_code)
    _, repaired, ours = _load_compressed(compressed, dtype, trust_remote_code)
    if merge and not ours:
        raise UsageError("--merge needs a lowrank factorized checkpoint as COMPRESSED; for other models the "
                         "correction can only be written as a PEFT adapter")
    timings["load"] = time.perf_counter() - start
    _, _, selected = select_targets(reference, targets, ignore)
    names = [n for names in selected.values() for n in names]
    check_match(reference, repaired, names, rank)
    if merge:  # refused before the calibration and the corrections, not after them
        check_mergeable(repaired, names)

    start = time.perf_counter()
    calibration = load_calibration(calib, reference, tokenizer, num_samples, seq_len, seed=seed, split=calib_split,
                                   text_column=text_column, progress=progress, device=device,
                                   source=original_source.path, trust_remote_code=trust_remote_code)
    timings["calibration_data"] = time.perf_counter() - start

    start = time.perf_counter()
    corrections = compute_corrections(reference, repaired, calibration.input_ids, rank, targets, ignore, damp,
                                      batch_size, device, progress)
    timings["corrections"] = time.perf_counter() - start
    if not corrections:
        raise UsageError("the compressed model's target layers are identical to the original's: nothing to repair")
    command = command or invocation()
    report = build_report(corrections, original=original, compressed=compressed, rank=rank, merge=merge,
                          calibration=calibration.provenance, timings=timings, command=command)
    if merge:
        write_merged(repaired, corrections, report, output, compressed_source, rank)
    else:
        write_adapter(corrections, output, adapter_config(corrections, repaired, compressed, rank), report)
    return report
