"""Where a squeezed adapter goes: its default name and the checks made before any work.

PEFT adapters and extracted LoRAs are directories, kohya / diffusers adapters single .safetensors files: both checked
by io.publish.check_output.
"""

import os

from ..errors import UsageError
from ..io.publish import check_output
from .plan import rule_tag


def default_squeeze_output(path, plan):
    """The input's name with the rule appended: ./my-adapter-r8, style-e0.95.safetensors."""
    tag = rule_tag(plan)
    base = os.path.normpath(path)
    if base.endswith(".safetensors"):
        return f"{base[: -len('.safetensors')]}-{tag}.safetensors"
    return f"{base}-{tag}"


def check_adapter_output(source, output, overwrite):
    """PEFT: an output directory; single files: a .safetensors file (both checked by io.publish.check_output)."""
    if source.format == "peft":
        check_output(output, source.path, overwrite)
        return
    if not output.endswith(".safetensors"):
        raise UsageError(f"{output}: the output of a single-file adapter is a .safetensors file")
    check_output(output, source.path, overwrite, directory=False)
