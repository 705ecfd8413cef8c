"""Loss-aware ranks for encoders (issue 19): `--alloc fisher` on a model without an LM head weighs each layer by
the Fisher of its final hidden states (core/fisher.py, _sample_losses), so an encoder's ranks follow what its
output is made of instead of one rank rule for every matrix."""

import os

import archs
import torch
from conftest import COMPRESS_FAST

import lowrank
from lowrank.compression.targets import select_targets


def ranks_of(report):
    return {layer["name"]: layer["rank"] for layer in report["layers"]["list"]}


def test_an_encoder_gets_ranks_from_its_hidden_states(tmp_path, tokenizer, calib_file):
    """A BERT whose block-0 attention output projection is scaled by 1e-3 barely moves the final hidden states:
    the Fisher allocation cuts that matrix far below the uniform rank, while uniform gives it the rank of its
    shape, and the budget goes elsewhere. The run is byte-identical when repeated (the Gaussian probes are
    seeded)."""
    model = archs.build("bert")
    faint = "bert.encoder.layer.0.attention.output.dense"
    with torch.no_grad():
        model.get_submodule(faint).weight.mul_(1e-3)
    assert faint in {n for names in select_targets(model)[2].values() for n in names}
    source = str(tmp_path / "bert")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    reports = {}
    for name, alloc in [("fisher", "fisher"), ("again", "fisher"), ("uniform", "uniform")]:
        reports[name] = lowrank.compress(source, str(tmp_path / name), ratio=0.6, alloc=alloc, calib=calib_file,
                                         verify=False, **COMPRESS_FAST)
    fisher, uniform = ranks_of(reports["fisher"]), ranks_of(reports["uniform"])
    assert reports["fisher"]["method"]["alloc"] == "fisher"
    assert (fisher[faint] or 10**9) < 0.5 * uniform[faint], (fisher[faint], uniform[faint])
    assert len(set(fisher.values())) > len(set(uniform.values()))  # ranks differ within one shape
    for name in os.listdir(tmp_path / "fisher"):
        if name.endswith(".safetensors"):
            assert (tmp_path / "fisher" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
