"""--calib self: what sampling calibration text costs, against its floor and against a forward pass of the same tokens.

    python bench/selfgen_bench.py [--rows 20] [--seq-len 64]

On SmolLM2-135M (bench/work/smollm2-135m, prepared by bench/common.py), milliseconds per decode step for:
lowrank's sampler (calibration/selfgen.py) with all rows in one batch and with one row; transformers' generate()
with the sampling lowrank used before (top-p 0.95 over the whole vocabulary, top_k=0); the model's decode
forward alone (the floor of any sampler); and, for scale, one full forward over the same rows x seq_len tokens
(what the statistics pass does per window). Writes bench/results/selfgen.json.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from lowrank.calibration import selfgen

    model = AutoModelForCausalLM.from_pretrained(common.prepare()).eval()
    rows, steps = args.rows, args.seq_len - 1
    start = torch.full((rows, 1), model.config.bos_token_id)

    def hf_generate():
        torch.manual_seed(0)
        model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, top_p=0.95, top_k=0,
                       max_new_tokens=steps, min_new_tokens=steps, pad_token_id=model.config.eos_token_id)

    def forward_only():
        tokens, past = start, None
        for _ in range(steps):
            out = model(input_ids=tokens, use_cache=True, cache=past)
            past = out.cache

    def full_forward():
        model(input_ids=torch.randint(0, 1000, (rows, args.seq_len), generator=torch.Generator().manual_seed(0)))

    with torch.no_grad():
        selfgen.generate(model, 2, 8, seed=0)  # warm-up
        ms = {
            "lowrank_sampler": timed(lambda: selfgen.generate(model, rows, args.seq_len, seed=0)) / steps * 1e3,
            "lowrank_sampler_one_row": timed(lambda: selfgen.generate(model, 1, args.seq_len, seed=0)) / steps * 1e3,
            "transformers_generate_top_p_whole_vocab": timed(hf_generate) / steps * 1e3,
            "decode_forward_only": timed(forward_only) / steps * 1e3,
        }
        full = timed(full_forward)
    result = {"machine": common.machine(), "rows": rows, "seq_len": args.seq_len,
              "ms_per_step": {k: round(v, 1) for k, v in ms.items()},
              "tokens_per_s": {k: round(rows * (1 if "one_row" not in k else 1 / rows) / (v / 1e3), 1)
                               for k, v in ms.items()},
              "full_forward_same_tokens_s": round(full, 3),
              "sampling_s_same_tokens": round(ms["lowrank_sampler"] * steps / 1e3, 3),
              "load_average_after": os.getloadavg()}
    print(result)
    common.save("selfgen.json", result)


if __name__ == "__main__":
    main()
