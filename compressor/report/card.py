"""The model card (README.md) written into every compressed checkpoint."""

import os

from ..core.ranks import RATIO_DEFINITION
from .compression import worst_layers
from .format import human_bytes


def model_card(report, output):
    name = os.path.basename(os.path.abspath(output))
    t = report["ratio"]["targets"]
    worst = worst_layers(report, 5)
    worst_text = ", ".join(f"{layer['name']} ({layer['rel_error']:.3f})" for layer in worst) or "none"
    return f"""# {name}

A low-rank factorized version of `{report['model']['source']}`, made with
[lowrank](https://pypi.org/project/lowrank/) {report['versions']['lowrank']}:

`{report['command']}`

- method: `{report['method']['name']}`; ratio {report['ratio']['requested']:g} = {RATIO_DEFINITION}
- targeted layers: {t['params_before']:,} -> {t['params_after']:,} parameters (removed {t['removed']:.1%})
- size: {human_bytes(report['size']['bytes_after'])} ({report['model']['dtype']})
- worst layers by relative calibration output error: {worst_text}

## Load it

```python
import lowrank
model = lowrank.load_pretrained("{name}")            # with lowrank installed

from transformers import AutoModelForCausalLM     # without lowrank: bundled modeling_lowrank.py
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
```

Evaluate: `lm_eval --model hf --model_args pretrained={name},trust_remote_code=True --tasks wikitext`

Each factorized linear `X` is stored as `X.down.weight` (rank x in) and `X.up.weight` (out x rank, with the
bias); `lowrank densify` turns the checkpoint back into the original dense architecture. The full report is
in `compression_report.json`.
"""
