"""The architecture matrix: tiny random models of many transformers model types, and the checks each one gets.

Shared by tests/test_architectures.py (which asserts the checks) and bench/architectures.py (which times them and
writes the README's "Supported architectures" table). Every model is built from its config alone (no hub), seeded,
2 layers, hidden 32-64, with the tests' 320-token vocabulary, and saved as an ordinary checkpoint directory.
"""

import torch

VOCAB = 320
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128)
DECODER = dict(SMALL, hidden_size=64, intermediate_size=96, bos_token_id=0, eos_token_id=1, pad_token_id=3)
ENCODER = dict(SMALL, hidden_size=64, intermediate_size=96, pad_token_id=3)

# model type -> (config options, Auto class name, generative). Each entry names a layout trap it covers.
TYPES = {
    "llama": (dict(DECODER, num_key_value_heads=2, tie_word_embeddings=True), "AutoModelForCausalLM", True),
    "mistral": (dict(DECODER, num_key_value_heads=2, sliding_window=16), "AutoModelForCausalLM", True),
    "qwen2": (dict(DECODER, num_key_value_heads=2), "AutoModelForCausalLM", True),  # q/k/v biases
    "qwen3": (dict(DECODER, num_key_value_heads=2, head_dim=16), "AutoModelForCausalLM", True),  # q/k norms
    "gemma": (dict(DECODER, num_key_value_heads=1, head_dim=16), "AutoModelForCausalLM", True),
    "gemma2": (dict(DECODER, num_key_value_heads=2, head_dim=16, sliding_window=16,  # soft-capping, mixed windows
                    layer_types=["sliding_attention", "full_attention"]), "AutoModelForCausalLM", True),
    "gemma3_text": (dict(DECODER, num_key_value_heads=2, head_dim=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"]), "AutoModelForCausalLM", True),
    "phi": (dict(DECODER, partial_rotary_factor=0.5), "AutoModelForCausalLM", True),  # dense + biases
    "phi3": (dict(DECODER, num_key_value_heads=2, pad_token_id=3), "AutoModelForCausalLM", True),  # fused qkv
    "gpt2": (dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                  eos_token_id=1), "AutoModelForCausalLM", True),  # Conv1D
    "gpt_neox": (dict(DECODER, rotary_pct=0.5), "AutoModelForCausalLM", True),  # fused query_key_value
    "gptj": (dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                  eos_token_id=1), "AutoModelForCausalLM", True),
    "falcon": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                    bos_token_id=0, eos_token_id=1, new_decoder_architecture=False, multi_query=True),
               "AutoModelForCausalLM", True),
    "bloom": (dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1),
              "AutoModelForCausalLM", True),  # alibi, fused qkv
    "opt": (dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                 max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=1,
                 pad_token_id=3), "AutoModelForCausalLM", True),
    "olmo2": (dict(DECODER, num_key_value_heads=2), "AutoModelForCausalLM", True),  # q/k norms over all heads
    "granite": (dict(DECODER, num_key_value_heads=2, embedding_multiplier=2.0, logits_scaling=4.0,
                     residual_multiplier=0.5, attention_multiplier=0.2), "AutoModelForCausalLM", True),
    "starcoder2": (dict(DECODER, num_key_value_heads=2, sliding_window=None), "AutoModelForCausalLM", True),
    "stablelm": (dict(DECODER, num_key_value_heads=2, partial_rotary_factor=0.25), "AutoModelForCausalLM", True),
    "smollm3": (dict(DECODER, num_key_value_heads=2, no_rope_layer_interval=2), "AutoModelForCausalLM", True),
    "cohere": (dict(DECODER, num_key_value_heads=2, use_qk_norm=True), "AutoModelForCausalLM", True),
    "bert": (dict(ENCODER), "AutoModelForMaskedLM", False),
    "roberta": (dict(ENCODER, max_position_embeddings=130, bos_token_id=0, eos_token_id=1),
                "AutoModelForMaskedLM", False),
    "deberta-v2": (dict(ENCODER, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]),
                   "AutoModelForMaskedLM", False),
    "modernbert": (dict(ENCODER, global_attn_every_n_layers=2, local_attention=16, bos_token_id=0,
                        eos_token_id=1, cls_token_id=0, sep_token_id=1), "AutoModelForMaskedLM", False),
    # encoder-decoders: both stacks, the decoder's cross-attention calibrated with the encoder's real output
    "t5": (dict(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0,
                pad_token_id=3, eos_token_id=1), "AutoModelForSeq2SeqLM", True),  # relative position bias
    "bart": (dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=VOCAB, max_position_embeddings=128,
                  bos_token_id=0, eos_token_id=1, pad_token_id=3, decoder_start_token_id=1),
             "AutoModelForSeq2SeqLM", True),
    # speech: the encoder reads log-mel features of audio (calibrated on speech_calibration's clips), 100 frames
    # (1 s with SPEECH_FEATURES); the decoder reads the model's own transcription
    "whisper": (dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=VOCAB,
                     num_mel_bins=16, max_source_positions=50, max_target_positions=64, pad_token_id=3,
                     bos_token_id=0, eos_token_id=1, decoder_start_token_id=0),
                "AutoModelForSpeechSeq2Seq", True),
}
# the tiny Whisper's feature extractor: 16 mel bins, 1 s windows at 16 kHz (100 frames of 10 ms)
SPEECH_FEATURES = dict(feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)


