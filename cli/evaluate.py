"""`lowrank eval MODEL [--baseline B] [--adapter A] [--data SPEC]`: perplexity, agreement, speed, lm-eval tasks."""

from typing import Annotated

import typer

from .app import app
from .ui import split_patterns

DATA, BASE, SPEED, TASKS, OUT, DANGER = ("Data and protocol", "Baseline and adapters", "Performance",
                                         "lm-evaluation-harness", "Output", "Dangerous")


@app.command(
    "eval",
    epilog="Examples:  lowrank eval ./smollm2-lr50 --baseline ./SmolLM2-135M --data wikitext:wikitext-2-raw-v1 "
    "--seq-len 2048  ·  lowrank eval ./base --adapter ./adapter-r8 --baseline ./base --baseline-adapter "
    "./adapter-r64  ·  lowrank eval ./smollm2-lr50 --data eval.txt --max-tokens 65536 --output evals.json",
)
def eval_command(
    model: Annotated[str, typer.Argument(help="A lowrank checkpoint, a dense checkpoint directory, a .gguf file, a "
                     "hub id (org/name) or pkg:NAME.")],
    baseline: Annotated[str | None, typer.Option(help="The model to compare with (usually the original): its "
                        "perplexity, KL divergence and top-1 agreement on the same windows, its speed.",
                        rich_help_panel=BASE)] = None,
    adapter: Annotated[str | None, typer.Option(help="A PEFT adapter directory applied to MODEL (a squeezed "
                       "adapter, an EoRA repair).", rich_help_panel=BASE)] = None,
    baseline_adapter: Annotated[str | None, typer.Option(help="A PEFT adapter applied to the baseline (e.g. the "
                                "adapter before squeezing).", rich_help_panel=BASE)] = None,
    data: Annotated[str, typer.Option(help="Evaluation text: a hub dataset name[:config] or a local "
                    "text/jsonl/json/parquet/csv file or folder.",
                    rich_help_panel=DATA)] = "wikitext:wikitext-2-raw-v1",
    split: Annotated[str, typer.Option(help="Split of a hub dataset.", rich_help_panel=DATA)] = "test",
    text_column: Annotated[str, typer.Option(help="Text column of the data.", rich_help_panel=DATA)] = "text",
    seq_len: Annotated[int | None, typer.Option(help="Window length in tokens (default 2048, the papers' "
                       "WikiText-2 setting, or the model's maximum if smaller).", rich_help_panel=DATA)] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Score at most this many tokens (whole windows; at least "
                          "one).", rich_help_panel=DATA)] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", rich_help_panel=SPEED)] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=SPEED)] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (each checkpoint's), float32, bfloat16 or float16.",
                     rich_help_panel=SPEED)] = "auto",
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure prefill and decode throughput (batch "
                     "1, median of 3) and memory.", rich_help_panel=SPEED)] = True,
    decode_tokens: Annotated[int, typer.Option(help="Greedy decode steps timed.", rich_help_panel=SPEED)] = 32,
    tasks: Annotated[list[str] | None, typer.Option(help="lm-evaluation-harness tasks to run on the same loaded "
                     "model (and baseline), comma-separated: arc_easy,hellaswag. Needs lowrank[eval].",
                     rich_help_panel=TASKS)] = None,
    limit: Annotated[float | None, typer.Option(help="lm-eval --limit: documents per task (or a fraction).",
                     rich_help_panel=TASKS)] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval --num_fewshot.", rich_help_panel=TASKS)] = None,
    include_path: Annotated[str | None, typer.Option(help="lm-eval --include_path: a folder of task YAML files.",
                            rich_help_panel=TASKS)] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Record into this report JSON instead "
                      "(created if missing, appended to if it exists).", rich_help_panel=OUT)] = None,
    record: Annotated[bool, typer.Option("--record/--no-record", help="Append the results to the evaluated "
                      "checkpoint's (or adapter's) report.", rich_help_panel=OUT)] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the evaluation as JSON on stdout.",
                           rich_help_panel=OUT)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.", rich_help_panel=OUT)] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail (-vv: library logs).",
                       rich_help_panel=OUT)] = 0,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.", rich_help_panel=OUT)] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow checkpoints' own Python code to run.",
                                 rich_help_panel=DANGER)] = False,
):
    """Perplexity under a fixed, printed protocol, and agreement with a baseline.

    Protocol: the text's rows are joined with blank lines and tokenized once without special tokens; the stream is
    cut into non-overlapping --seq-len windows; every token after a window's first is scored. With --baseline,
    also KL(baseline || model) and top-1 agreement on the same positions, and speed against the baseline; an
    encoder is compared by the cosine similarity of mean-pooled embeddings.

    The results are appended to the `evaluations` of the checkpoint's report (the adapter's, with --adapter),
    never replacing earlier runs. A directory without a report (a plain checkpoint) is never written to: pass
    --output FILE to keep the results.
    """
    from lowrank.evaluation.api import evaluate
    from lowrank.evaluation.api import record as record_evaluation

    from .ui import RichProgress, print_json, quiet_libraries

    _check_task_options(limit, num_fewshot)
    quiet_libraries(verbose)
    target = _record_target(record, output, model, adapter)
    with RichProgress(quiet=quiet, verbose=verbose) as progress:
        evaluation = evaluate(model, baseline=baseline, adapter=adapter, baseline_adapter=baseline_adapter, data=data,
                              split=split, text_column=text_column, seq_len=seq_len, max_tokens=max_tokens,
                              batch_size=batch_size, device=device, dtype=dtype, speed=speed,
                              decode_tokens=decode_tokens, tasks=split_patterns(tasks),
                              limit=int(limit) if limit is not None and limit >= 1 else limit,
                              num_fewshot=num_fewshot, include_path=include_path,
                              trust_remote_code=trust_remote_code, progress=progress)
    index = record_evaluation(evaluation, target) if target else None
    if json_output:
        print_json(evaluation)
    if not quiet:
        show(evaluation)
        _say_where(target, index, record, model, adapter)


