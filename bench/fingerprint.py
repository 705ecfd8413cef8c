"""A fingerprint of what lowrank writes: sha256 of every output file of a fixed set of runs.

Used to prove that a change which should not change behaviour (a restructuring, a speed-up that claims to be
exact) writes the same bytes. Files that legitimately differ between two identical runs are normalized first:
JSON files lose their timings, creation times, command lines and library versions; markdown files lose the
lines that quote them; tokenizer files (written by the tokenizers library, not by lowrank) are left out.

    python bench/fingerprint.py tiny  [--out FILE]     tiny Llama: compress (every method, keep 0.8), squeeze
                                                       (PEFT, rsLoRA, DoRA, kohya), compensate (adapter, merged)
    python bench/fingerprint.py smollm2 [--out FILE]   SmolLM2-135M, every method at keep 0.8, 16 x 256 windows

tests/test_fingerprint.py holds the tiny-model hashes (tests/data/fingerprint-tiny.json) and fails when a run
writes other bytes; regenerate that file only for a change that is meant to change the outputs, and say so.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["whiten", "svd", "asvd", "corda", "fwsvd"]
VOLATILE_KEYS = {"timings_s", "created", "command", "versions", "transformers_version", "seconds", "peak_rss_bytes",
                 "offload_budget_bytes"}  # (a quarter of the machine's memory by default; never changes the bytes)
SKIPPED_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
VOLATILE_LINE = re.compile(r"(lowrank|transformers|torch) \d|`[^`]*(compress|squeeze|compensate|pytest)[^`]*`|"
                           r"\bseconds?\b|\d+(\.\d+)? ?s\b|created|time|memory", re.IGNORECASE)


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):  # a list of names (PEFT's target_modules) is a set: its order is hash-seeded
        return sorted(value) if value and all(isinstance(v, str) for v in value) else [_strip(v) for v in value]
    return value


def file_digest(path, work):
    """sha256 of a file after normalization: `work` (the runs' temporary directory) is replaced by a fixed name;
    a safetensors file is hashed as its sorted header plus each tensor's bytes, because safetensors' own `save`
    (used for the spectra file) orders its header differently from one process to the next."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = f.read()
    if name.endswith(".safetensors"):
        return _safetensors_digest(data)
    data = data.replace(work.encode(), b"<work>")
    if name.endswith(".json"):
        data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
    elif name.endswith(".md"):
        data = "\n".join(line for line in data.decode().splitlines() if not VOLATILE_LINE.search(line)).encode()
    return hashlib.sha256(data).hexdigest()


def _safetensors_digest(data):
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    digest = hashlib.sha256()
    for key in sorted(header):
        entry = header[key]
        digest.update(json.dumps([key, {k: v for k, v in entry.items() if k != "data_offsets"}],
                                 sort_keys=True).encode())
        if "data_offsets" in entry:
            begin, end = entry["data_offsets"]
            digest.update(body[begin:end])
    return digest.hexdigest()


def tree_fingerprint(directory, work):
    """{relative path: digest} of every file an output holds (tokenizer files excepted, see above)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name in SKIPPED_FILES:
                continue
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = file_digest(path, work)
    return dict(sorted(out.items()))


def tiny_cases(work):
    """Build the tiny inputs in `work` and return {case: callable(output)}."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import torch
    from conftest import build_model, english_text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import lowrank

    text = english_text()
    calib = os.path.join(work, "calib.txt")
    with open(calib, "w") as f:
        f.write(text)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<unk>", "<pad>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", mask_token="<mask>")
    model_dir = os.path.join(work, "llama")
    build_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    fast = dict(num_samples=8, seq_len=64, batch_size=4, calib=calib, command="fingerprint")

    cases = {}
    for method in METHODS:
        cases[f"compress-{method}"] = (
            lambda out, method=method: lowrank.compress(model_dir, out, ratio=0.8, method=method, **fast))

    peft = _peft_adapters(work, build_model)
    for variant, adapter in peft.items():
        cases[f"squeeze-{variant}"] = lambda out, adapter=adapter: lowrank.squeeze(adapter, out, rank=4,
                                                                                   command="fingerprint")
    kohya = os.path.join(work, "kohya.safetensors")
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file

    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 16, generator=g),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(20, 8, generator=g),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
               "lora_unet_mid_block_attentions_0_to_q.lora_down.weight": torch.randn(8, 32, generator=g),
               "lora_unet_mid_block_attentions_0_to_q.lora_up.weight": torch.randn(24, 8, generator=g),
               "lora_unet_mid_block_attentions_0_to_q.dora_scale": torch.randn(1, 32, generator=g)},
              kohya, metadata={"ss_network_dim": "8", "ss_network_alpha": "4"})

    def squeeze_kohya(out):  # a single-file adapter's output is a file: give it a directory of its own
        os.makedirs(out)
        return lowrank.squeeze(kohya, os.path.join(out, "squeezed.safetensors"), rank=4, command="fingerprint")

    cases["squeeze-kohya"] = squeeze_kohya

    compressed = os.path.join(work, "compressed")
    comp_args = dict(rank=8, calib=calib, num_samples=8, seq_len=64, batch_size=4, command="fingerprint")

    def compensate(out, merge):
        if not os.path.exists(compressed):
            lowrank.compress(model_dir, compressed, ratio=0.6, method="svd", **fast)
        return lowrank.compensate(model_dir, compressed, out, merge=merge, **comp_args)

    cases["compensate-adapter"] = lambda out: compensate(out, False)
    cases["compensate-merged"] = lambda out: compensate(out, True)
    return cases


