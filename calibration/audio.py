"""Calibration for speech models (Whisper): windows of audio, and the decoder's own transcription of each.

A model that reads `input_features` (log-mel spectra) cannot be calibrated with text: `--calib` then names a
folder of audio files (or one file). The clips are read in name order, mixed down to mono, resampled to the
feature extractor's rate and joined into one stream, which is cut into consecutive windows of the extractor's
length (30 s for Whisper, the length it was trained on and always reads); `num_samples` windows are drawn with
`seed`, as text windows are. The encoder reads their features. The decoder reads what it will read when the
model runs: its own greedy transcription of each window (`model.generate`, so the model's own prompt, language
and task tokens), `seq_len` tokens of it, teacher-forced. A transcription that would end sooner continues with
its end-of-text suppressed (`min_new_tokens`), so no padding enters the statistics; the provenance counts those
windows. Reference transcripts are not used: the model's own text is what its decoder reads in service.
"""

import hashlib
import os
import wave
from dataclasses import dataclass

import numpy as np
import torch

from lowrank.errors import LowrankError, UsageError
from lowrank.progress import SILENT, ticker

SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
DEFAULT_TOKENS = 64  # decoder tokens per window: about what 30 s of speech transcribes to (~100), never padded


@dataclass
class AudioWindows:
    """Calibration windows of a speech model, with the part of a token tensor's interface the block walk uses
    (`shape`, `split`, `numel`, indexing by batch): the walk batches them as it batches token ids."""

    input_features: torch.Tensor  # [windows, mel bins, frames], float32
    decoder_input_ids: torch.Tensor  # [windows, seq_len], int64

    @property
    def shape(self):
        return self.decoder_input_ids.shape

    def split(self, size):
        return [AudioWindows(f, d) for f, d in zip(self.input_features.split(size),
                                                    self.decoder_input_ids.split(size))]

    def numel(self):
        return self.decoder_input_ids.numel()

    def to(self, device):
        return AudioWindows(self.input_features.to(device), self.decoder_input_ids.to(device))

    def inputs(self, dtype):
        """The model's forward arguments, the features in the model's `dtype`."""
        return {"input_features": self.input_features.to(dtype), "decoder_input_ids": self.decoder_input_ids}

    def digest(self):
        """sha256 over both tensors: what the resume journal checks."""
        hasher = hashlib.sha256(self.input_features.contiguous().numpy().tobytes())
        hasher.update(self.decoder_input_ids.contiguous().numpy().tobytes())
        return hasher.hexdigest()


def reads_audio(model):
    return getattr(model, "main_input_name", "input_ids") == "input_features"


def audio_files(spec):
    """The audio files `spec` names (a file, or a folder's files in name order), or [] if it names none."""
    path = os.path.expanduser(spec) if isinstance(spec, str) else ""
    if os.path.isfile(path):
        return [path] if path.lower().endswith(SUFFIXES) else []
    if not os.path.isdir(path):
        return []
    return [os.path.join(path, name) for name in sorted(os.listdir(path)) if name.lower().endswith(SUFFIXES)]


def read_audio(path):
    """(mono float32 samples in [-1, 1], sample rate). PCM .wav with the standard library; other formats with
    the soundfile package when it is installed."""
    if path.lower().endswith(".wav"):
        try:
            with wave.open(path, "rb") as f:
                width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
                raw = f.readframes(f.getnframes())
        except (wave.Error, EOFError) as error:  # e.g. a float .wav: the wave module reads PCM only
            return _read_with_soundfile(path, str(error))
        if width == 3:  # 24-bit: widen each sample to 32 bits
            raw = np.frombuffer(raw, np.uint8).reshape(-1, 3)
            raw = np.pad(raw, ((0, 0), (1, 0))).tobytes()
            width = 4
        kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        samples = np.frombuffer(raw, kind).astype(np.float64)
        samples = (samples - 128) / 128 if width == 1 else samples / float(np.iinfo(kind).max + 1)
        return samples.reshape(-1, channels).mean(axis=1).astype(np.float32), rate
    return _read_with_soundfile(path, None)


def _read_with_soundfile(path, why):
    try:
        import soundfile
    except ImportError:
        reason = f" ({why})" if why else ""
        raise UsageError(f"cannot read {path}{reason}: reading it needs the soundfile package (pip install "
                         "soundfile), or convert it to 16-bit PCM .wav") from None
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except RuntimeError as error:  # soundfile's LibsndfileError
        raise LowrankError(f"cannot read {path}: {error}") from None
    return samples.mean(axis=1).astype(np.float32), rate