def _record_target(record, output, model, adapter):
    """The report the evaluation will be appended to (None: not recorded), checked writable before any work, so
    an evaluation that cannot be recorded fails now rather than after minutes of scoring."""
    from lowrank.errors import UsageError
    from lowrank.evaluation.api import default_report
    from lowrank.report.files import check_writable

    target = None
    if record:
        target = output or default_report(model, adapter)
        if target:
            check_writable(target)
    elif output:
        raise UsageError("--output and --no-record contradict each other; pass one of them")
    return target


def _check_task_options(limit, num_fewshot):
    """lm-eval's options, refused before any model is loaded (lm-eval itself would only fail once it runs)."""
    from lowrank.validation import check_int, check_number

    if limit is not None:
        check_number("--limit", limit, 0, strict=True)
    if num_fewshot is not None:
        check_int("--num-fewshot", num_fewshot, 0)


def _say_where(target, index, record, model, adapter):
    """Where the evaluation was recorded, or why it was not."""
    from .ui import err

    if target:
        err.print(f"recorded as evaluation {index + 1} in {target}", highlight=False, soft_wrap=True)
    elif record:
        what = f"the adapter {adapter}" if adapter else model
        err.print(f"not recorded: {what} has no lowrank report; pass --output FILE to keep these results",
                  highlight=False, soft_wrap=True)


def show(evaluation):
    """What was evaluated and how, then the metrics table, on stderr."""
    from rich.table import Table

    from lowrank.report.evaluations import evaluation_header, evaluation_rows

    from .ui import err

    for line in evaluation_header(evaluation):
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    table = Table(title="lowrank eval", title_justify="left")
    table.add_column("metric")
    for column in ("model", "baseline", "change"):
        table.add_column(column, justify="right")
    for row in evaluation_rows(evaluation):
        table.add_row(*row)
    err.print(table)
