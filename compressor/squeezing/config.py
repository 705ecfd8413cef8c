"""`SqueezeConfig`: every option of `lowrank squeeze`, its default and its validation, in one place.

The CLI maps its options onto this dataclass (its defaults are read from `DEFAULTS`), and `lowrank.squeeze` takes
it (or the same names as keyword arguments). A config is checked when it is made, before any file is opened, so a
bad option costs nothing. Imports no torch: the CLI reads it at start-up.
"""

import os
from dataclasses import dataclass, fields

from ..errors import UsageError
from .ranks import parse_budget

ALGORITHMS = ("exact", "rsvd")
POLICIES = ("keep-scale", "unit", "keep-alpha")
DTYPES = ("auto", "float32", "bfloat16", "float16")
POLICY_TEXT = {
    "keep-scale": "every module keeps the adapter's scale (alpha / r, or alpha / sqrt(r) for rsLoRA; kohya "
                  "modules their own): alpha' = scale·k (scale·sqrt(k) for rsLoRA)",
    "unit": "scale 1 everywhere (alpha' = k, use_rslora off): the scaling is baked into the factors",
    "keep-alpha": "every module keeps its alpha, so its scale becomes alpha / k",
}
ANALYZE_WRITES_NOTHING = "--analyze writes nothing; drop -o/--output and --overwrite"


