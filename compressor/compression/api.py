"""`lowrank.compress`: load a model, calibrate, factorize its block linears, write the checkpoint and report.

One flow for both ways of holding the model. In memory (any source) or streamed (a safetensors checkpoint:
a weightless skeleton filled one block at a time), the output is written the same way and in the same order:
the tensors before the blocks, each block as soon as it is compressed, the tensors after the blocks. So the
two produce the same bytes, and after every block a journal makes the work so far durable for `--resume`.
"""

import json
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import replace

from .. import __version__
from ..calibration.text import check_source
from ..core.ranks import RATIO_DEFINITION
from ..device import resolve_device
from ..environment import invocation
from ..errors import Interrupted, UsageError
from ..io.checkpoint import CheckpointWriter, partition_keys, tied_names
from ..io.loading import load_model, load_tokenizer, read_config, resolve_model, round_weights, torch_dtype
from ..io.modeling_lowrank import linear_shape
from ..io.publish import check_output, staging_dir
from ..progress import SILENT, Progress
from ..report.card import model_card
from ..report.compression import SPECTRA_FILE, build_report, compression_markdown, layer_entry, spectra_bytes
from . import resume
from .allocation import speed_entry
from .config import CompressConfig
from .coverage import measure_coverage
from .distributed import from_environment
from .experts import check_streamable
from .fused import fused_projections, slice_ranks, sliced_layers
from .layers import LayerResult, stored_layer, stored_ranks
from .malloc import returnable_large_allocations
from .model import compress_model, prepare_targets
from .plan import choose_streaming, compute_dtype, output_dtype, resolve
from .sequential import Resume
from .targets import block_prefixes, is_encoder_decoder, replace_module, stack_names


def compress(model: str, output: str, config: CompressConfig | None = None, *, progress: Progress = SILENT,
             command: str | None = None, **options) -> dict | None:
    """Compress `model` (a directory, .gguf file, hub id or pkg:NAME) and write a factorized checkpoint to `output`.

    `config` holds every option (see CompressConfig); keyword `options` are the same names and override it, so
    `compress(m, out, ratio=0.8, method="svd")` works without building a config. Returns the report (a dict,
    also written as compression_report.json), or None in a helper process of a torchrun job.
    """
    config = replace(config, **options) if config is not None else CompressConfig.from_options(**options)
    return _Job(model, output, config, progress, command).run()


