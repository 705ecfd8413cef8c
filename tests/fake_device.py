"""A pretend GPU for a CPU-only machine: code runs with device "cuda" while every tensor stays on the CPU, and an
op that mixes tensors meant for different devices fails as it would on a real GPU.

    with FakeCuda() as fake:
        lowrank.compress(..., device="cuda")
    fake.heavy  # Counter: device -> matrix products run there (to check that the work really went to the device)
    fake.heavy_sites  # Counter: (device, the lowrank code that asked) -> matrix products

How: torch.cuda.is_available() says True (and the CUDA calls that would need a driver are stubbed); a
TorchFunctionMode sees every torch call, rewrites a "cuda" device argument to the CPU, and TAGS each tensor with
the device the code meant (a weak, identity-keyed table: untagged means CPU). Tags are set by .to()/.cuda()/.cpu(),
by `device=` arguments of factories, and carried from inputs to outputs; `.device` and `.is_cuda` report the tag.
Parameters moved by Module.to() are tagged because Module._apply calls Tensor.to and then assigns `param.data`,
both of which the mode sees; nn.Parameter(...) and torch.utils.swap_tensors do not pass through the mode, so they
are patched to carry tags. Gradients come from the autograd engine, not from a torch call: a gradient seen by a
tensor hook or read as `.grad` takes its tensor's device.

The one rule it enforces is torch's: the tensor arguments of one op must be on one device ("Expected all tensors
to be on the same device"), except what torch itself allows: 0-dim CPU tensors (scalars), cross-device copy_ and
`.data =`, and CPU index tensors when indexing. `.numpy()` of a device tensor, a `.grad` on another device and a
CPU random generator for a device op fail as on a GPU. Modes are per thread: work in other threads is not seen.
"""

import contextlib
import importlib.util
import os
import traceback
from collections import Counter
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode, _push_mode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CPU = "cpu"
HEAVY = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum",
         "scaled_dot_product_attention", "conv1d", "conv2d"}
PROJECT = tuple(os.path.join(path, "") for name in ("lowrank", "lowrank.calibration")
                for path in importlib.util.find_spec(name).submodule_search_locations)
METADATA = {"_has_compatible_shallow_copy_type"}  # compare tensors' types, not their data: any devices


def device_name(device):
    """"cuda" and "cuda:0" and 0 are one device, "cuda:0"; anything else by its torch name."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return f"cuda:{device.index or 0}" if device.type == "cuda" else str(device)


def _attribute(func):
    """For a property getter/setter (func is `Tensor.<name>.__get__`/`__set__`): the attribute's name."""
    if getattr(func, "__name__", None) not in ("__get__", "__set__"):
        return None
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", None) or getattr(getattr(owner, "fget", None), "__name__", None)


def _tensors(value):
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


