"""`lowrank.densify`: multiply a factorized checkpoint's factors back into a plain checkpoint of the original
architecture, for runtimes that cannot run custom code (vLLM's native kernels, llama.cpp's converters).

The output is what the original model would have saved: the original `model_type` and `architectures`, no
`auto_map`, no bundled code, each factorized `X` stored as `X.weight` = up @ down (transposed back for GPT-2's
Conv1D) and `X.bias`. It streams tensor by tensor (safe_open in, ShardWriter out), so memory stays at one layer
whatever the model's size. config.json carries a `lowrank_densified` block (provenance) that `lowrank report`
recognises; the compression report is copied unchanged, the history of what was removed.

The product is formed in float32 and cast to the checkpoint's dtype. It is the same function as the factorized
model up to rounding (the factorized forward computes up(down(x)) instead), but it is dense again: the size and
speed gains are gone, the quality loss of the compression stays.
"""

import json
import os
import shutil

from .. import __version__
from ..errors import LowrankError, UsageError
from ..io.checkpoint import MODELING_FILE, WEIGHT_SUFFIXES, read_lowrank_config
from ..io.publish import check_output, staged
from ..io.shards import INDEX_NAME, SINGLE_NAME, ShardWriter, check_checkpoint_files
from ..progress import SILENT, Progress, ticker
from ..report.compression import SPECTRA_FILE
from ..report.format import human_bytes
from ..report.summary import DENSIFY_MARKER
from ..units import parse_size

FORMAT_VERSION = 1
# Not copied: what densify writes itself, the custom code, and the spectra file (vLLM loads every *.safetensors
# of a directory without an index, and would trip over it).
NOT_COPIED = {"config.json", MODELING_FILE, "README.md", SPECTRA_FILE}


def _weight_map(directory):
    """{tensor name: shard file} of the checkpoint's weights (from the index, or the single model.safetensors)."""
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    if not os.path.exists(os.path.join(directory, SINGLE_NAME)):
        raise LowrankError(f"{directory} has neither {SINGLE_NAME} nor {INDEX_NAME}; the checkpoint is incomplete")
    with _open_shard(os.path.join(directory, SINGLE_NAME)) as f:
        return {name: SINGLE_NAME for name in f.keys()}


def _open_shard(path):
    """safe_open, with a shard its reader refuses (offsets that do not tile the data, an unknown dtype) reported
    as one line naming the shard."""
    from safetensors import safe_open

    return _safetensors_call(path, safe_open, path, "pt")


def _safetensors_call(path, function, *args):
    try:
        return function(*args)
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # safetensors' own type, not importable by a stable name
            raise
        from ..io.loading import safetensors_error

        raise safetensors_error(path, error) from None


def _meta_model(config, block):
    """The original architecture built on the meta device (no memory): what the layers were before."""
    import torch
    import transformers

    architecture = getattr(transformers, block["base_architectures"][0], None)
    if architecture is None:
        raise LowrankError(f"this transformers has no class {block['base_architectures'][0]}; upgrade transformers")
    base_config = {k: v for k, v in config.items() if k not in ("lowrank", "auto_map", "architectures")}
    base_config["model_type"] = block["base_model_type"]
    with torch.device("meta"):
        return architecture(architecture.config_class.from_dict(base_config))


def _shared_keys(checkpoint, shared, weight_map):
    """({own factor key: (expert layer, basis key, side)}, {basis keys}) of the shared-basis experts
    (lowrank["shared"]), every tensor checked to be there."""
    own, bases = {}, set()
    for module, tensors in shared.items():
        for tensor, spec in tensors.items():
            basis = f"{module}.{tensor}_basis.weight"
            part = "up" if spec["side"] == "in" else "down"
            found = {key for key in weight_map if key.startswith(f"{module}.{tensor}.") and key.endswith(f".{part}.weight")}
            if basis not in weight_map or not found:
                raise LowrankError(f"{checkpoint} lists {module}.{tensor} as shared-basis experts but lacks its tensors")
            bases.add(basis)
            own.update({key: (key[: -len(f".{part}.weight")], basis, spec["side"]) for key in found})
    return own, bases


