"""One linear layer's time in each weight layout: row-major (out, in), as transformers stores it, against the
transposed view of an (in, out) contiguous tensor (what `lowrank.decode_layout` did up to the twenty-first
session; bench/decode_kernel.py measures what replaced it). The same F.linear call either way.

    python bench/gemv_layout.py              # bench/results/gemv-layout.json, then its table
    python bench/gemv_layout.py --render     # the table only

Shapes: SmolLM2-135M's (576 hidden, 1536 MLP, 192 for k/v) and its factors at ranks 64-256, so both a factorized
layer's down factor (rank x in: more inputs than outputs) and its up factor (out x rank: more outputs). Each shape
is timed over enough distinct copies of the weight to fill 128 MB, so that every call streams its weight from
memory as a decode step does (the whole model does not fit in cache), not from a warm cache. Rows: 1 (a batch-1
decode step, a GEMV), 16 (batched decode) and 512 (a prefill GEMM); more shapes at 1 row: the rule's edges and a
7B model's. Median of 5 passes; float32 and bfloat16; torch's default threads.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import decode_kernel

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (1536, 128), (1536, 256), (576, 128), (576, 256),
          (192, 64), (128, 576), (256, 576), (256, 1536)]
# At batch 1 only: where the rule's edges are (narrow inputs, square) and the shapes of larger models.
EDGES = [(192, 32), (192, 96), (192, 128), (384, 64), (384, 128), (576, 64), (768, 128), (1024, 256), (2048, 512),
         (4096, 256), (4096, 1024), (4096, 4096), (11008, 512), (11008, 4096), (4096, 11008)]
ROWS = (1, 16, 512)
DTYPES = ("float32", "bfloat16")


def microseconds(weights, x, passes=5):
    import torch.nn.functional as F

    return decode_kernel.microseconds(F.linear, weights, x, passes)


def measure(shape, rows, dtype):
    import torch

    out_features, in_features = shape
    copies = max(4, int(128e6 / (out_features * in_features * 4)))
    generator = torch.Generator().manual_seed(0)
    plain = [torch.randn(shape, generator=generator).to(dtype) for _ in range(copies)]
    laid = [w.t().contiguous().t() for w in plain]
    x = torch.randn(1, rows, in_features, generator=generator).to(dtype)
    with torch.no_grad():
        microseconds(plain[:2], x, 1), microseconds(laid[:2], x, 1)  # warm-up
        row_major, column_major = microseconds(plain, x), microseconds(laid, x)
    return {"out": out_features, "in": in_features, "rows": rows, "dtype": str(dtype).replace("torch.", ""),
            "row_major_us": round(row_major, 2), "column_major_us": round(column_major, 2),
            "ratio": round(column_major / row_major, 3)}


def markdown(results):
    lines = ["| out x in | rows | float32: column-major / row-major | bfloat16: column-major / row-major |",
             "|---|---|---|---|"]
    cells = {(r["out"], r["in"], r["rows"], r["dtype"]): r for r in results["rows"]}
    for rows in ROWS:
        for out_features, in_features in SHAPES + (EDGES if rows == 1 else []):
            parts = []
            for dtype in DTYPES:
                r = cells.get((out_features, in_features, rows, dtype))
                parts.append("" if r is None else f"{r['ratio']:.2f} ({r['row_major_us']:.0f} -> "
                                                  f"{r['column_major_us']:.0f} us)")
            lines.append(f"| {out_features} x {in_features} | {rows} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "gemv-layout.json", "")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    import torch

    rows = [measure(shape, n, getattr(torch, dtype)) for dtype in args.dtypes.split(",") for n in ROWS
            for shape in SHAPES + (EDGES if n == 1 else [])]
    decode_kernel.save_layers(__doc__, args.out, rows, markdown)


if __name__ == "__main__":
    main()
