"""`CompressConfig`: every option of `lowrank compress`, its default and its validation, in one place.

The CLI maps its options onto this dataclass (its defaults are read from here), the Python API takes it (or the
same names as keyword arguments), the resume journal fingerprints it and the report records it. A config is
checked when it is made, before any model is loaded, so a bad option costs nothing.

Some fields start as a request and are resolved once the model is known (`resolved()`): `alloc="auto"` becomes
the allocation that applies, `device="auto"` a device, `offload_budget` a byte count, `ranks` the allocated
ranks. The engine only ever sees a resolved config.
"""

import re
from dataclasses import asdict, dataclass, fields, replace

from ..errors import UsageError
from ..methods import METHODS, Method, get_method
from ..units import parse_size
from ..validation import check_calibration, check_int, check_number
from .fused import FUSED_MODES

ALLOCATIONS = ("auto", "uniform", "global", "fisher", "sensitivity")
STREAM_MODES = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", "float32")
REFINE_TARGETS = ("block", "model")  # refinement fits the original block's outputs on the compressed stream, or the
# original model's outputs at this depth (sequential.WalkOptions)
EXPERT_MODES = ("per-expert", "shared-basis")  # MoE expert matrices: own factors, or a basis per layer (shared_basis.py)
MAX_SPEED_BATCH = 256  # --speed-batch: rows of a decode step; beyond this it is a prefill, which is not timed
# Options that change how a run is carried out, not what it writes: left out of the resume fingerprint.
RUN_ONLY = ("device", "offload_budget", "offload_dir", "overwrite", "resume", "trust_remote_code", "verify")


