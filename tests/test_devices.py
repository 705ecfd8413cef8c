"""Every path that takes a device, run with device "cuda" on a pretend GPU (fake_device.py): an op that mixes
tensors meant for the GPU with CPU tensors fails as it would on a real GPU, and the matrix products are counted
per device, so that work left on the CPU by mistake is seen too. The fake computes on the CPU with the same
kernels, so a "cuda" run must give what a CPU run gives."""

import pytest
import torch
from conftest import COMPRESS_FAST, build_model
from fake_device import DeviceMix, FakeCuda

import lowrank
from lowrank.calibration import load_calibration

CUDA = "cuda:0"
CASES = [{"method": method} for method in ("whiten", "svd", "asvd", "corda", "fwsvd")] + \
        [{"method": "whiten", "alloc": alloc} for alloc in ("uniform", "global", "fisher", "sensitivity")]


def on_the_device(fake, allow=()):
    """The work ran on the GPU: matrix products there, none on the CPU (but when called from a place in `allow`)."""
    cpu = {site: count for (device, site), count in fake.heavy_sites.items()
           if device == "cpu" and not any(place in site for place in allow)}
    assert fake.heavy[CUDA] > 0 and not cpu, f"matrix products on the CPU: {cpu}"


def weights(directory, name="model.safetensors"):
    return (directory / name).read_bytes()


# --- the tool itself


def test_the_fake_raises_on_a_mix_and_not_on_a_consistent_computation():
    available = torch.cuda.is_available
    with FakeCuda() as fake:
        assert torch.cuda.is_available()
        gpu, cpu = torch.ones(3).to("cuda"), torch.ones(3)
        assert gpu.device == torch.device(CUDA) and cpu.device.type == "cpu" and gpu.is_cuda
        with pytest.raises(DeviceMix, match="Expected all tensors to be on the same device"):
            gpu + cpu
        layer = torch.nn.Linear(3, 2)
        layer.register_buffer("scale", torch.ones(2))
        with pytest.raises(DeviceMix):
            layer(gpu)  # CPU weights, GPU input
        layer.to("cuda")
        assert layer.weight.device == layer.bias.device == layer.scale.device == torch.device(CUDA)
        with pytest.raises(DeviceMix):
            layer.scale * cpu[:2]
        with pytest.raises(DeviceMix):
            torch.randn(3, device="cuda", generator=torch.Generator())
        with pytest.raises(DeviceMix):
            layer(cpu)
        # a consistent computation: forward with a CPU scalar, backward with a tensor hook, an optimizer step
        x = torch.randn(4, 3, device="cuda", requires_grad=True)
        out = layer(x) * torch.tensor(2.0)
        seen = []
        out.register_hook(lambda grad: seen.append(grad * gpu[:2]))  # ops in a hook are checked too
        out.square().sum().backward()
        torch.optim.Adam(layer.parameters()).step()
        assert out.device == layer.weight.grad.device == seen[0].device == torch.device(CUDA)
        assert fake.heavy[CUDA] > 0 and fake.heavy["cpu"] == 0
        # a move makes a new tensor: the original stays where it was
        back = out.detach().cpu()
        assert back.device.type == "cpu" and out.device.type == "cuda"
        back.numpy()
        with pytest.raises(TypeError, match="numpy"):
            out.detach().numpy()
        # parameters made or swapped from device tensors stay on the device
        param = torch.nn.Parameter(gpu)
        with pytest.raises(DeviceMix):
            param + cpu
        torch.utils.swap_tensors(param, torch.nn.Parameter(cpu.clone()))
        assert param.device.type == "cpu"
        layer.to("cpu")
        layer(cpu)
    assert torch.cuda.is_available is available  # patches undone


def test_a_hook_mixing_devices_fails():
    with FakeCuda():
        x = torch.ones(3, device="cuda", requires_grad=True)
        y = x * 2
        y.register_hook(lambda grad: grad + torch.ones(3))
        with pytest.raises(DeviceMix):
            y.sum().backward()


# --- compress


def test_compress_an_encoder_decoder_on_the_gpu(tokenizer, calib_file, tmp_path):
    """BART, both stacks: the decoder's capture runs the compressed encoder on the device, and each batch's
    cross-attention memory is handed to the decoder blocks there."""
    import archs

    source = str(tmp_path / "bart")
    archs.save_source("bart", source, tokenizer)
    options = dict(archs.COMPRESS, calib=calib_file, ratio=0.8)
    with FakeCuda() as fake:
        lowrank.compress(source, str(tmp_path / "gpu"), device="cuda", **options)
    on_the_device(fake)
    lowrank.compress(source, str(tmp_path / "cpu"), device="cpu", **options)
    assert weights(tmp_path / "gpu") == weights(tmp_path / "cpu")


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case.values()))
def test_compress_on_the_gpu(case, llama_dir, calib_file, tmp_path):
    options = dict(ratio=0.8, calib=calib_file, **COMPRESS_FAST, **case)
    with FakeCuda() as fake:
        report = lowrank.compress(llama_dir, str(tmp_path / "gpu"), device="cuda", **options)
    on_the_device(fake)
    reference = lowrank.compress(llama_dir, str(tmp_path / "cpu"), device="cpu", **options)
    assert report["method"]["alloc"] == reference["method"]["alloc"] == case.get("alloc", {"whiten": "fisher"}.get(
        case["method"], "uniform"))  # --alloc auto is the Fisher allocation for whiten
    assert weights(tmp_path / "gpu") == weights(tmp_path / "cpu")