def _peft_adapters(work, build_model):
    import torch
    from peft import LoraConfig, get_peft_model

    variants = {
        "peft": dict(r=8, lora_alpha=16, target_modules="all-linear"),
        "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
        "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    }
    paths = {}
    for variant, kwargs in variants.items():
        model = get_peft_model(build_model("llama"), LoraConfig(**kwargs))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(param.shape, generator=g) * 0.2
                    param.copy_(param * (1 + noise) if "magnitude" in name else noise)
        paths[variant] = os.path.join(work, f"adapter-{variant}")
        model.save_pretrained(paths[variant])
    return paths


def smollm2_cases(work):
    sys.path.insert(0, HERE)
    import common

    import lowrank

    common.prepare()
    args = dict(ratio=0.8, calib=common.CALIB_FILE, num_samples=16, seq_len=256, command="fingerprint")
    return {f"compress-{m}": (lambda out, m=m: lowrank.compress(common.MODEL_DIR, out, method=m, **args))
            for m in METHODS}


def fingerprint(kind, only=None):
    """Run every case of `kind` ("tiny" or "smollm2") in a temporary directory: {case: {file: digest}}."""
    import torch

    import lowrank

    torch.set_num_threads(2)  # the machine's cores: BLAS reductions (and so the last bits) depend on threads
    with tempfile.TemporaryDirectory() as work:
        work = os.path.realpath(work)
        cases = (tiny_cases if kind == "tiny" else smollm2_cases)(work)
        result = {}
        for case, run in cases.items():
            if only and case not in only:
                continue
            out = os.path.join(work, "out-" + case)
            run(out)
            result[case] = tree_fingerprint(out, work)
            print(f"{case}: {len(result[case])} files", file=sys.stderr)
    versions = {"torch": torch.__version__, "lowrank": lowrank.__version__}
    import transformers

    versions["transformers"] = transformers.__version__
    return {"kind": kind, "versions": versions, "cases": result}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["tiny", "smollm2"])
    parser.add_argument("--out", help="write the fingerprint JSON here (default: stdout)")
    parser.add_argument("--only", nargs="*", help="only these cases")
    args = parser.parse_args()
    result = fingerprint(args.kind, args.only)
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
