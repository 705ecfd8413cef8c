"""What a .gguf input should become: the dtype its weights are stored in after dequantization.

transformers dequantizes a GGUF file to float32, so a 98 MB Q4_1 SmolLM2 became a 538 MB float32 model, and its
compressed output (326 MB) was 3.3x bigger than the file the user started from. The output therefore defaults
to the GGUF's own float type when the file records one (general.file_type F32 / F16 / BF16), else to bfloat16:
the dequantized values of a 4- or 8-bit block format need no more than bfloat16's range, and its rounding is
measured by compress's verdict like everything else. The computation itself stays in float32 (bfloat16 matrix
products ran 6x slower than float32 on this project's AVX2 CPU), on weights rounded to the output dtype first,
so that what is calibrated, measured and verified is exactly what is written.

Only the header's key-value section is read (a few hundred KB; gguf's GGUFReader maps every tensor and took
17 s for SmolLM2).
"""

import contextlib
import copy
import functools
import struct

FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_BF16
DEFAULT = "bfloat16"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt):
        size = struct.calcsize("<" + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack("<" + fmt, data)[0]

    def string(self):
        return self.f.read(self.unpack("Q"))

    def value(self, kind):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item in _SCALARS:  # skipped, not read: a vocabulary holds 50k+ items
                self.f.seek(count * struct.calcsize("<" + _SCALARS[item]), 1)
            else:
                for _ in range(count):
                    self.value(item)
            return None
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.unpack(_SCALARS[kind])


def file_type(path):
    """general.file_type of a GGUF file (llama.cpp's ftype number), or None when absent or unreadable."""
    try:
        with open(path, "rb") as f:
            reader = _Reader(f)
            if f.read(4) != b"GGUF" or reader.unpack("I") < 2:
                return None
            reader.unpack("Q")  # tensor count
            for _ in range(reader.unpack("Q")):
                key, kind = reader.string(), reader.unpack("I")
                value = reader.value(kind)
                if key == b"general.file_type":
                    return value if isinstance(value, int) else None
    except (OSError, ValueError, struct.error):
        return None
    return None


def output_dtype(path):
    """The dtype a compressed GGUF model is written in by default (see the module docstring)."""
    return FILE_TYPES.get(file_type(path), DEFAULT)


@contextlib.contextmanager
def fewer_parses():
    """Within this block, transformers reads a GGUF file's metadata once instead of three times.

    Loading a GGUF model with its tokenizer makes transformers parse the file's metadata (a 49k-token vocabulary
    for SmolLM2) with gguf's GGUFReader once for the config, once more for the tokenizer's config and once for
    the model; and it builds gguf's tensor-name table once per submodule (397 times for SmolLM2). The
    metadata-only reads (`return_tensors=False`) are memoized here and the name table is built once per
    (architecture, layer count). Both are pure functions of their arguments; the tensor read is left alone.
    The module attributes are restored on exit (not thread-safe: load one GGUF model at a time).
    """
    import gguf
    from transformers import modeling_gguf_pytorch_utils as utils

    read, name_map = utils.load_gguf_checkpoint, gguf.get_tensor_name_map
    metadata = {}

    def read_once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return read(path, return_tensors, **kwargs)
        if path not in metadata:
            metadata[path] = read(path, False)
        return {**metadata[path], "config": copy.deepcopy(metadata[path]["config"])}  # callers edit the config

    utils.load_gguf_checkpoint, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        utils.load_gguf_checkpoint, gguf.get_tensor_name_map = read, name_map
