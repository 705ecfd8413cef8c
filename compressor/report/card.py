"""The model card (README.md) written into every compressed checkpoint."""

import os

from ..core.ranks import RATIO_DEFINITION
from .compression import worst_layers
from .format import human_bytes


def front_matter(report):
    """The Hub's model card metadata: a base_model only when the source was a hub id (a local path means
    nothing on the Hub)."""
    lines = ["---", "library_name: transformers", "tags:", "- lowrank", "- low-rank", "- compressed"]
    if report["model"].get("kind") == "hub":
        lines.append(f"base_model: {report['model']['source']}")
    return "\n".join([*lines, "---", ""])


def verdict_line(report):
    verify = report.get("verify") or {}
    if "verdict" not in verify:
        return ""
    return (f"- held-out text (not used for calibration): perplexity {verify['perplexity_original']:.2f} -> "
            f"{verify['perplexity_compressed']:.2f}, top-1 agreement with the original "
            f"{verify['top1_agreement']:.1%}: {verify['verdict']}\n")


def model_card(report, output):
    name = os.path.basename(os.path.abspath(output))
    t = report["ratio"]["targets"]
    worst = worst_layers(report, 5)
    worst_text = ", ".join(f"{layer['name']} ({layer['rel_error']:.3f})" for layer in worst) or "none"
    return f"""{front_matter(report)}# {name}

A low-rank factorized version of `{report['model']['source']}`, made with
[lowrank](https://pypi.org/project/lowrank/) {report['versions']['lowrank']}:

`{report['command']}`

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