def test_compress_with_self_calibration_samples_on_the_gpu(llama_dir, tmp_path):
    with FakeCuda() as fake:
        lowrank.compress(llama_dir, str(tmp_path / "gpu"), ratio=0.8, calib="self", method="svd", device="cuda",
                         **COMPRESS_FAST)
    on_the_device(fake)


# --- calibration sampled from the model


def test_self_calibration_on_a_model_already_on_the_gpu(tokenizer):
    """The sampling stays where the model is (transformers >= 5 also accepts a CPU prompt for a GPU model, moving it
    at every step), and the windows come back on the CPU, where they are hashed."""
    reference = load_calibration("self", build_model("llama"), tokenizer, 3, 16, seed=4).input_ids
    model = build_model("llama")
    with FakeCuda() as fake:
        model.to("cuda")
        ids = load_calibration("self", model, tokenizer, 3, 16, seed=4).input_ids
        assert ids.device.type == "cpu"  # the windows are kept (and hashed) on the CPU
    on_the_device(fake)
    assert torch.equal(ids, reference)


def test_self_calibration_on_the_requested_device(tokenizer):
    model = build_model("llama")
    reference = load_calibration("self", model, tokenizer, 3, 16, seed=4).input_ids
    with FakeCuda() as fake:
        ids = load_calibration("self", model, tokenizer, 3, 16, seed=4, device="cuda").input_ids
        assert ids.device.type == "cpu"
        assert all(p.device.type == "cpu" for p in model.parameters())  # put back where it was
    on_the_device(fake)
    assert torch.equal(ids, reference)


# --- compensate and evaluate


@pytest.fixture(scope="module")
def compressed(llama_dir, calib_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("devices") / "lr")
    lowrank.compress(llama_dir, out, ratio=0.6, method="svd", calib=calib_file, device="cpu", **COMPRESS_FAST)
    return out


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_compensate_on_the_gpu(merge, llama_dir, compressed, calib_file, tmp_path):
    options = dict(rank=4, merge=merge, calib=calib_file, **COMPRESS_FAST)
    with FakeCuda() as fake:
        lowrank.compensate(llama_dir, compressed, str(tmp_path / "gpu"), device="cuda", **options)
    on_the_device(fake)
    lowrank.compensate(llama_dir, compressed, str(tmp_path / "cpu"), device="cpu", **options)
    name = "model.safetensors" if merge else "adapter_model.safetensors"
    assert weights(tmp_path / "gpu", name) == weights(tmp_path / "cpu", name)


def test_compensate_with_self_calibration_samples_on_the_gpu(llama_dir, compressed, tmp_path):
    with FakeCuda() as fake:
        lowrank.compensate(llama_dir, compressed, str(tmp_path / "gpu"), rank=4, calib="self", device="cuda",
                           **COMPRESS_FAST)
    on_the_device(fake)


def test_evaluate_on_the_gpu(llama_dir, compressed, calib_file, tmp_path):
    adapter = str(tmp_path / "eora")
    lowrank.compensate(llama_dir, compressed, adapter, rank=4, calib=calib_file, device="cpu", **COMPRESS_FAST)
    options = dict(baseline=llama_dir, data=calib_file, seq_len=32, max_tokens=128, batch_size=2, decode_tokens=3)
    for extra in ({}, {"adapter": adapter}):
        with FakeCuda() as fake:
            result = lowrank.evaluate(compressed, device="cuda", **options, **extra)
        # the models are loaded on the CPU, then moved: PEFT reads LowRankLinear.weight (a product) as it loads
        on_the_device(fake, allow=("_apply_adapter",))
        reference = lowrank.evaluate(compressed, device="cpu", **options, **extra)
        assert result["device"] == "cuda" and result["speed"]["model"]["peak_memory_bytes"] is not None
        assert result["perplexity"] == reference["perplexity"] and result["agreement"] == reference["agreement"]


# --- squeeze


def test_squeeze_with_a_gpu_present(tmp_path):
    """The adapter squeeze works on files, on the CPU: a GPU being present must not make it mix devices."""
    pytest.importorskip("peft")
    from test_squeeze_peft import make_adapter

    adapter = str(tmp_path / "adapter")
    make_adapter(adapter, "dora")
    with FakeCuda():
        lowrank.squeeze(adapter, str(tmp_path / "gpu"), rank=3, threads=1)  # one thread: the fake is per thread
    lowrank.squeeze(adapter, str(tmp_path / "cpu"), rank=3, threads=1)
    name = "adapter_model.safetensors"
    assert weights(tmp_path / "gpu", name) == weights(tmp_path / "cpu", name)


def test_in_training_squeeze_of_a_model_on_the_gpu():
    """squeeze_peft_model in a training loop on the GPU: factors and optimizer state stay on the device."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_model("llama"), peft.LoraConfig(r=8, lora_alpha=16,
                                                                      target_modules=["q_proj", "up_proj"]))
    with FakeCuda() as fake:
        model.to("cuda")
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = torch.randint(5, 320, (2, 16)).to("cuda")

        def step():
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        step()
        changed = lowrank.squeeze_peft_model(model, 4, optimizer=optimizer)
        assert changed
        step()
        for param in model.parameters():
            assert param.device == torch.device(CUDA)
            for value in optimizer.state.get(param, {}).values():
                if value.dim():
                    assert value.device == torch.device(CUDA)
    on_the_device(fake)
