"""Where a squeezed adapter goes: its default name and the checks made before any work.

PEFT adapters and extracted LoRAs are directories (checked by io.publish.check_output); kohya / diffusers adapters
are single .safetensors files.
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
    """PEFT: an output directory (io.publish.check_output). Single files: a .safetensors path that is not the input."""
    if source.format == "peft":
        check_output(output, source.path, overwrite)
        return
    out = os.path.abspath(output)
    if not output.endswith(".safetensors"):
        raise UsageError(f"{output}: the output of a single-file adapter is a .safetensors file")
    if out == os.path.abspath(source.path):
        raise UsageError(f"{output} is the input file; write the output somewhere else")
    if os.path.isdir(out):
        raise UsageError(f"{output} is a directory; give a .safetensors file name")
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{output} already exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"the parent directory of {output} does not exist")