def _caller():
    """Where the code that asked for an op is: its innermost three lowrank frames, innermost first (else the
    innermost frame outside the installed libraries)."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__]
    ours = [f for f in frames if f.filename.startswith(PROJECT)][-3:] or \
        [f for f in frames if "site-packages" not in f.filename][-1:] or frames[-1:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(ours))


class DeviceMix(RuntimeError):
    pass


class FakeCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.tags = WeakIdKeyDictionary()  # tensor -> intended device, only for devices other than the CPU
        self.ran = Counter()  # device -> ops run there
        self.heavy = Counter()  # device -> matrix products (linear, matmul, attention, ...) run there
        self.heavy_sites = Counter()  # (device, callers) of those products: where work is, for failure messages
        self._patches = contextlib.ExitStack()

    # -- tags

    def device_of(self, tensor):
        return self.tags.get(tensor, CPU)

    def tag(self, tensor, device):
        if device == CPU:
            self.tags.pop(tensor, None)
        else:
            self.tags[tensor] = device

    def _common(self, func, tensors):
        """The one device of an op's tensor arguments; 0-dim CPU tensors go with any device, as in torch."""
        devices = {self.device_of(t) for t in tensors if not (t.dim() == 0 and self.device_of(t) == CPU)}
        if len(devices) > 1:
            first, second = sorted(devices, reverse=True)[:2]
            raise DeviceMix(f"Expected all tensors to be on the same device, but found at least two devices, "
                            f"{first} and {second}! (fake_device: in {getattr(func, '__qualname__', func)})")
        return devices.pop() if devices else CPU

    # -- the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        attribute = _attribute(func)
        if attribute is not None:
            return self._attribute(func, attribute, args)
        if name in ("to", "cuda", "cpu") and args and isinstance(args[0], torch.Tensor):
            return self._move(func, name, args, kwargs)
        if name == "numpy" and self.device_of(args[0]) != CPU:
            raise TypeError(f"can't convert {self.device_of(args[0])} device type tensor to numpy. Use Tensor.cpu() "
                            "to copy the tensor to host memory first. (fake_device)")
        if name == "get_device" and self.device_of(args[0]) != CPU:
            return torch.device(self.device_of(args[0])).index
        if name == "register_hook":
            return func(args[0], self._tagging_hook(args[0], args[1]))
        if name in ("copy_", "__setitem__"):  # torch copies across devices here; the target keeps its device
            return func(*args, **kwargs)
        if name in METADATA:
            return func(*args, **kwargs)
        if name == "pin_memory":  # page-locked host memory needs a real driver; ordinary memory is the same data
            return args[0]
        kwargs.pop("pin_memory", None)
        if kwargs.get("device") is not None:  # a factory (zeros, arange, *_like, new_*): made where it says
            device = device_name(kwargs["device"])
            if device.startswith("cuda"):
                kwargs["device"] = CPU
        elif name == "__getitem__":  # indexing takes CPU index tensors for any tensor
            device = self.device_of(args[0])
            self._common(func, [args[0]] + [t for t in _tensors(args[1:]) if self.device_of(t) != CPU])
        else:
            device = self._common(func, _tensors((args, kwargs)))
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type == CPU and device != CPU:  # random numbers on a GPU
            raise DeviceMix(f"Expected a 'cuda' device type for generator but found 'cpu' (fake_device: in {name})")
        result = func(*args, **kwargs)
        outputs = _tensors(result)
        inputs = {id(t) for t in _tensors((args, kwargs))}
        for tensor in outputs:
            if id(tensor) not in inputs:  # an in-place op's output is its input, already tagged
                self.tag(tensor, device)
        if outputs:
            self.ran[device] += 1
            if name in HEAVY:
                self.heavy[device] += 1
                self.heavy_sites[device, _caller()] += 1
        return result

    def _attribute(self, func, attribute, args):
        tensor = args[0]
        device = self.device_of(tensor)
        if attribute == "device" and device != CPU:
            return torch.device(device)
        if attribute == "is_cuda":
            return device.startswith("cuda")
        if attribute == "is_cpu":
            return device == CPU
        if attribute == "grad" and func.__name__ == "__set__" and args[1] is not None and \
                self.device_of(args[1]) != device:  # torch refuses a gradient on another device
            raise DeviceMix(f"assigned grad has data located on {self.device_of(args[1])}, different from the "
                                f"tensor's {device} (fake_device)")
        result = func(*args)
        if attribute == "data" and func.__name__ == "__set__":  # `param.data = x`: param is now where x is
            self.tag(tensor, self.device_of(args[1]))
        elif isinstance(result, torch.Tensor) and result is not tensor and result not in self.tags:
            self.tag(result, device)  # .data, .grad (made by autograd, so untagged), .T, .mT, ...
        return result

    def _move(self, func, name, args, kwargs):
        """Tensor.to / .cuda / .cpu: run on the CPU, tag the result with the device asked for."""
        tensor, current = args[0], self.device_of(args[0])
        if name == "cpu":
            target, result = CPU, func(*args, **kwargs)
        elif name == "cuda":
            device = args[1] if len(args) > 1 else kwargs.get("device")
            target, result = device_name(0 if device is None else device), tensor
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): other's device and dtype
            target = self.device_of(args[1])
            result = func(tensor, args[1].dtype, *args[2:], **kwargs)
        else:
            copy = kwargs.pop("copy", False)
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            target = current if device is None else device_name(device)
            result = func(tensor, CPU, dtype, non_blocking, copy, memory_format=memory_format or torch.preserve_format)
        if target != current and result is tensor:  # a move to another device is a new tensor, as in torch
            result = tensor.clone()
        if result is not tensor:
            self.tag(result, target)
        self.ran[target] += 1
        return result

    def _tagging_hook(self, tensor, hook):
        device = self.device_of(tensor)

        def tagged(grad):
            if grad is not None and grad not in self.tags:
                self.tag(grad, device)
            if self in _get_current_function_mode_stack():
                return hook(grad)
            _push_mode(self)  # the autograd engine runs hooks without the caller's modes: checked here too
            try:
                return hook(grad)
            finally:
                _pop_mode()

        return tagged

    # -- the CUDA that code asks about

    def __enter__(self):
        fake = self
        cuda = {
            "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
            "is_initialized": lambda: True, "set_device": lambda device: None,
            "synchronize": lambda device=None: None, "empty_cache": lambda: None,
            "reset_peak_memory_stats": lambda device=None: None, "memory_allocated": lambda device=None: 0,
            "max_memory_allocated": lambda device=None: 0, "memory_reserved": lambda device=None: 0,
            "get_device_name": lambda device=None: "fake cuda (fake_device.py)",
            "get_rng_state": lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
            "set_rng_state": lambda state, device="cuda": None,
            "get_rng_state_all": lambda: [torch.zeros(16, dtype=torch.uint8)],
            "set_rng_state_all": lambda states: None,
            "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None,
        }
        for attribute, value in cuda.items():
            self._patches.enter_context(mock.patch.object(torch.cuda, attribute, value))
        parameter_new = torch.nn.Parameter.__new__
        swap_tensors = torch.utils.swap_tensors

        def new_parameter(cls, data=None, requires_grad=True):
            param = parameter_new(cls, data, requires_grad)
            if data is not None:
                fake.tag(param, fake.device_of(data))
            return param

        def swap(t1, t2):
            d1, d2 = fake.device_of(t1), fake.device_of(t2)
            fake.tag(t1, CPU)  # untagged: swap_tensors refuses tensors with weak references (the tag table's)
            fake.tag(t2, CPU)
            swap_tensors(t1, t2)
            fake.tag(t1, d2)
            fake.tag(t2, d1)

        self._patches.enter_context(mock.patch.object(torch.nn.Parameter, "__new__", new_parameter))
        self._patches.enter_context(mock.patch.object(torch.utils, "swap_tensors", swap))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()