def _write_weights(weight_map, tensor, writer, factor_keys, sliced_keys, sliced, conv, tick, shared_keys=({}, ())):
    """Every tensor of the checkpoint to `writer`, factorized layers multiplied out; returns the parameters
    written. Sorted by name: the same input always gives the same bytes."""
    import torch

    params, (own, bases) = 0, shared_keys
    for key in sorted(weight_map):
        layer = factor_keys.get(key)
        if key in bases:  # multiplied into each expert's matrix below
            continue
        if key in own:  # a shared-basis expert: W_e = up_e @ basis (side in) or basis @ down_e (side out)
            name, basis_key, side = own[key]
            mine, basis = tensor(key).to(torch.float32), tensor(basis_key).to(torch.float32)
            weight = (mine @ basis if side == "in" else basis @ mine).to(tensor(key).dtype)
            writer.add(f"{name}.weight", weight)
            params += weight.numel()
            tick()
        elif key in sliced_keys:  # a per-slice layer: written whole when its down (sorted first) comes
            if key.endswith(".down.weight"):
                name = sliced_keys[key]
                for suffix, value in _sliced_dense(name, sliced[name], tensor, name in conv, sliced_keys).items():
                    writer.add(f"{name}.{suffix}", value)
                    params += value.numel()
                tick()
        elif layer is None:
            value = tensor(key)
            writer.add(key, value)
            params += value.numel()
        elif key.endswith("down.weight"):
            down, up = tensor(key), tensor(f"{layer}.up.weight")
            weight = (up.to(torch.float32) @ down.to(torch.float32)).to(down.dtype)
            if layer in conv:
                weight = weight.T.contiguous()
            writer.add(f"{layer}.weight", weight)
            params += weight.numel()
            tick()
        elif key.endswith("up.bias"):
            value = tensor(key)
            writer.add(f"{layer}.bias", value)
            params += value.numel()
    return params


def _factor_keys(checkpoint, ranks, sliced, weight_map):
    """({tensor name: layer} of the whole factorized layers, the same of the per-slice ones), every tensor the
    config promises checked to be there."""
    for name in ranks:
        for part in ("down.weight", "up.weight"):
            if f"{name}.{part}" not in weight_map:
                raise LowrankError(f"{checkpoint} lists {name} as factorized but has no tensor {name}.{part}")
    factor_keys = {f"{name}.{part}": name for name in ranks for part in ("down.weight", "up.weight", "up.bias")}
    sliced_keys = {key: name for name in sliced for key in _sliced_keys(name, sliced[name], weight_map, checkpoint)}
    return factor_keys, sliced_keys


def _sliced_keys(name, spec, weight_map, checkpoint):
    """The tensor names of per-slice layer `name` (lowrank.sliced entry `spec`), each checked to be present."""
    keys = [f"{name}.down.weight"]
    for part, rank in zip(spec["slices"], spec["ranks"]):
        if rank is not None:
            keys.append(f"{name}.up.{part}.weight")
        if f"{name}.up.{part}.bias" in weight_map:
            keys.append(f"{name}.up.{part}.bias")
    for key in keys:
        if key not in weight_map:
            raise LowrankError(f"{checkpoint} lists {name} as factorized per slice but has no tensor {key}")
    return keys


def _sliced_dense(name, spec, tensor, conv1d, keys):
    """{"weight": ..., "bias": ...} of a per-slice layer: each slice's up @ down rows (a dense slice's rows as
    stored) in float32, cast to the checkpoint's dtype, in the fused layer's row order."""
    import torch

    from ..io.modeling_lowrank import interleave

    down = tensor(f"{name}.down.weight")
    widths = [spec["groups"] * size if rank is None else rank for size, rank in zip(spec["sizes"], spec["ranks"])]
    weights, biases = [], []
    for part, rank, rows in zip(spec["slices"], spec["ranks"], down.split(widths)):
        weights.append(rows if rank is None else
                       (tensor(f"{name}.up.{part}.weight").to(torch.float32) @ rows.to(torch.float32)).to(down.dtype))
        if f"{name}.up.{part}.bias" in keys:
            biases.append(tensor(f"{name}.up.{part}.bias"))
    weight = interleave(weights, spec["groups"], dim=0)
    out = {"weight": weight.T.contiguous() if conv1d else weight.contiguous()}
    if biases:
        out["bias"] = interleave(biases, spec["groups"])
    return out


def _conv1d_layers(model, block):
    """Names of the factorized layers that were GPT-2 style Conv1D (weight stored in x out)."""
    from ..io.modeling_lowrank import resolve_module_name

    conv = set()
    for name in [*block["ranks"], *(block.get("sliced") or {})]:
        target = resolve_module_name(model, name)
        if target is not None and type(model.get_submodule(target)).__name__ == "Conv1D":
            conv.add(name)
    return conv


