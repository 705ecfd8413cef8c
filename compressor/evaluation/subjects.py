"""What `lowrank eval` evaluates: MODEL and the baseline, loaded whatever they are (a factorized checkpoint, a
dense or densified checkpoint, a .gguf file, a hub id, pkg:NAME), each optionally with a PEFT adapter on top, and
described (source, kind, adapter, architecture, dtype, parameters, weight bytes) for the evaluation entry.
"""

import importlib.util
import os
from dataclasses import dataclass

from ..errors import LowrankError, UsageError


@dataclass
class Subject:
    """A loaded model to evaluate, its tokenizer, and what it is (recorded in the evaluation)."""

    model: object
    tokenizer: object
    info: dict


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_adapter(adapter):
    """Refuse, before any model is loaded, an adapter that cannot be applied: no PEFT, no adapter_config.json, or
    a legacy adapter_model.bin that holds Python objects other than tensors (read with torch's weights-only loader,
    never executed, whatever PEFT's version would do)."""
    import pickle

    if importlib.util.find_spec("peft") is None:
        raise UsageError("--adapter needs PEFT: pip install 'lowrank[peft]' (or pip install peft)")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UsageError(f"{adapter} is not a PEFT adapter directory (it has no adapter_config.json)")
    legacy = os.path.join(adapter, "adapter_model.bin")
    if os.path.isfile(legacy) and not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
        import torch

        from ..io.loading import refused_pickle

        try:
            torch.load(legacy, map_location="meta", weights_only=True)
        except pickle.UnpicklingError as error:
            raise refused_pickle(legacy, error) from None
        except Exception as error:  # noqa: BLE001  (torch's errors for a damaged file vary)
            raise LowrankError(f"cannot read {legacy} as a weights-only PyTorch file ({_first_line(error)})") from None


def _apply_adapter(model, adapter):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as error:
        raise LowrankError(f"could not apply the adapter {adapter}: {_first_line(error)}") from error


def load_subject(spec, adapter=None, dtype="auto", trust_remote_code=False):
    """Load MODEL (any kind resolve_model knows, factorized or not) and put the PEFT `adapter` on it."""
    from ..io.checkpoint import load_pretrained
    from ..io.loading import load_model, load_tokenizer, read_config, resolve_model, torch_dtype
    from ..io.modeling_lowrank import MODEL_TYPE_PREFIX, decode_layout
    from ..io.shards import check_checkpoint_files
    from .speed import weights_bytes

    if adapter:
        _check_adapter(adapter)
    source = resolve_model(spec)
    config = read_config(source) or {}
    if str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX):
        check_checkpoint_files(source.path)
        try:
            model = load_pretrained(source.path, dtype=torch_dtype(dtype)).eval()
        except (OSError, ValueError, RuntimeError, AttributeError, KeyError) as error:
            raise LowrankError(f"could not load {spec}: {_first_line(error)}") from error
        tokenizer, kind = load_tokenizer(source), "lowrank"
    else:
        model, tokenizer = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
        decode_layout(model)  # the kernel load_pretrained gives a factorized model: speeds compare like with like
        kind = "densified" if config.get("lowrank_densified") else source.kind
    if adapter:
        model = _apply_adapter(model, adapter)
    parameter = next(model.parameters())
    info = {"source": spec, "kind": kind, "adapter": adapter, "architecture": type(base_model(model)).__name__,
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "weights_bytes": weights_bytes(model)}
    return Subject(model, tokenizer, info)


def base_model(model):
    """The model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_causal_lm(model):
    """Whether the model generates (scored by perplexity) or is an encoder; encoder-decoders are refused."""
    base = base_model(model)
    if getattr(base.config, "is_encoder_decoder", False):
        raise UsageError(f"{type(base).__name__} is an encoder-decoder model; lowrank eval scores decoder-only "
                         "language models and encoders")
    return bool(type(base).can_generate())


def max_positions(model):
    """The longest input the model takes, when its config says."""
    config = base_model(model).config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_subjects(model, adapter, baseline, baseline_adapter, dtype, trust_remote_code, progress):
    """The model to evaluate and the baseline (None without one), each with its adapter on."""
    progress.log(f"loading {model}" + (f" + adapter {adapter}" if adapter else ""))
    subject = load_subject(model, adapter, dtype, trust_remote_code)
    reference = None
    if baseline:
        progress.log(f"loading baseline {baseline}" + (f" + adapter {baseline_adapter}" if baseline_adapter else ""))
        reference = load_subject(baseline, baseline_adapter, dtype, trust_remote_code)
    return subject, reference


def check_measurable(model, subject, reference, tasks):
    """Whether MODEL is a causal LM (scored by perplexity) or an encoder (compared by pooled embeddings, which
    needs a baseline); either way its tokenizer is needed to tokenize the text."""
    causal = is_causal_lm(subject.model)
    if not causal and reference is None:
        raise UsageError(f"{model} is not a causal language model, so it has no perplexity; pass --baseline BASE to "
                         "compare its pooled embeddings with the baseline's")
    if not causal and tasks:
        raise UsageError(f"{model} is not a causal language model; lm-eval tasks (--tasks) need one")
    if subject.tokenizer is None:
        raise UsageError(f"{model} has no tokenizer, so the evaluation text cannot be tokenized")
    return causal
