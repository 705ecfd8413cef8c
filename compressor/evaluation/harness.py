"""Pass-through to lm-evaluation-harness (`--tasks`), on the model already loaded (factorized, dense or +adapter).

The loaded model object is handed to lm-eval's HFLM, as its docs describe for models built in Python, so what is
scored is exactly what `lowrank eval` measured. Results keep lm-eval's own metric keys ("acc,none", ...).
"""

import importlib.metadata
import importlib.util
import logging
import math

from ..errors import LowrankError, UsageError


def check_available():
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install 'lowrank[eval]' (or pip install lm-eval)")


def task_manager(tasks, include_path=None):
    """lm-eval's TaskManager, after checking that every task exists (before any model is loaded)."""
    check_available()
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):  # it warns loudly that a preloaded model skips its own loading options
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise UsageError(f"lm-eval does not know task(s) {', '.join(unknown)} (lm-eval ls tasks lists them; "
                         "--include-path adds a folder of task YAML files)")
    return manager


def run_tasks(model, tokenizer, tasks, manager, batch_size=1, limit=None, num_fewshot=None):
    """{"harness", "tasks": {task: {metric: value}}, "limit", "num_fewshot"} from lm_eval.simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=False)
    except (ValueError, OSError, ConnectionError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LowrankError(f"lm-eval failed: {first} (offline? task datasets are downloaded from the hub)") from error
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        # numbers only (lm-eval also reports "N/A" strings); NaN becomes null so the JSON stays standard
        results[task] = {key: (value if math.isfinite(value) else None) for key, value in metrics.items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {"harness": f"lm-eval {importlib.metadata.version('lm_eval')}", "tasks": results, "limit": limit,
            "num_fewshot": num_fewshot}