VISION = dict(hidden_size=64, intermediate_size=96, image_size=32, patch_size=8, num_hidden_layers=2,
              num_attention_heads=4)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
# Model types refused with one line (several stacks of blocks, or no token-id input), and what the line says.
REFUSED = {
    "clip": (dict(text_config=dict(TEXT), vision_config=dict(VISION), projection_dim=32), "AutoModel",
             "2 stacks of blocks"),
    "siglip": (dict(text_config=dict(TEXT), vision_config=dict(VISION)), "AutoModel", "2 stacks of blocks"),
    "vit": (dict(VISION), "AutoModelForImageClassification", "reads pixel_values"),
}

# Vision-language models: the language model's stack (the third entry) is compressed by default, text-only
# calibration; tests/test_multimodal.py.
VLM = {
    "llava": (dict(text_config=dict(TEXT, model_type="llama"), vision_config=dict(VISION, model_type="clip_vision_model"),
                   image_token_index=300), "AutoModelForImageTextToText", "model.language_model.layers"),
    "qwen2_vl": (dict(text_config=dict(TEXT, num_key_value_heads=2, rope_scaling={"type": "mrope",
                                                                                  "mrope_section": [2, 2, 4]}),
                      vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4,
                                         spatial_merge_size=2, temporal_patch_size=2),
                      image_token_id=300, video_token_id=301, vision_start_token_id=302),
                 "AutoModelForImageTextToText", "model.language_model.layers"),
    "gemma3": (dict(text_config=dict(TEXT, num_key_value_heads=2, head_dim=16), vision_config=dict(VISION),
                    mm_tokens_per_image=4, image_token_index=300), "AutoModelForImageTextToText",
               "model.language_model.layers"),
    "idefics3": (dict(text_config=dict(TEXT, model_type="llama"), vision_config=dict(VISION), image_token_id=300,
                      scale_factor=2), "AutoModelForImageTextToText", "model.text_model.layers"),
}