@dataclass
class CompressConfig:
    """What to compress and how. `ratio` is the fraction of the targeted layers' parameters that is kept."""

    ratio: float = 0.5
    method: str = "whiten"
    targets: list[str] | None = None  # globs, re:REGEX or name suffixes; None: every linear in the blocks
    ignore: list[str] | None = None
    ranks: dict[str, int | None] | None = None  # explicit {module name: rank (None: dense)}, overriding the ratio
    blocks: str | None = None  # the ModuleList(s) of blocks to compress (dotted path, commas between); None: default

    # calibration
    calib: str = "auto"  # auto | self | hub dataset NAME[:CONFIG] | local file or folder
    num_samples: int = 128
    seq_len: int | None = None  # None: 2048, or the model's maximum when shorter
    text_column: str = "text"
    calib_split: str = "train"
    seed: int = 0

    # the decomposition and what surrounds it
    propagate: bool = True  # calibrate each block on the outputs of the compressed blocks before it
    alloc: str = "auto"  # see ALLOCATIONS and compression/plan.py
    experts: str = "per-expert"  # MoE: each expert matrix its own factors, or shared-basis (shared_basis.py)
    fused: str = "auto"  # fused projections (qkv_proj, ...): whole, per slice, or auto (fused.py: per slice for
    # global/fisher ranks, whole under uniform and sensitivity, as measured)
    min_rank_fraction: float = 0.1  # global/fisher: every matrix keeps this share of its break-even rank
    anchor: bool = False  # fit W' x' to the ORIGINAL model's outputs W x (needs propagation)
    refit: bool = False  # after truncation, refit `up` by least squares to the original outputs
    refine_steps: int | None = None  # Adam steps per block on its factors against its original outputs; None:
    # auto (plan.resolve_refine: 6 batches' worth of windows with --method whiten in one process, as measured)
    refine_lr: float = 6e-4  # measured with the spectra from every window (BENCHMARKS.md, "Spectra from every window")
    refine_target: str = "model"  # see REFINE_TARGETS; model: measured better (BENCHMARKS.md, "Refinement steps")
    refine_batch: int | None = None  # windows per refinement step (refine.py); None: auto (plan.resolve_refine)
    speed_aware: bool = False  # no factorized rank above the measured speed break-even (core/speed.py)
    speed_profile: str | None = None  # the timings of an earlier --speed-aware run (its report), not new ones
    speed_batch: int = 1  # --speed-aware times products of this many rows (a decode step at this batch)
    damp: float = 1e-4  # whiten: damping relative to mean(diag G)
    alpha: float = 0.5  # asvd: exponent of the activation scale

    # how the run is carried out
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # the checkpoint's, or float32 | bfloat16 | float16
    compute_dtype: str = "auto"  # auto: the output dtype (a GGUF: float32) | float32 (see plan.compute_dtype)
    stream: str = "auto"  # on | off | auto (when the weights exceed a quarter of this machine's memory)
    offload_budget: int | str | None = "auto"  # bytes of hidden states per stream (and of a MoE block's statistics)
    offload_dir: str | None = None
    max_shard_size: int | str = "5GB"
    overwrite: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    verify: bool = True  # end with a verdict on held-out text: perplexity, top-1 agreement, KL (verify.py)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise UsageError (one line, exit code 2) for the first option that cannot work."""
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise UsageError(f"--ratio must be in (0, 1] (the fraction of parameters kept), got {self.ratio}")
        method = get_method(self.method)
        if self.alloc not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.alloc!r}; choose {', '.join(ALLOCATIONS)}")
        if self.fused not in FUSED_MODES:
            raise UsageError(f"--fused must be one of {', '.join(FUSED_MODES)}, got {self.fused!r}")
        if self.fused == "slices" and self.alloc == "sensitivity":
            raise UsageError("--alloc sensitivity measures whole layers, so it cannot rank the slices of a fused "
                             "projection: use --fused whole (or auto), or --alloc fisher, global or uniform")
        self._validate_experts(method)
        if self.speed_profile is not None and not self.speed_aware:
            raise UsageError("--speed-profile gives --speed-aware its timings: pass --speed-aware too")
        check_int("--speed-batch", self.speed_batch, 1)
        if self.speed_batch > MAX_SPEED_BATCH:
            raise UsageError(f"--speed-batch is a decode step's batch, at most {MAX_SPEED_BATCH} rows, got "
                             f"{self.speed_batch}")
        if self.speed_batch != 1 and not self.speed_aware:
            raise UsageError("--speed-batch sets the rows --speed-aware times: pass --speed-aware too")
        if self.speed_aware and self.alloc in ("uniform", "sensitivity"):
            raise UsageError(f"--speed-aware caps the ranks --alloc fisher or global chooses; --alloc {self.alloc} "
                             "has no such choice: use --alloc auto, fisher or global")
        if self.stream not in STREAM_MODES:
            raise UsageError(f"--stream must be auto, on or off, got {self.stream!r}")
        if (self.anchor or self.refit) and not method.whitened:
            raise UsageError("anchored fitting and refit are defined for --method whiten")
        if self.anchor and not self.propagate:
            raise UsageError("anchored fitting compares the compressed stream with the original one: it needs "
                             "propagation")
        path = r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*"  # several stacks: comma-separated, in the order the model runs them
        if self.blocks is not None and not (isinstance(self.blocks, str)
                                            and re.fullmatch(rf"{path}(,{path})*", self.blocks)):
            raise UsageError(f"--blocks must be a dotted module path such as model.layers, got {self.blocks!r}")
        check_calibration(self.num_samples, self.seq_len, self.batch_size)
        if self.refine_steps is not None:
            check_int("--refine-steps", self.refine_steps, 0)
        check_number("--damp", self.damp, 0)
        check_number("--alpha", self.alpha)
        check_number("--refine-lr", self.refine_lr, 0, strict=True)
        if self.refine_batch is not None:
            check_int("--refine-batch", self.refine_batch, 1)
            if self.refine_batch > self.batch_size:
                raise UsageError(f"--refine-batch ({self.refine_batch}) cannot exceed --batch-size "
                                 f"({self.batch_size}): a refinement step reads part of one batch")
        if self.refine_target not in REFINE_TARGETS:
            raise UsageError(f"--refine-target must be one of {', '.join(REFINE_TARGETS)}, got {self.refine_target!r}")
        if not (isinstance(self.min_rank_fraction, (int, float)) and 0 <= self.min_rank_fraction <= 1):
            raise UsageError(f"--min-rank-fraction must be in [0, 1], got {self.min_rank_fraction}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UsageError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.max_shard_bytes < 1:
            raise UsageError(f"--max-shard-size must be at least one byte, got {self.max_shard_size!r}")
        self.offload_bytes  # noqa: B018  (parses, or raises UsageError)

    def _validate_experts(self, method) -> None:
        if self.experts not in EXPERT_MODES:
            raise UsageError(f"--experts must be one of {', '.join(EXPERT_MODES)}, got {self.experts!r}")
        if self.experts == "per-expert":
            return
        unsupported = [flag for flag, on in (("--method " + self.method, self.method != "whiten"),
                                             ("--stream on", self.stream == "on"), ("--resume", self.resume),
                                             ("--refine-steps", (self.refine_steps or 0) > 0)) if on]
        if unsupported:
            raise UsageError(f"--experts shared-basis is not supported with {unsupported[0]} (it takes --method "
                             "whiten, in memory, without --resume or --refine-steps)")

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    @property
    def offload_bytes(self) -> int | None:
        """--offload-budget in bytes: None never spills, "auto" is a quarter of this machine's memory."""
        budget = self.offload_budget
        if budget is None or (isinstance(budget, str) and budget.lower() == "none"):
            return None
        if isinstance(budget, int):
            return budget
        if budget == "auto":
            return memory_bytes() // 4
        return parse_size(budget)

    def whole_model_reason(self) -> str | None:
        """Why this run needs the whole model in one process (None when it does not): the one place that says so.
        Streaming and torchrun hold one block at a time or split the batches."""
        if self.method_spec.gradients:
            return f"--method {self.method} needs backward passes over the whole model"
        if self.alloc in ("fisher", "sensitivity"):
            return f"--alloc {self.alloc} needs the whole model"
        return None

    def fingerprint_fields(self) -> dict:
        """What the resume journal compares: every field that changes the bytes written."""
        return {k: v for k, v in asdict(self).items()
                if k not in RUN_ONLY and not (k == "speed_batch" and v == 1)}  # (so journals from before it match)

    def recorded(self) -> dict:
        """The settings block of the checkpoint's config.json (names and order are part of the format)."""
        return {"propagate": self.propagate, "alloc": self.alloc, "anchor": self.anchor, "refit": self.refit,
                "refine_steps": self.refine_steps, "damp": self.damp, "alpha": self.alpha, "targets": self.targets,
                "ignore": self.ignore,
                "fused": self.fused, **({"experts": self.experts} if self.experts != "per-expert" else {}),
                **({"speed_aware": True} if self.speed_aware else {}),
                **({"speed_batch": self.speed_batch} if self.speed_batch != 1 else {}),
                **({"refine_target": self.refine_target, "refine_batch": self.refine_batch} if self.refine_steps
                   else {})}

    def resolved(self, **values) -> "CompressConfig":
        """A copy with request fields replaced by what they resolved to (alloc, device, ranks, ...)."""
        return replace(self, **values)

    @classmethod
    def from_options(cls, **options) -> "CompressConfig":
        """A config from keyword options, refusing unknown names with one line (a typo must not be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown compress option(s): {', '.join(unknown)}")
        return cls(**options)


# Each option's default, for front ends: the CLI's option defaults are read from here, so each is written once.
DEFAULTS = {f.name: f.default for f in fields(CompressConfig)}


def memory_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