@dataclass
class SqueezeConfig:
    """How to squeeze an adapter (or extract one from `finetuned` - `base_model`). Exactly one rank rule: `rank`
    (uniform), `energy` (per module, the fraction of sum sigma^2 kept) or `budget` (global: a fraction of the
    source's LoRA parameters, or a count such as "2M"); or none with `analyze=True`, which only reports."""

    # the rank rule
    rank: int | None = None
    energy: float | None = None
    budget: str | float | None = None
    analyze: bool = False
    max_rank: int | None = None  # a cap for --energy and --budget (and the randomized SVD's size when extracting)
    min_rank: int = 1  # a floor for --energy and --budget
    min_energy: float | None = None  # --budget: every module first gets the rank that keeps this energy
    allow_pad: bool = False  # --rank above a module's source rank pads with zeros

    # the decomposition
    algorithm: str | None = None  # None: exact for an adapter, rsvd when extracting (see svd_algorithm)
    oversample: int = 10  # rsvd only
    power_iters: int = 2  # rsvd only
    seed: int = 0  # rsvd only
    threads: int | None = None  # modules decomposed at once; None: the CPU count, at most 8 (see thread_count)

    # scaling, DoRA and extraction
    alpha_policy: str | None = None  # None: keep-scale for an adapter, unit when extracting (see scale_policy)
    base_model: str | None = None  # DoRA: measures the true error; with finetuned: the base of the extraction
    finetuned: str | None = None  # extract a LoRA from the dense difference finetuned - base_model

    # the output
    dtype: str = "auto"  # of the new factors: auto is the input's
    overwrite: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        threads = self.threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"--threads must be a whole number >= 1, got {threads}")
        self._check_rule()
        self._check_options()
        if self.analyze and self.overwrite:
            raise UsageError(ANALYZE_WRITES_NOTHING)
        if self.analyze and self.base_model is not None and not self.extracting:
            raise UsageError("--base-model measures DoRA's true error while writing; --analyze writes nothing")
        if self.extracting and self.base_model is None:
            raise UsageError("--finetuned needs --base-model: the LoRA is extracted from their difference")

    def _check_rule(self):
        rules = [name for name in ("rank", "energy", "budget") if getattr(self, name) is not None]
        if len(rules) > 1:
            raise UsageError(f"choose one rank rule: --{rules[0]} or --{rules[1]}, not both")
        if not rules and not self.analyze:
            raise UsageError("give a rank rule: --rank K, --energy E or --budget B (or --analyze to only look)")
        rule, max_rank, min_rank, min_energy = self.rule, self.max_rank, self.min_rank, self.min_energy
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.budget is not None:
            check_budget(self.budget)
        if self.energy is not None and not 0 < self.energy <= 1:
            raise UsageError(f"--energy must be in (0, 1] (the fraction of sum sigma^2 kept), got {self.energy}")
        if max_rank is not None and max_rank < 1:
            raise UsageError(f"--max-rank must be at least 1, got {max_rank}")
        if min_rank < 1:
            raise UsageError(f"--min-rank must be at least 1, got {min_rank}")
        if max_rank is not None and min_rank > max_rank:
            raise UsageError(f"--min-rank {min_rank} is above --max-rank {max_rank}")
        if min_energy is not None and not 0 < min_energy <= 1:
            raise UsageError(f"--min-energy must be in (0, 1], got {min_energy}")
        # flags that would silently do nothing are refused (users of other tools lose hours to that)
        if rule == "rank" and max_rank is not None:
            raise UsageError("--max-rank caps --energy and --budget; with --rank K it does nothing (use --rank alone)")
        if rule != "budget" and min_energy is not None:
            raise UsageError("--min-energy is a floor for --budget; with other rules it does nothing")
        if rule not in ("energy", "budget") and min_rank != 1:
            raise UsageError("--min-rank is a floor for --energy and --budget; with other rules it does nothing")
        if self.allow_pad and rule != "rank":
            raise UsageError("--allow-pad only applies to --rank (the other rules never exceed the source rank)")

    def _check_options(self):
        algorithm, alpha_policy = self.svd_algorithm, self.alpha_policy
        if algorithm not in ALGORITHMS:
            raise UsageError(f"unknown algorithm {algorithm!r}; choose exact or rsvd")
        if algorithm != "rsvd" and (self.oversample != DEFAULTS["oversample"]
                                    or self.power_iters != DEFAULTS["power_iters"]):
            raise UsageError("--oversample and --power-iters only apply to --algorithm rsvd")
        if self.oversample < 0 or self.power_iters < 0:
            raise UsageError("--oversample and --power-iters must be >= 0")
        if alpha_policy is not None and alpha_policy not in POLICIES:
            raise UsageError(f"unknown alpha policy {alpha_policy!r}; choose {', '.join(POLICIES)}")
        if self.extracting and alpha_policy not in (None, "unit"):
            raise UsageError("an extracted LoRA has no source scale to keep: it uses --alpha-policy unit (alpha = r)")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPES)}")
        if self.extracting and self.rule != "rank" and self.max_rank is None:
            raise UsageError("extracting from a dense delta needs --rank K or --max-rank R (the randomized SVD's "
                             "target size)")

    @property
    def extracting(self) -> bool:
        """A LoRA is extracted from the dense difference finetuned - base_model, rather than an adapter squeezed."""
        return self.finetuned is not None

    @property
    def rule(self) -> str | None:
        """rank | energy | budget, or None (analysis only)."""
        return next((name for name in ("rank", "energy", "budget") if getattr(self, name) is not None), None)

    @property
    def svd_algorithm(self) -> str:
        """`algorithm`, or its default: exact on an adapter's factors, rsvd on a dense delta."""
        return self.algorithm or ("rsvd" if self.extracting else "exact")

    @property
    def scale_policy(self) -> str:
        """`alpha_policy`, or its default: keep-scale; unit for an extracted LoRA, which has no scale to keep."""
        return self.alpha_policy or ("unit" if self.extracting else "keep-scale")

    @property
    def thread_count(self) -> int:
        """`threads`, or its default: the CPU count, at most 8."""
        return self.threads if self.threads is not None else min(os.cpu_count() or 1, 8)


def check_budget(budget):
    """--budget's form, before any module is decomposed: a fraction in (0, 1] or a count such as 2M or 1500. The
    count a fraction stands for is resolved once the adapter is read (plan.with_budget)."""
    parse_budget(budget, 1)  # raises for anything else
    # a count must keep something: resolved against any source size, a fraction keeps at least one parameter
    if parse_budget(budget, 10**15) < 1:
        raise UsageError(f"--budget {budget} keeps no parameters; give a fraction like 0.25 or a count like 2M")


# Each option's default, for front ends: the CLI's option defaults are read from here, so each is written once.
DEFAULTS = {f.name: f.default for f in fields(SqueezeConfig)}