def build(model_type, seed=0):
    """The tiny random model of `model_type`, in eval mode, with a spread spectrum (so that low rank means
    something): each linear weight's singular values are made to decay over 1.5 decades."""
    import transformers

    options, auto, _ = {**REFUSED, **VLM}.get(model_type) or TYPES[model_type]
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **options)
    model = getattr(transformers, auto).from_config(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                weight = module.weight
                if weight.dim() != 2 or min(weight.shape) < 2:
                    continue
                decay = torch.logspace(0, -1.5, min(weight.shape))
                u, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
                weight.copy_((u * decay * weight.norm() / decay.norm()) @ vh)
    return model.eval()


def full_ranks(model):
    """{layer name: min(out, in)} for every default target: the explicit full ranks of check (a)."""
    from lowrank.compression.targets import select_targets
    from lowrank.io.modeling_lowrank import linear_shape

    _, _, selected = select_targets(model)
    ranks = {}
    for names in selected.values():
        for name in names:
            out_features, in_features, _ = linear_shape(model.get_submodule(name))
            ranks[name] = min(out_features, in_features)
    return ranks


def probe_ids(seed=1, batch=2, length=12):
    """A fixed batch of token ids (avoiding the special ids 0-4) that every check feeds the models."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB, (batch, length), generator=generator)


def probe_inputs(model_type):
    """What every check feeds a model of `model_type`: probe_ids, or for a speech model a dict of its inputs
    (random log-mel features, probe_ids as the decoder's tokens)."""
    ids = probe_ids()
    if not speech(model_type):
        return ids
    features = torch.randn((ids.shape[0], SPEECH_FEATURES["feature_size"], 100), generator=torch.Generator().manual_seed(1))
    return {"input_features": features, "decoder_input_ids": ids}


def speech(model_type):
    return TYPES.get(model_type, (None, None))[1] == "AutoModelForSpeechSeq2Seq"


def speech_calibration(directory, clips=4, seconds=3.3, rate=8000):
    """A folder of seeded speech-like .wav clips (16-bit, 8 kHz: the calibration resamples them to 16 kHz): a
    voice whose pitch glides around 120 Hz with seven harmonics, syllable-rate loudness, and a little noise."""
    import os
    import wave

    import numpy as np

    os.makedirs(directory, exist_ok=True)
    generator = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    for k in range(clips):
        pitch = 120 + 60 * np.sin(2 * np.pi * 0.7 * t + k)
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        voice = sum(np.sin(h * phase) / h for h in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        x = voice + 0.05 * generator.standard_normal(len(t))
        with wave.open(os.path.join(directory, f"clip{k}.wav"), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes((x / np.abs(x).max() * 0.8 * 32767).astype(np.int16).tobytes())
    return directory


def decoder_inputs(model, ids):
    """For an encoder-decoder, the decoder's teacher-forced input for `ids` (the model's own right shift); {}
    for any other model."""
    if not model.config.is_encoder_decoder:
        return {}
    return {"decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=ids)}


def model_kwargs(model, ids):
    """Forward arguments for `ids`: token ids (with an encoder-decoder's decoder input), a speech model's dict of
    inputs as it is, or calibration windows of audio (calibration.audio.AudioWindows)."""
    if isinstance(ids, dict):
        return ids
    if hasattr(ids, "inputs"):
        return ids.inputs(model.dtype)
    return {"input_ids": ids, **decoder_inputs(model, ids)}


def logits(model, ids):
    with torch.no_grad():
        return model(**model_kwargs(model, ids)).logits.float()


def greedy(model, ids, use_cache, steps=6):
    """Greedy continuation of `ids`, with or without the KV cache: (new tokens, the logits of every step). A tiny
    random model often repeats one token, so the step logits are compared too, not the tokens alone."""
    inputs = {"input_features": ids["input_features"]} if isinstance(ids, dict) else \
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             use_cache=use_cache, pad_token_id=3, return_dict_in_generate=True, output_logits=True)
    prompt = 0 if model.config.is_encoder_decoder else ids.shape[1]  # a decoder starts from its start token
    return out.sequences[:, prompt:], torch.stack(out.logits).float()


# What the fresh, lowrank-free process runs: load each checkpoint with its own Auto class and remote code, save its
# logits on the probe ids. argv: a JSON list of [checkpoint dir, Auto class name, probe ids file, output file].
FOREIGN_LOADER = r"""
import json, sys
try:
    import lowrank  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("lowrank is importable in the foreign process; the check would prove nothing")
import torch, transformers
for path, auto, ids_file, out_file in json.loads(sys.argv[1]):
    model = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.load(ids_file)
    if isinstance(ids, dict):  # a speech model's inputs
        inputs = ids
    else:
        inputs = {"input_ids": ids}
        if model.config.is_encoder_decoder:
            inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=ids)
    with torch.no_grad():
        torch.save(model(**inputs).logits.float(), out_file)
    print(path, type(model).__name__, flush=True)
"""


def isolated_python(code, *args):
    """Run `code` in a fresh interpreter where lowrank cannot be imported: `-I -S` (no user site, no PYTHONPATH,
    no site module, so no .pth file runs and lowrank's editable-install finder is never installed), with this
    process's resolved sys.path minus every entry that holds a `lowrank` package, from a directory outside the
    source tree. Returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    import tempfile

    path = [entry for entry in sys.path if entry and os.path.isdir(entry)
            and not os.path.exists(os.path.join(entry, "lowrank"))]
    code = f"import sys\nsys.path[:] = {path!r}\n" + code
    return subprocess.run([sys.executable, "-I", "-S", "-c", code, *args], capture_output=True, text=True,
                          cwd=tempfile.mkdtemp(prefix="no-lowrank-"), timeout=900, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny models: see test_architectures


def run_foreign(jobs):
    """FOREIGN_LOADER on `jobs` in an isolated_python."""
    import json

    return isolated_python(FOREIGN_LOADER, json.dumps(jobs))


COMPRESS = dict(calib=None, num_samples=8, seq_len=32, batch_size=4, alloc="uniform", verify=False, seed=0)


def max_error(a, b):
    return float((a - b).abs().max())


def save_source(model_type, directory, tokenizer):
    """Build the tiny model of `model_type` and save it, with the tokenizer (and a speech model's feature
    extractor), as a checkpoint directory."""
    model = build(model_type)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if speech(model_type):
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor(**SPEECH_FEATURES).save_pretrained(directory)
    return model


def compress_full_rank(source_dir, model, output, calib_file):
    """Check (a)'s compression: every default target factorized at its full rank min(out, in)."""
    import lowrank

    return lowrank.compress(source_dir, output, **dict(COMPRESS, calib=calib_file), ratio=1.0,
                            ranks=full_ranks(model))


def compress_keep(source_dir, output, calib_file, ratio=0.8):
    import lowrank

    return lowrank.compress(source_dir, output, **dict(COMPRESS, calib=calib_file), ratio=ratio)


def calibration_ids(seed=2, samples=8, length=32, model_type=None):
    """Calibration-shaped token ids, longer than the sliding windows of TYPES (16) so that masks matter; for a
    speech model, audio windows (random features, those ids as the decoder's tokens)."""
    ids = torch.randint(5, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))
    if not speech(model_type):
        return ids
    from lowrank.calibration.audio import AudioWindows

    features = torch.randn((samples, SPEECH_FEATURES["feature_size"], 100), generator=torch.Generator().manual_seed(seed))
    return AudioWindows(features, ids)


def statistics_error(model, ids, batch_size=4):
    """Check (f): the Gram matrix the block walker collects for every default target, against the one taken by
    hooks during plain forward passes of the same batches. The walker replays each block's captured arguments
    (mask, rotary tables); a block given another block's (a sliding-window mask for a full-attention layer)
    gets other inputs and shows here. Returns the largest relative Frobenius error."""
    from lowrank.compression.sequential import WalkOptions, walk_blocks
    from lowrank.compression.targets import select_targets

    blocks_name, _, targets = select_targets(model)
    walked, reference, handles = {}, {}, []

    def visit(index, block, names, collector):
        for name in names:
            walked[name] = collector.stats_of(name).gram.clone()
        return []

    walk_blocks(model, ids, targets, blocks_name, visit, WalkOptions(batch_size=batch_size))

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            reference[name] = reference.get(name, 0) + x.T @ x
        return accumulate

    for name in walked:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(**model_kwargs(model, batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return max(float((walked[name] - reference[name]).norm() / reference[name].norm()) for name in walked)


def lora_changes_output(model, ids):
    """Check (d): a PEFT LoRA on the factorized layers attaches to them (wrapping LowRankLinear) and, with a
    non-zero B, changes the output. Returns (number of factorized layers adapted, max logit change)."""
    from peft import LoraConfig, get_peft_model

    from lowrank.io.modeling_lowrank import LowRankLinear

    before = logits(model, ids)
    names = sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                    if isinstance(module, LowRankLinear)})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    adapted = [module for module in peft_model.modules()
               if hasattr(module, "base_layer") and isinstance(module.base_layer, LowRankLinear)]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    after = logits(peft_model, ids)
    peft_model.unload()
    return len(adapted), max_error(before, after)


def densify_roundtrip(checkpoint, output, auto, ids, compressed_logits):
    """Check (e): densify, then every factorized layer's dense weight equals up @ down and the dense model's
    logits equal the factorized model's. Returns (max weight error, max logit error)."""
    import json
    import os

    import transformers
    from safetensors import safe_open

    import lowrank

    lowrank.densify(checkpoint, output)
    with open(os.path.join(checkpoint, "config.json")) as f:
        ranks = json.load(f)["lowrank"]["ranks"]
    factors, dense = {}, {}
    for directory, store in ((checkpoint, factors), (output, dense)):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(directory, name), "pt") as f:
                    for key in f.keys():
                        store[key] = f.get_tensor(key)
    model = getattr(transformers, auto).from_pretrained(output).eval()
    weight_error = 0.0
    for name in ranks:
        product = factors[f"{name}.up.weight"].double() @ factors[f"{name}.down.weight"].double()
        weight = dense[f"{name}.weight"].double()
        if type(model.get_submodule(name)).__name__ == "Conv1D":  # stored (in, out)
            weight = weight.T
        weight_error = max(weight_error, float((weight - product).abs().max()))
    return weight_error, max_error(logits(model, ids), compressed_logits)


def run_type(model_type, workdir, tokenizer, calib_file):
    """Every in-process check of one model type (a, c, d, e and the keep-0.8 output of b). Returns a dict of
    measurements; `foreign_job` is what check (b)'s fresh process must load. Raises on the first failure."""
    import os
    import time

    import lowrank

    _, auto, generative = TYPES[model_type]
    ids = probe_inputs(model_type)
    torch.save(ids, os.path.join(workdir, "ids.pt"))
    source = os.path.join(workdir, "source")
    dense = save_source(model_type, source, tokenizer)
    if speech(model_type):
        calib_file = speech_calibration(os.path.join(workdir, "speech"))
    row = {"type": model_type, "auto": auto, "class": type(dense).__name__}

    begin = time.perf_counter()
    report = compress_full_rank(source, dense, os.path.join(workdir, "full"), calib_file)
    row["full_rank_seconds"] = time.perf_counter() - begin
    row["targets"] = report["layers"]["factorized"]
    full = lowrank.load_pretrained(os.path.join(workdir, "full")).eval()
    row["full_rank_error"] = max_error(logits(full, ids), logits(dense, ids))
    row["logit_scale"] = float(logits(dense, ids).abs().max())
    row["statistics_error"] = statistics_error(dense, calibration_ids(model_type=model_type))

    begin = time.perf_counter()
    keep = os.path.join(workdir, "keep")
    report = compress_keep(source, keep, calib_file)
    row["compress_seconds"] = time.perf_counter() - begin
    row["factorized"], row["peak_rss_bytes"] = report["layers"]["factorized"], report["peak_rss_bytes"]
    begin = time.perf_counter()
    model = lowrank.load_pretrained(keep).eval()
    row["load_seconds"] = time.perf_counter() - begin
    keep_logits = logits(model, ids)
    torch.save(keep_logits, os.path.join(workdir, "keep-logits.pt"))
    row["keep_change"] = max_error(keep_logits, logits(dense, ids))
    if generative:
        cached, cached_logits = greedy(model, ids, True)
        uncached, uncached_logits = greedy(model, ids, False)
        row["cache_tokens"], row["no_cache_tokens"] = cached.tolist(), uncached.tolist()
        row["cache_logit_error"] = max_error(cached_logits, uncached_logits)
    row["lora_layers"], row["lora_change"] = lora_changes_output(model, ids)
    row["densify_weight_error"], row["densify_logit_error"] = densify_roundtrip(
        keep, os.path.join(workdir, "dense"), auto, ids, keep_logits)
    row["foreign_job"] = [keep, auto, os.path.join(workdir, "ids.pt"), os.path.join(workdir, "foreign-logits.pt")]
    return row


def checks(row):
    """Pass or fail of each check for one type's `row` (run_type's, after run_foreign has written the foreign
    logits): the one statement of the criteria, asserted by the test and tabled by the bench. None: not
    applicable (the KV cache of an encoder)."""
    import os

    tolerance = 1e-5 * max(1.0, row["logit_scale"])
    foreign_file = row["foreign_job"][3]
    foreign = None
    if os.path.exists(foreign_file):
        keep = torch.load(os.path.join(os.path.dirname(row["foreign_job"][0]), "keep-logits.pt"))
        foreign = max_error(torch.load(foreign_file), keep)
    row["foreign_error"] = foreign
    generative = TYPES[row["type"]][2]
    return {
        # (a) every default target factorized at full rank changes nothing
        "full_rank": row["targets"] > 0 and row["full_rank_error"] <= tolerance,
        # (f) the walker calibrates each block on the inputs a plain forward pass gives it
        "statistics": row["statistics_error"] < 1e-5,
        # (b) keep 0.8: every target factorized, the output changed, and the lowrank-free process agrees
        "foreign_load": (row["factorized"] == row["targets"] and row["keep_change"] > 0 and foreign is not None
                         and foreign <= tolerance),
        # (c) the KV cache gives the tokens and logits of full recomputation
        "kv_cache": (row["cache_tokens"] == row["no_cache_tokens"]
                     and row["cache_logit_error"] <= 1e-4 * max(1.0, row["logit_scale"])) if generative else None,
        # (d) a LoRA wraps every factorized layer and moves the output
        "lora": row["lora_layers"] == row["factorized"] and row["lora_change"] > 1e-3,
        # (e) densify: dense weight = up @ down, same logits
        "densify": row["densify_weight_error"] < 1e-6 and row["densify_logit_error"] <= tolerance,
    }
