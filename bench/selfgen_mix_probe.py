"""Issue 19 probe: can text the model samples itself stand in for the calibration text the protocol lacks?

    python bench/selfgen_mix_probe.py --extra 48 --ratio 0.8

The thirteenth session found that the protocol's 16 x 512 calibration tokens, not the method, keep the default at
44.04 for keep 0.8: the same default on 64 real windows gives 38.76. This asks whether the missing 48 windows
can be sampled from the original model (`--calib self`'s sampler: temperature 1, the full vocabulary, started at
BOS, seed 1 so that no row repeats the held-out seed-0 draw) instead of read: no text beyond the protocol's.
The compression is `lowrank.compress` with the default settings on the protocol's 16 windows, the sampled windows
appended after them (a probe: lowrank's calibration loader is wrapped here, not changed). Scored like every row of
BENCHMARKS.md (common.measure: the first 8,176 held-out tokens). Results: bench/results/selfgen-mix.json.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra", type=int, default=48, help="sampled windows appended to the 16 real ones")
    parser.add_argument("--ratio", type=float, default=0.8)
    args = parser.parse_args()
    import torch

    import lowrank
    from lowrank import calibration
    from lowrank.calibration.selfgen import generate

    common.prepare()
    timings = {}
    real_loader = calibration.load_calibration

    def with_sampled_windows(spec, model, tokenizer, num_samples, seq_len=None, **kwargs):
        found = real_loader(spec, model, tokenizer, num_samples, seq_len, **kwargs)
        start = time.perf_counter()
        sampled = generate(model, args.extra, found.input_ids.shape[1], seed=1)
        timings["sampling_s"] = round(time.perf_counter() - start, 1)
        found.input_ids = torch.cat([found.input_ids, sampled])
        return found

    calibration.load_calibration = with_sampled_windows
    out = os.path.join(common.WORK, "selfgen-mix", f"smollm2-16real+{args.extra}self-{args.ratio}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    start = time.perf_counter()
    lowrank.compress(common.MODEL_DIR, out, ratio=args.ratio, calib=common.CALIB_FILE,
                     num_samples=common.CALIB_SAMPLES, seq_len=common.CALIB_SEQ_LEN, overwrite=True, verify=False)
    timings["compress_wall_s"] = round(time.perf_counter() - start, 1)
    score = common.measure(out)
    result = {"machine": common.machine(), "ratio": args.ratio, "real_windows": common.CALIB_SAMPLES,
              "sampled_windows": args.extra, "seq_len": common.CALIB_SEQ_LEN, "checkpoint": out, **timings,
              "load_average": os.getloadavg(), "measure": score}
    print(result)
    common.save(f"selfgen-mix-{args.extra}-{args.ratio}.json", result)


if __name__ == "__main__":
    main()
