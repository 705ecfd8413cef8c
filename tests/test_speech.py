"""Speech models (Whisper, issue 16 item 5): calibration from audio files (calibration/audio.py). The audio is
read and resampled correctly, the decoder reads the model's own greedy transcription (checked against a greedy
loop written out here), the CLI compresses a tiny Whisper from a folder of .wav clips into an output that loads
and transcribes where lowrank is not imported, and every wrong input is one line. The architecture matrix
(test_architectures.py) runs Whisper's full-rank, fresh-process, cache, LoRA and densify checks."""

import json
import os
import wave

import archs
import numpy as np
import pytest
import torch
from conftest import run

from lowrank.calibration.audio import AudioWindows, load_audio_calibration, read_audio, resample


def _write_wav(path, samples, rate, width, channels=1):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_wav_is_read_at_every_sample_width(tmp_path, width):
    """8-bit (unsigned), 16-, 24- and 32-bit PCM, stereo mixed down to mono: the samples come back as floats in
    [-1, 1] to within one step of the format (or float32's resolution, for 32 bits)."""
    rate, values = 8000, np.array([0.0, 0.5, -0.5, 0.25, -0.75, 0.999])
    left, right = values, -values / 2
    bits = 8 * width
    if width == 1:
        ints = [np.round(v * 127 + 128).astype(np.uint8) for v in (left, right)]
    else:
        ints = [np.round(v * (2 ** (bits - 1) - 1)).astype(np.int64) for v in (left, right)]
    frames = np.stack(ints, axis=1).reshape(-1)
    if width == 3:
        raw = frames.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].copy()
    else:
        raw = frames.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width])
    _write_wav(tmp_path / "x.wav", raw, rate, width, channels=2)
    samples, got_rate = read_audio(str(tmp_path / "x.wav"))
    assert got_rate == rate and samples.dtype == np.float32
    assert np.abs(samples - (left + right) / 2).max() <= max(1.5 / 2 ** (bits - 1), 1e-7)


def test_resampling_is_band_limited():
    """A 440 Hz tone at 8 kHz resampled to 16 kHz is the same tone sampled at 16 kHz (a whole number of periods,
    so the discrete Fourier transform's resampling is exact); and a 6 kHz tone, above 4 kHz, is removed when
    going down to 8 kHz instead of folding back as an alias."""
    t8, t16 = np.arange(8000) / 8000, np.arange(16000) / 16000
    up = resample(np.sin(2 * np.pi * 440 * t8).astype(np.float32), 8000, 16000)
    assert up.shape == (16000,) and np.abs(up - np.sin(2 * np.pi * 440 * t16)).max() < 1e-4
    down = resample(np.sin(2 * np.pi * 6000 * t16).astype(np.float32), 16000, 8000)
    assert down.shape == (8000,) and np.abs(down).max() < 1e-4


@pytest.fixture(scope="module")
def whisper(tmp_path_factory, tokenizer):
    """The tiny random Whisper of the matrix saved with its feature extractor, and a folder of speech-like clips
    (13.2 s at 8 kHz: 13 windows of 1 s)."""
    root = tmp_path_factory.mktemp("whisper")
    source = str(root / "source")
    model = archs.save_source("whisper", source, tokenizer)
    return source, model, archs.speech_calibration(str(root / "speech"))