def dense_config(config, marker):
    """The original model's config.json: base model_type and architectures, no auto_map, the densify marker."""
    block = config["lowrank"]
    dense = {k: v for k, v in config.items() if k not in ("lowrank", "auto_map")}
    dense["model_type"] = block["base_model_type"]
    dense["architectures"] = list(block["base_architectures"])
    dense[DENSIFY_MARKER] = marker
    return dense


def densify(checkpoint: str, output: str, *, max_shard_size: str | int = "5GB", overwrite: bool = False,
            progress: Progress = SILENT) -> dict:
    """Write the dense equivalent of the factorized `checkpoint` to `output`. Returns a summary dict."""
    max_shard_bytes = parse_size(max_shard_size)
    if max_shard_bytes < 1:
        raise UsageError(f"--max-shard-size must be at least one byte, got {max_shard_size!r}")
    if not os.path.exists(checkpoint):
        raise UsageError(f"{checkpoint}: no such file or directory")
    config = read_lowrank_config(checkpoint)
    block = config["lowrank"]
    check_output(output, checkpoint, overwrite)
    check_checkpoint_files(checkpoint)
    weight_map = _weight_map(checkpoint)
    ranks, sliced = block.get("ranks") or {}, block.get("sliced") or {}
    factor_keys, sliced_keys = _factor_keys(checkpoint, ranks, sliced, weight_map)
    shared_keys = _shared_keys(checkpoint, block.get("shared") or {}, weight_map)
    from ..compression.experts import ExpertStacker  # torch and transformers: imported when used

    meta = _meta_model(config, block)
    conv = _conv1d_layers(meta, block)
    layers = len(ranks) + len(sliced) + len(shared_keys[0])

    handles = {}  # the input's shards, opened as needed; closed at the end even on a failure
    try:
        with staged(output) as staging:
            def tensor(key):
                shard = weight_map[key]
                path = os.path.join(checkpoint, shard)
                if shard not in handles:
                    handles[shard] = _open_shard(path)
                return _safetensors_call(path, handles[shard].get_tensor, key)

            writer = ExpertStacker(ShardWriter(staging, max_shard_bytes), meta, block.get("experts", []))
            tick = ticker(progress, "layers", max(layers, 1), lambda done: f"{done}/{layers} layers multiplied")
            params = _write_weights(weight_map, tensor, writer, factor_keys, sliced_keys, sliced, conv, tick,
                                    shared_keys)
            files = writer.finish()
            weight_bytes = sum(os.path.getsize(os.path.join(staging, name)) for name in files)
            marker = {"format_version": FORMAT_VERSION, "tool_version": __version__,
                      "source": os.path.abspath(checkpoint), "base_model": block.get("base_model"),
                      "method": block.get("method"), "ratio": block.get("ratio"),
                      "ratio_definition": block.get("ratio_definition"), "densified_layers": layers,
                      "ranks": ranks, **({"sliced": sliced} if sliced else {}),
                      "architectures": list(block["base_architectures"]), "params": params, "bytes": weight_bytes}
            for name in sorted(os.listdir(checkpoint)):
                path = os.path.join(checkpoint, name)
                if os.path.isfile(path) and name not in NOT_COPIED and not name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(path, os.path.join(staging, name))
            with open(os.path.join(staging, "config.json"), "w") as f:
                json.dump(dense_config(config, marker), f, indent=2, sort_keys=True)
                f.write("\n")
            with open(os.path.join(staging, "README.md"), "w") as f:
                f.write(model_card(output, marker))
    finally:
        handles.clear()
    return {"source": checkpoint, "output": output, "densified_layers": layers, "params": params,
            "bytes": weight_bytes, "files": files, "architectures": marker["architectures"]}


def model_card(output, marker):
    name = os.path.basename(os.path.abspath(output))
    return f"""# {name}

A plain `{marker['architectures'][0]}` checkpoint made by `lowrank densify` (lowrank {marker['tool_version']}) from
the factorized checkpoint `{marker['source']}` (method `{marker['method']}`, ratio {marker['ratio']}:
{marker['ratio_definition']}; base model `{marker['base_model']}`).

Each of the {marker['densified_layers']} factorized layers is stored again as one dense weight, the product of its
two factors, so any runtime that loads the original architecture loads this, with no custom code:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{name}")
```

It computes the same function as the factorized model up to rounding: the compression's quality loss stays, its
size and speed gains do not ({marker['params']:,} parameters, {human_bytes(marker['bytes'])}). `config.json`
records where it came from under `lowrank_densified`; `compression_report.json` is the compression's report.
"""
