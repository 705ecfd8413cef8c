"""Greedy generation with vLLM, in its own process (vLLM spawns workers; a fresh process per engine keeps the
tests independent):
`python run_vllm.py MODEL DTYPE PROMPTS_JSON MAX_TOKENS [--enable-lora] [--tp2]`, prints one JSON line
{"tokens": [[...] per prompt], "logprobs": [[...] per prompt]} (the chosen tokens' log-probabilities), or exits
non-zero with vLLM's error on stderr."""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    tp = 2 if "--tp2" in sys.argv else 1
    if tp == 2:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (auto keeps one core back)
    from vllm import LLM, SamplingParams, TokensPrompt

    model, dtype, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=model, dtype=dtype, max_model_len=128, seed=0, enforce_eager=True, max_num_seqs=8,
              enable_lora="--enable-lora" in sys.argv, tensor_parallel_size=tp)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    result = {"tokens": [], "logprobs": []}
    for output in outputs:
        sample = output.outputs[0]
        result["tokens"].append(list(sample.token_ids))
        result["logprobs"].append([step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs)])
    print("RESULT " + json.dumps(result), flush=True)