def resample(samples, rate, target):
    """`samples` at `rate` resampled to `target` Hz, band-limited (by the discrete Fourier transform: the
    spectrum is cut or zero-padded), which is what the log-mel features want: no aliasing above target / 2."""
    if rate == target:
        return samples
    count = round(len(samples) * target / rate)
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spectrum), count // 2 + 1)
    return (np.fft.irfft(spectrum[:keep], count) * count / len(samples)).astype(np.float32)


def load_feature_extractor(path, trust_remote_code=False):
    """The model's feature extractor (preprocessor_config.json), which turns audio into its input features."""
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"this model reads audio, and its feature extractor (preprocessor_config.json) could not be "
                         f"loaded from {path}: {str(error).strip().splitlines()[0]}") from None


def load_audio_calibration(spec, model, extractor, num_samples, seq_len=None, seed=0, progress=SILENT, device=None):
    """`num_samples` windows of the audio `spec` names, with the decoder's transcription of each, and their
    provenance: (AudioWindows, provenance)."""
    files = audio_files(spec)
    if not files:
        raise UsageError(f"this model reads audio (input_features): --calib must name an audio file or a folder of "
                         f"them ({', '.join(SUFFIXES)}), and {spec!r} holds none")
    limit = getattr(model.config, "max_target_positions", None)
    seq_len = seq_len or min(DEFAULT_TOKENS, limit or DEFAULT_TOKENS)
    if num_samples < 1 or seq_len < 2:
        raise UsageError("--num-samples must be at least 1 and --seq-len at least 2")
    if limit and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} exceeds the decoder's maximum of {limit} positions")
    rate, length = extractor.sampling_rate, extractor.n_samples
    stream = np.concatenate([resample(*read_audio(path), rate) for path in files])
    available = len(stream) // length
    if available < num_samples:
        raise LowrankError(f"calibration audio {spec!r} lasts {len(stream) / rate:,.1f} s, but --num-samples "
                           f"{num_samples} windows of {length / rate:g} s need {num_samples * length / rate:,.0f} s; "
                           "use fewer samples or more audio")
    windows = stream[: available * length].reshape(available, length)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    chosen = [windows[i] for i in order.tolist()]
    features = extractor(chosen, sampling_rate=rate, return_tensors="pt")["input_features"].float()
    ids, suppressed = transcribe(model, features, seq_len, device, progress)
    provenance = {"source": spec, "kind": "audio", "files": len(files), "seconds": round(len(stream) / rate, 2),
                  "sampling_rate": rate, "window_seconds": length / rate, "num_samples": num_samples,
                  "seq_len": seq_len, "seed": seed, "tokens": num_samples * seq_len,
                  "sha256_audio": hashlib.sha256(stream.tobytes()).hexdigest(),
                  "decoder_input": "the model's own greedy transcription of each window",
                  "end_of_text_suppressed": suppressed,
                  "windows": "non-overlapping, drawn at random with seed"}
    return AudioWindows(features.contiguous(), ids.contiguous()), provenance


@torch.no_grad()
def transcribe(model, features, seq_len, device=None, progress=SILENT, batch_size=4):
    """The first `seq_len` tokens the decoder reads while transcribing each window greedily (its prompt, then
    its own output), with end-of-text suppressed until there are enough; and how many windows needed that."""
    import transformers

    from lowrank.core.fisher import staged

    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = features.split(batch_size)
    tick = ticker(progress, "transcribing the calibration audio", len(batches),
                  lambda done: f"{done}/{len(batches)} batches")
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos], dtype=torch.long)
    rows, suppressed = [], 0
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # generate's notes on its own defaults are not the user's business
    try:
        with staged(model, device):
            for batch in batches:
                out = model.generate(input_features=batch.to(device, dtype), max_new_tokens=seq_len,
                                     min_new_tokens=seq_len, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
                # a window whose own top token was end-of-text at some step: its transcription ran on, suppressed
                top = torch.stack(out.logits, dim=1).argmax(-1)[:, :seq_len].cpu()
                suppressed += int(torch.isin(top, eos).any(dim=1).sum())
                rows.append(out.sequences[:, :seq_len].cpu())
                tick()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return torch.cat(rows), suppressed
