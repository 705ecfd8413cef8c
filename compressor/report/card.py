"""The model card (README.md) written into every compressed checkpoint."""

import os

from ..core.ranks import RATIO_DEFINITION
from .compression import worst_layers
from .format import human_bytes

# The Hub's pipeline tag of a model class, by the class name's ending (the source's own card wins when it has one)
PIPELINE_TAGS = (("ForCausalLM", "text-generation"), ("ForConditionalGeneration", "text2text-generation"),
                 ("ForImageTextToText", "image-text-to-text"), ("ForMaskedLM", "fill-mask"),
                 ("ForSequenceClassification", "text-classification"), ("ForTokenClassification",
                                                                        "token-classification"),
                 ("ForQuestionAnswering", "question-answering"), ("ForImageClassification", "image-classification"),
                 ("ForSpeechSeq2Seq", "automatic-speech-recognition"))


def source_name(report):
    """How the card names the source: a hub id or pkg:NAME as given, a local path by its last component only
    (a machine path means nothing to whoever reads the card on the Hub)."""
    model = report["model"]
    if model.get("kind") == "hub" or str(model["source"]).startswith("pkg:"):
        return model["source"]
    return os.path.basename(os.path.normpath(model["source"]))


def source_card(report):
    """The front matter of the source's own README.md (a local checkpoint directory), {} when it has none."""
    model = report["model"]
    path = os.path.join(model["source"], "README.md")
    if model.get("kind") != "dir" or not os.path.isfile(path):
        return {}
    try:
        import yaml  # a dependency of transformers

        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.startswith("---"):
            return {}
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (OSError, UnicodeDecodeError, IndexError, ValueError, yaml.YAMLError):
        return {}  # an unreadable card is not a reason to fail a finished compression
    return meta if isinstance(meta, dict) else {}


def front_matter(report, architecture=None):
    """The Hub's model card metadata. `base_model` (with `base_model_relation: quantized`, the Hub's closest
    value for a compressed copy) only for a hub id: a local path means nothing on the Hub. The license and the
    pipeline tag come from the source's own card; the tag otherwise from the model class."""
    own = source_card(report)
    lines = ["---", "library_name: transformers"]
    if own.get("license"):
        lines.append(f"license: {own['license']}")
    if report["model"].get("kind") == "hub":
        lines += [f"base_model: {report['model']['source']}", "base_model_relation: quantized"]
    tag = own.get("pipeline_tag") or next((t for end, t in PIPELINE_TAGS if architecture and
                                           architecture.endswith(end)), None)
    if tag:
        lines.append(f"pipeline_tag: {tag}")
    lines += ["tags:", "- lowrank", "- low-rank", "- compressed"]
    return "\n".join([*lines, "---", ""])


def shown_command(report, output):
    """The command as run, with the source named as the card names it and every other absolute path (output,
    calibration file, offload folder) reduced to its last component: the card is published, the paths are not."""
    import shlex

    try:
        words = shlex.split(report["command"])
    except ValueError:
        return report["command"]

    def short(word):
        if word == report["model"]["source"]:
            return source_name(report)
        option, eq, value = word.rpartition("=") if word.startswith("--") else ("", "", word)
        return option + eq + (os.path.basename(os.path.normpath(value)) if os.path.isabs(value) else value)

    return shlex.join(short(word) for word in words)


def verdict_line(report):
    verify = report.get("verify") or {}
    if "verdict" not in verify:
        return ""
    return (f"- held-out text (not used for calibration): perplexity {verify['perplexity_original']:.2f} -> "
            f"{verify['perplexity_compressed']:.2f}, top-1 agreement with the original "
            f"{verify['top1_agreement']:.1%}: {verify['verdict']}\n")


def model_card(report, output, architecture=None):
    name = os.path.basename(os.path.abspath(output))
    t = report["ratio"]["targets"]
    worst = worst_layers(report, 5)
    worst_text = ", ".join(f"{layer['name']} ({layer['rel_error']:.3f})" for layer in worst) or "none"
    return f"""{front_matter(report, architecture)}# {name}

A low-rank factorized version of `{source_name(report)}`, made with
[lowrank](https://pypi.org/project/lowrank/) {report['versions']['lowrank']}:

`{shown_command(report, output)}`

- method: `{report['method']['name']}`; ratio {report['ratio']['requested']:g} = {RATIO_DEFINITION}
- targeted layers: {t['params_before']:,} -> {t['params_after']:,} parameters (removed {t['removed']:.1%})
- size: {human_bytes(report['size']['bytes_after'])} ({report['model']['dtype']})
- worst layers by relative calibration output error: {worst_text}
{verdict_line(report)}
## Load it

```python
import lowrank
from transformers import AutoTokenizer
model = lowrank.load_pretrained("{name}")            # with lowrank installed
tokenizer = AutoTokenizer.from_pretrained("{name}")

from transformers import AutoModelForCausalLM     # without lowrank: bundled modeling_lowrank.py
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```

Evaluate: `lm_eval --model hf --model_args pretrained={name},trust_remote_code=True --tasks wikitext`

Each factorized linear `X` is stored as `X.down.weight` (rank x in) and `X.up.weight` (out x rank, with the
bias); `lowrank densify` turns the checkpoint back into the original dense architecture. The full report is
in `compression_report.json`.
"""
