"""Serving lowrank checkpoints with other engines (today: vLLM, through a plugin).

Nothing here imports vLLM (or torch) at `import lowrank.serve` time: vLLM loads `lowrank.serve.vllm_plugin` through
its `vllm.general_plugins` entry point in its own processes, and the vLLM-facing modules are imported only there.
`lowrank.serve.support` (pure Python) says whether a checkpoint can be served, so that a refusal is decided before
any engine starts.
"""
