"""The verdict at the end of `compress`: the compressed model against the original on held-out text.

The calibration error of each layer says little about the model as a whole: SmolLM2 at keep 0.5 had small
per-layer errors and a held-out perplexity of 420 against 20. So every compress ends with a check on text the
calibration did not use (calibration windows set aside by the same draw, or further rows of the same
self-generated batch): perplexity before and after, top-1 agreement and KL(original || compressed) per token.

The original model is gone by the time the compressed one exists (each weight is freed as its factors replace
it), so its predictions are captured first: per position the target's log-probability and the top-K
log-probabilities (K = TOP_K). The KL is then that of the two distributions coarsened to the original's top K
tokens plus one bucket for the rest, a lower bound on the full KL (data processing), tight when the top K hold
nearly all the mass; `lowrank eval OUT --baseline MODEL` measures the full one.
"""

import math
import time
from dataclasses import dataclass

import torch

TOP_K = 64
# The verdict: "damaged" at either limit, "degraded" at either softer one, else "ok".
DAMAGED = {"top1": 0.5, "perplexity_ratio": 3.0}
DEGRADED = {"top1": 0.75, "perplexity_ratio": 1.5}
ACCEPTABLE_NLL_RISE = math.log(DEGRADED["perplexity_ratio"])  # what a suggested ratio aims for


@dataclass
class Reference:
    """What the original model predicted on the held-out windows."""

    windows: torch.Tensor  # [k, T] token ids
    target_logp: torch.Tensor  # [k, T-1] float64: log p(next token)
    top_ids: torch.Tensor  # [k, T-1, K]
    top_logp: torch.Tensor  # [k, T-1, K] float32
    seconds: float


def _logprobs(model, ids, device):
    return torch.log_softmax(model(input_ids=ids.to(device)).logits[:, :-1].float(), dim=-1).cpu()


@torch.no_grad()
def capture(model, windows, device="cpu", batch_size=4):
    """Run the original model over `windows` and keep what the verdict needs (a few MB, not the logits)."""
    start = time.perf_counter()
    targets, top_ids, top_logp = [], [], []
    for batch in windows.split(batch_size):
        logp = _logprobs(model, batch, device)
        targets.append(logp.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1).double())
        values, indices = logp.topk(min(TOP_K, logp.shape[-1]), dim=-1)
        top_ids.append(indices)
        top_logp.append(values)
    return Reference(windows, torch.cat(targets), torch.cat(top_ids), torch.cat(top_logp),
                     time.perf_counter() - start)


def _rest(logp):
    """log(1 - sum(exp(logp))) over the last dimension, kept finite when the top K hold all the mass."""
    return torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-7))


@torch.no_grad()
def measure(model, reference, device="cpu", batch_size=4):
    """Perplexity of both models, top-1 agreement and KL on the reference's windows: the report's "verify"."""
    start = time.perf_counter()
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    rows = 0
    for batch in reference.windows.split(batch_size):
        part = slice(rows, rows + batch.shape[0])
        rows += batch.shape[0]
        logp = _logprobs(model, batch, device)
        nll -= float(logp.gather(-1, batch[:, 1:].unsqueeze(-1)).sum(dtype=torch.float64))
        p_top = reference.top_logp[part]
        q_top = logp.gather(-1, reference.top_ids[part])
        p_rest, q_rest = _rest(p_top), _rest(q_top)
        terms = (p_top.exp() * (p_top - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
        kl += float(terms.sum(dtype=torch.float64))
        agree += int((logp.argmax(-1) == reference.top_ids[part][..., 0]).sum())
        count += batch[:, 1:].numel()
    before, after = -float(reference.target_logp.sum()) / count, nll / count
    result = {
        "windows": int(reference.windows.shape[0]), "seq_len": int(reference.windows.shape[1]),
        "tokens_scored": count,
        "perplexity_original": math.exp(before), "perplexity_compressed": math.exp(after),
        "perplexity_ratio": math.exp(after - before), "nll_rise": after - before,
        "top1_agreement": agree / count, "kl_mean": max(kl / count, 0.0),
        "kl_definition": f"KL(original || compressed) per token over the original's top {TOP_K} tokens plus the "
                         "rest (a lower bound on the full KL)",
        "seconds": reference.seconds + time.perf_counter() - start,
    }
    result["verdict"] = verdict(result)
    return result


def verdict(numbers):
    """"damaged", "degraded" or "ok" from top-1 agreement and the perplexity ratio (limits above)."""
    def beyond(limits):
        return numbers["top1_agreement"] < limits["top1"] or numbers["perplexity_ratio"] > limits["perplexity_ratio"]

    return "damaged" if beyond(DAMAGED) else "degraded" if beyond(DEGRADED) else "ok"


def suggest_ratio(ratio, nll_rise, predicted_loss):
    """A --ratio likely to stay within ACCEPTABLE_NLL_RISE, or None. `predicted_loss(r)` is the allocation's loss
    estimate at ratio r (the Fisher- or energy-weighted sum of the dropped components); the measured rise at
    `ratio` scales it to nats, assuming the rise is proportional to the estimate (second order; at heavy damage
    the true curve is steeper, so the suggestion errs towards keeping more)."""
    here = predicted_loss(ratio)
    if not here > 0 or not nll_rise > 0:
        return None
    scale = nll_rise / here
    candidate = round(math.floor(ratio * 20 + 1e-9) / 20 + 0.05, 2)
    while candidate < 1.0:
        if scale * predicted_loss(candidate) <= ACCEPTABLE_NLL_RISE:
            return candidate
        candidate = round(candidate + 0.05, 2)
    return None


def warning(numbers, ratio, suggested):
    """The line a damaged or degraded model gets, or None."""
    if numbers["verdict"] == "ok":
        return None
    what = (f"held-out perplexity {numbers['perplexity_original']:.1f} -> {numbers['perplexity_compressed']:.1f} "
            f"({numbers['perplexity_ratio']:.2f}x), top-1 agreement {numbers['top1_agreement']:.0%}")
    advice = (f"--ratio {suggested:g} is likely acceptable (from the allocation's loss curve)" if suggested else
              "keep more parameters (a larger --ratio) or calibrate on more text")
    head = "the compressed model is badly damaged" if numbers["verdict"] == "damaged" else "quality dropped"
    return f"warning: {head} at --ratio {ratio:g}: {what}; {advice}"