class _Job:
    """One compression, phase by phase; its state (model, writer, journal, layers so far) lives here."""

    def __init__(self, model, output, config, progress, command):
        self.spec, self.output, self.requested, self.command = model, output, config, command
        self.dist = from_environment(resolve_device(config.device))  # torchrun: several processes share the work, rank 0 writes
        self.main = self.dist is None or self.dist.main
        self.progress = progress if self.main else SILENT
        self.timings, self.layers = {}, []
        self.loss_curve = None  # the allocation's (allocation.LossCurve), for the verdict's suggested ratio

    def run(self):
        import torch

        self.source = resolve_model(self.spec)
        check_output(self.output, self.source.local_dir, self.requested.overwrite)
        check_source(self.requested.calib)  # a mistyped --calib path fails now, not once the model is loaded
        self.streaming = choose_streaming(self.requested, self.source, self.progress)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with ExitStack() as scope:
            scope.enter_context(torch.random.fork_rng(devices=cuda))  # the caller's RNG is left as it was
            torch.manual_seed(self.requested.seed)
            # flat memory over any depth; costs ~30% on the block passes (page faults), so only when streaming
            scope.enter_context(returnable_large_allocations() if self.streaming else nullcontext())
            try:
                for self.phase, step in (("loading the model", self.load),
                                         ("preparing the calibration data", self.calibrate),
                                         ("scoring the held-out text with the original model", self.score_original),
                                         ("reading the resume journal", self.open_journal)):
                    step()
                self.phase = "compressing the first block"
                result = self.compress()
                if not self.main:
                    return None
                self.phase = "scoring the held-out text with the compressed model"
                self.verify(result)
                self.phase = "writing the output"
                return self.write(result)
            except KeyboardInterrupt:
                journal = resume.load(self.staging) if getattr(self, "staging", None) else None
                if journal is not None:
                    raise Interrupted(f"interrupted while {self.phase} after block {journal['blocks_done']}; the "
                                      f"work so far is kept in {self.staging}: run the same command with --resume "
                                      "to continue") from None
                raise Interrupted(f"interrupted while {self.phase}; nothing was written (an output appears only "
                                  "when it is complete)") from None

    def load(self):
        start = time.perf_counter()
        config, progress = self.requested, self.progress
        progress.log(f"loading {self.spec}" + (" (streaming: one block in memory at a time)" if self.streaming
                                               else " (dequantizing the GGUF)" if self.source.kind == "gguf"
                                               else ""))
        progress.start("load", None)
        self.skeleton = None
        if self.streaming:
            from ..io.streaming import Skeleton

            if str((read_config(self.source) or {}).get("model_type", "")).startswith("lowrank_"):
                raise UsageError(f"{self.spec} is already a lowrank factorized checkpoint; compress the original "
                                 "model")
            self.skeleton = Skeleton(self.source, config.dtype, config.trust_remote_code)
            self.net, self.tokenizer = self.skeleton.model, load_tokenizer(self.source, config.trust_remote_code)
        else:
            # a GGUF is dequantized to float32 and computed in float32, on weights rounded to the output dtype;
            # --compute-dtype float32 does the same for any checkpoint (see compute_dtype)
            compute = compute_dtype(config, self.source)
            self.net, self.tokenizer = load_model(self.source, dtype=compute,
                                                  trust_remote_code=config.trust_remote_code)
            output = output_dtype(config, self.source, self.net)
            if compute != config.dtype and output not in (compute, self.source.stored_dtype):
                round_weights(self.net, output)
        self.timings["load"] = time.perf_counter() - start
        self.computed_in = str(next(self.net.parameters()).dtype).removeprefix("torch.")
        progress.advance("load", f"loaded in {self.timings['load']:.0f}s")
        # an unsupported model, bad patterns and an ambiguous or wrong --blocks fail here, before calibration
        self.blocks_name, targets, self.experts = prepare_targets(self.net, config, self.dist is not None,
                                                                  self.streaming)
        if self.streaming:
            check_streamable(self.skeleton, self.experts)
        stacks = stack_names(self.blocks_name)
        if self.streaming and len(stacks) > 1:
            raise UsageError(f"the stacks {' and '.join(stacks)} are compressed together with the model in memory, "
                             "not streamed: pass --stream off, or name one stack with --blocks PATH")
        self.tied = tied_names(self.net)
        self.coverage = measure_coverage(self.net, self.blocks_name, targets, self.tied)
        if self.coverage.other_stacks:
            progress.log(f"compressing the blocks of {self.blocks_name}; the other stacks stay dense "
                         f"({', '.join(self.coverage.other_stacks)}; name one with --blocks PATH)")
        elif len(stacks) > 1:
            progress.log(f"compressing the blocks of {' and '.join(stacks)} (the decoder calibrated with the "
                         "compressed encoder's output)")
        self.config, notes = resolve(config, self.net, streaming=self.streaming, distributed=self.dist is not None)
        for note in notes if self.main else ():
            progress.log(note)
        self.before, self.after = partition_keys(self.net, stacks, self.tied)
        self.prefixes = block_prefixes(self.net, self.blocks_name)  # block index -> "model.decoder.layers.1."
        self.dtype = output_dtype(config, self.source, self.net, self.streaming)  # factors are rounded to it
        self.config = self.config.resolved(dtype=self.dtype)
        self.element_size = torch_dtype(self.dtype).itemsize
        self.params_before = sum(t.numel() for name, t in self.net.state_dict().items() if name not in self.tied)
        names = [name for block_names in targets.values() for name in block_names]
        self.fused = fused_projections(self.net, names, sliced_layers(self.net, names, self.config))
        warning = self.coverage.warning(self.config.ratio)
        if warning and self.main:
            progress.log("warning: " + warning)

    def calibrate(self):
        from lowrank.calibration import load_calibration

        start, c = time.perf_counter(), self.config
        self.calibration = load_calibration(c.calib, self.net, self.tokenizer, c.num_samples, c.seq_len, seed=c.seed,
                                            split=c.calib_split, text_column=c.text_column, progress=self.progress,
                                            device=c.device, source=self.source.path,
                                            trust_remote_code=c.trust_remote_code)
        # refinement's automatic step size waits for the windows' length (plan.resolve_refine)
        self.config, _ = resolve(self.config, self.net, streaming=self.streaming, distributed=self.dist is not None,
                                 window=self.calibration.input_ids.shape[-1])
        self.timings["calibration_data"] = time.perf_counter() - start

    def score_original(self):
        """The original model's predictions on held-out text, taken before compression frees its weights."""
        self.original, self.verification = None, None
        why = self.no_verdict_reason()
        if why is not None:
            self.verification = {"skipped": why}
            return
        from ..core.fisher import staged
        from .verify import capture

        self.progress.log(f"verify: scoring {self.calibration.held_out.shape[0]} held-out windows with the "
                          "original model")
        with staged(self.net, self.config.device):
            self.original = capture(self.net, self.calibration.held_out, self.config.device)

    def no_verdict_reason(self):
        """Why this run cannot end with a verdict on held-out text (None when it can)."""
        check = "check with: lowrank eval OUT --baseline MODEL"  # no paths: a resumed run's report is the same
        if not self.config.verify:
            return "--no-verify"
        if self.streaming or self.dist is not None:
            return f"the original model is never whole in memory in a {'streamed' if self.streaming else 'torchrun'} " \
                   f"run; {check}"
        if not (hasattr(self.net, "can_generate") and self.net.can_generate()) or is_encoder_decoder(self.net):
            return "not a causal language model (no next-token perplexity)"
        if self.calibration.held_out is None:
            return f"the calibration text has no window left over for a held-out check; {check}"
        return None

    def verify(self, result):
        """The verdict: the compressed model against the original's predictions (compression/verify.py)."""
        if self.original is None:
            return
        from ..core.fisher import staged
        from .verify import measure, suggest_ratio, warning

        with staged(self.net, self.config.device):
            numbers = measure(self.net, self.original, self.config.device)
        suggested = None
        if numbers["verdict"] != "ok" and self.loss_curve is not None:
            suggested = suggest_ratio(self.config.ratio, numbers["nll_rise"], self.loss_curve)
        numbers["suggested_ratio"] = suggested
        numbers["warning"] = warning(numbers, self.config.ratio, suggested)
        self.verify_seconds = numbers.pop("seconds")
        self.verification = numbers
        if numbers["warning"]:
            self.progress.log(numbers["warning"])

    def open_journal(self):
        """Continue a journaled run (--resume) or discard a stale one; make the writer."""
        self.fingerprint = resume.fingerprint(
            version=__version__, source=self.source.spec, config=self.net.config.to_dict(), dtype=self.dtype,
            settings=self.config.fingerprint_fields(), calibration=resume.tensor_digest(self.calibration.input_ids),
            max_shard_bytes=self.config.max_shard_bytes,
        )
        self.staging = staging_dir(self.output)
        self.journal = None
        if self.config.resume:
            self.journal = resume.check(resume.load(self.staging), self.fingerprint, self.staging)
            if self.journal is None:
                self.progress.log(f"--resume: no interrupted run to continue in {self.staging}; starting from the "
                                  "beginning")
        elif resume.load(self.staging) is not None:
            self.progress.log(f"discarding the partial output of an earlier run in {self.staging} (pass --resume "
                              "to continue it)")
        if self.dist is not None:
            self.dist.barrier()  # every rank has read the journal before rank 0 may start a fresh staging directory
        state = self.journal["writer"] if self.journal else None
        self.writer = (CheckpointWriter(self.output, self.config.max_shard_bytes, state=state,
                                        dtype=torch_dtype(self.dtype)) if self.main else None)
        if self.journal:
            self.layers = [_layer_from_dict(entry) for entry in self.journal["layers"]]
            resume.load_spectra(self.staging, self.journal["blocks_done"], self.layers)
            if self.journal.get("ranks") is not None:  # the allocation of the interrupted run, not recomputed
                self.config = self.config.resolved(ranks=self.journal["ranks"])
                self.loss_curve = resume.load_loss_curve(self.staging)

    def compress(self):
        """The tensors before the blocks, the blocks (compress_model), the tensors after them."""
        blocks_source = None
        if self.streaming:
            from ..io.streaming import StreamingBlocks

            blocks_source = StreamingBlocks(self.skeleton, self.blocks_name, self.before)
        # only what lies outside the blocks: a reference to a block's weights would keep them alive beside the
        # factors
        outside = set(self.before) | set(self.after)
        state = None if self.streaming else {k: v for k, v in self.net.state_dict().items() if k in outside}

        def tensor(name):
            return self.skeleton.load(name) if self.streaming else state[name]

        done = self.journal["blocks_done"] if self.journal else 0
        self.resumed_at = done
        try:
            if self.main and not self.journal:
                for name in self.before:
                    self.writer.add(name, tensor(name))
            result = compress_model(self.net, self.calibration.input_ids, self.config, progress=self.progress,
                                    source=blocks_source, on_block_done=self.block_done, on_planned=self.planned,
                                    resume=Resume(done, self.replay), dist=self.dist)
            if self.main:
                for name in self.after:
                    self.writer.add(name, tensor(name))
        except BaseException as error:
            self.interrupted(error)
        return result

    def interrupted(self, error):
        """Leave nothing behind when nothing is durable yet; else keep the journal and say how to resume."""
        if not self.main:
            raise error
        journal = resume.load(self.staging)
        if journal is None:
            self.writer.abort()
            raise error
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted after block {journal['blocks_done']}; the work so far is kept in "
                              f"{self.staging}: run the same command with --resume to continue") from None
        raise error

    def planned(self, config, loss_curve):
        """The config as compress_model resolved it: with allocated ranks, which the journal must keep, and the
        allocation's loss curve, which a resumed run's verdict needs too."""
        self.config = config
        if loss_curve is not None:
            self.loss_curve = loss_curve
            if self.main:
                resume.save_loss_curve(self.staging, loss_curve)

    def block_done(self, index, block, block_layers):
        """Write a finished block and journal it: from here on it survives a crash."""
        if not self.main:
            return
        prefix = self.prefixes[index]
        for name, value in block.state_dict().items():
            self.writer.add(prefix + name, value)
        self.layers.extend(block_layers)
        resume.save_spectra(self.staging, index, block_layers)
        resume.save(self.staging, {"fingerprint": self.fingerprint, "blocks_done": index + 1,
                                   "writer": self.writer.state(),
                                   "layers": [layer_entry(layer) for layer in self.layers],
                                   "ranks": self.config.ranks})
        self.writer.commit()

    def replay(self, index, block):
        """Rebuild block `index` as the earlier run left it, from the factors already written."""
        staged = resume.StagedTensors(self.staging, self.journal["writer"])
        prefix = self.prefixes[index]
        dtype = next(block.parameters()).dtype
        for layer in self.layers:
            if layer.name.startswith(prefix) and layer.rank is not None:
                rel = layer.name[len(prefix):]
                m, n, has_bias = linear_shape(block.get_submodule(rel))
                replace_module(block, rel, stored_layer(layer, m, n, has_bias, dtype))
        block.load_state_dict({name: staged.get(prefix + name) for name in block.state_dict()}, assign=True)

    def write(self, result):
        """The report, the model card and the rest of the checkpoint; then publish."""
        result.layers = self.layers
        config, requested = result.config, self.requested
        if self.loss_curve is not None and self.loss_curve.speed is not None:  # a --speed-profile's own rows
            config = config.resolved(speed_batch=self.loss_curve.speed.get("rows", 1))
        ranks, sliced, shared = stored_ranks(self.layers)
        block = {
            "format_version": 3 if shared else 2 if sliced else 1,  # an older lowrank refuses what it cannot rebuild
            "tool_version": __version__,
            "method": config.method,
            "ratio": config.ratio,
            "ratio_definition": RATIO_DEFINITION,
            "ranks": ranks,
            **({"sliced": sliced} if sliced else {}),  # per-slice fused layers (modeling_lowrank.py)
            **({"shared": shared} if shared else {}),  # shared-basis experts (compression/shared_basis.py)
            "dense": [layer.name for layer in self.layers if layer.rank is None],
            **({"experts": self.experts} if self.experts else {}),  # unpacked MoE experts (modeling_lowrank.py)
            "base_model": self.source.spec,
            "base_model_type": self.net.config.model_type,
            "base_architectures": [type(self.net).__name__],
            "calibration": self.calibration.provenance,
            "settings": {**config.recorded(), "alloc_requested": requested.alloc},
        }
        params_after = self.params_before - sum(layer.params_before - layer.params_after for layer in self.layers)
        run = {"streamed": self.streaming, "compute_dtype": self.computed_in, "offload_budget_bytes": config.offload_budget,
               "processes": self.dist.world if self.dist else 1, "resumed_at_block": self.resumed_at or None,
               **speed_entry(self.loss_curve, config.ranks)}

        def extra_files(bytes_after, files, seconds):
            """Called once the weights are written: the report, whole, and the files that render it."""
            self.report = build_report(
                result=result, settings=config, calibration=self.calibration.provenance, source=self.source,
                model_params_before=self.params_before, model_params_after=params_after,
                bytes_dense=self.params_before * self.element_size, bytes_after=bytes_after, files=files,
                dtype=self.dtype, command=self.command or invocation(),
                timings={**self.timings, **result.timings, **self.verify_timing(), "write_weights": seconds}, run=run,
                input_bytes=self.input_bytes(), verify=self.verification, coverage=self.coverage,
                fused=slice_ranks(self.fused, self.layers),
            )
            extra = {
                "compression_report.json": json.dumps(self.report, indent=2) + "\n",
                "compression_report.md": compression_markdown(self.report),
                "README.md": model_card(self.report, self.output, architecture=type(self.net).__name__),
            }
            spectra = spectra_bytes(self.layers)  # optional: read by `lowrank report --plot`
            if spectra is not None:
                extra[SPECTRA_FILE] = spectra
            return extra

        self.writer.finish(self.net, source=self.source, tokenizer=self.tokenizer, block=block,
                           extra_files=extra_files)
        return self.report

    def verify_timing(self):
        return {"verify": self.verify_seconds} if getattr(self, "verify_seconds", None) is not None else {}

    def input_bytes(self):
        """The size of a quantized input file (GGUF), which the dequantized output is compared with."""
        if self.source.kind != "gguf":
            return None
        return os.path.getsize(os.path.join(self.source.path, self.source.gguf_file))


def _layer_from_dict(entry):
    return LayerResult(entry["name"], entry["shape"][0], entry["shape"][1], entry["rank"], entry["params_before"],
                       entry["params_after"], entry["energy_kept"], entry["predicted_energy_kept"],
                       entry["rel_error"], dense_reason=entry.get("dense_reason"), info=entry.get("info", {}))