def _greedy(model, features, steps, eos):
    """Greedy decoding written out: from the decoder start token, the first step without the begin-suppressed
    tokens, `eos` never chosen; and whether the model's own top token was `eos` at some step, per window."""
    config = model.generation_config
    ids = torch.full((features.shape[0], 1), config.decoder_start_token_id)
    wanted_eos = torch.zeros(features.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for step in range(steps - 1):
            logits = model(input_features=features, decoder_input_ids=ids).logits[:, -1]
            wanted_eos |= logits.argmax(-1) == eos
            if step == 0:
                logits[:, [t for t in config.begin_suppress_tokens if t < logits.shape[-1]]] = -float("inf")
            logits[:, eos] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, int(wanted_eos.sum())


def test_the_decoder_reads_its_own_greedy_transcription(whisper):
    """The calibration windows: the clips resampled and cut into 1 s windows, 8 drawn; the features are the
    extractor's; the decoder's tokens are the model's own greedy transcription, also where it would have ended
    (end-of-text suppressed, counted). To make it end, the test makes the token it prefers its end-of-text."""
    from transformers import AutoFeatureExtractor

    source, model, clips = whisper
    extractor = AutoFeatureExtractor.from_pretrained(source)
    windows, provenance = load_audio_calibration(clips, model, extractor, 8, seq_len=10, seed=0)
    assert isinstance(windows, AudioWindows)
    assert windows.input_features.shape == (8, 16, 100) and windows.decoder_input_ids.shape == (8, 10)
    assert provenance["kind"] == "audio" and provenance["files"] == 4 and provenance["seconds"] == 13.2
    ids, _ = _greedy(model, windows.input_features, 10, eos=1)
    assert torch.equal(windows.decoder_input_ids, ids)

    favourite = int(torch.mode(ids[:, 1:].reshape(-1)).values)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = favourite
    try:
        windows, provenance = load_audio_calibration(clips, model, extractor, 8, seq_len=10, seed=0)
        ids, wanted = _greedy(model, windows.input_features, 10, eos=favourite)
    finally:
        model.generation_config.eos_token_id = saved
    assert torch.equal(windows.decoder_input_ids, ids) and not (ids[:, 1:] == favourite).any()
    assert provenance["end_of_text_suppressed"] == wanted > 0


def test_whisper_compresses_from_a_folder_of_clips(whisper, tmp_path, capsys):
    """The CLI from .wav clips: both stacks factorized, the report says the calibration is audio, the feature
    extractor is copied, a rerun writes the same bytes, and the output transcribes (generate from audio
    features) in a fresh process where lowrank cannot be imported, with the tokens of lowrank.load_pretrained."""
    import lowrank

    source, model, clips = whisper
    outputs = [str(tmp_path / name) for name in ("out", "again")]
    for output in outputs:
        code, out, err = run(["compress", source, "-o", output, "--calib", clips, "--num-samples", "8",
                              "--seq-len", "16", "--ratio", "0.6"], capsys)
        assert code == 0, err
    assert "transcribing the calibration audio" in out + err
    assert "lowrank eval" not in out + err  # no perplexity to compare for a speech model
    with open(os.path.join(outputs[0], "compression_report.json")) as f:
        report = json.load(f)
    from lowrank.report.compression import compression_calibration

    assert "(audio: 8 windows of 1 s, the decoder reading 16 tokens of its own transcription of each, seed 0)" in \
        compression_calibration(report["calibration"])
    assert report["calibration"]["kind"] == "audio" and report["model"]["blocks"] == \
        "model.encoder.layers,model.decoder.layers"
    assert report["layers"]["factorized"] == 32
    assert os.path.exists(os.path.join(outputs[0], "preprocessor_config.json"))
    written = [open(os.path.join(o, "model.safetensors"), "rb").read() for o in outputs]
    assert written[0] == written[1]

    features = torch.randn((2, 16, 100), generator=torch.Generator().manual_seed(3))
    torch.save(features, tmp_path / "features.pt")
    loaded = lowrank.load_pretrained(outputs[0]).eval()
    with torch.no_grad():
        mine = loaded.generate(input_features=features, max_new_tokens=6, do_sample=False)
    code = (f"import torch, transformers\nm = transformers.AutoModelForSpeechSeq2Seq.from_pretrained("
            f"{outputs[0]!r}, trust_remote_code=True).eval()\nf = torch.load({str(tmp_path / 'features.pt')!r})\n"
            "print(type(m).__name__, m.generate(input_features=f, max_new_tokens=6, do_sample=False).tolist())")
    done = archs.isolated_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    name, _, tokens = done.stdout.strip().partition(" ")
    assert name.startswith("LowRank") and json.loads(tokens) == mine.tolist()


def _one_error(code, err, output, says):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(errors) == 1 and says in errors[0] and "Traceback" not in err, err
    assert not os.path.exists(output)


@pytest.mark.parametrize("calib, says", [
    (None, "this model reads audio (input_features): pass --calib with a folder of speech recordings"),
    ("text", "--calib must name an audio file or a folder of them"),
    ("many", "lasts 13.2 s, but --num-samples 20 windows of 1 s need 20 s"),
])
def test_wrong_calibration_for_a_speech_model_is_one_line(whisper, calib, says, tmp_path, calib_file, capsys):
    source, _, clips = whisper
    output = str(tmp_path / "out")
    options = {None: [], "text": ["--calib", calib_file], "many": ["--calib", clips, "--num-samples", "20"]}[calib]
    code, _, err = run(["compress", source, "-o", output, "--seq-len", "16", *options], capsys)
    _one_error(code, err, output, says)


def test_a_speech_model_without_its_feature_extractor_is_one_line(whisper, tmp_path, capsys):
    import shutil

    source, _, clips = whisper
    bare = str(tmp_path / "bare")
    shutil.copytree(source, bare)
    os.remove(os.path.join(bare, "preprocessor_config.json"))
    output = str(tmp_path / "out")
    code, _, err = run(["compress", bare, "-o", output, "--calib", clips, "--num-samples", "8"], capsys)
    _one_error(code, err, output, "its feature extractor (preprocessor_config.json) could not be loaded")


def test_audio_for_a_text_model_is_one_line(whisper, llama_dir, tmp_path, capsys):
    output = str(tmp_path / "out")
    code, _, err = run(["compress", llama_dir, "-o", output, "--calib", whisper[2], "--num-samples", "8",
                        "--seq-len", "16"], capsys)
    _one_error(code, err, output, "is audio, and this model reads text")


def test_a_flac_without_soundfile_is_one_line(whisper, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "soundfile", None)  # not installed: the import fails
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "a.flac").write_bytes(b"fLaC not really")
    output = str(tmp_path / "out")
    code, _, err = run(["compress", whisper[0], "-o", output, "--calib", str(clips), "--num-samples", "1"], capsys)
    _one_error(code, err, output, "needs the soundfile package (pip install soundfile)")
