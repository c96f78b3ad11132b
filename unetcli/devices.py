"""Where and how the network computes: device, precision, CPU threads, memory budget.

One rule each, shared by ``unet train`` and ``unet predict``:

- **Device.** ``auto`` picks a CUDA GPU, then Apple MPS, then the CPU; ``cpu``, ``cuda``, ``cuda:N``
  and ``mps`` are checked against this machine. Under distributed training, ``auto`` and a bare
  ``cuda`` take the GPU of the process's local rank.
- **Precision.** ``fp32`` everywhere. ``bf16`` on a CPU (torch's autocast runs it on every CPU,
  natively where oneDNN has bf16) and on CUDA GPUs that support it. ``fp16`` on GPUs only (CUDA, MPS):
  a CPU refuses it even where oneDNN computes fp16, because half precision's narrow exponent range is
  a training hazard there without a loss scaler and gives a prediction nothing bf16 does not.
  ``auto`` means bf16 on a CUDA GPU that has it and on a CPU that computes bf16 in hardware
  (AVX512-BF16 or AMX on x86, BF16 on Arm: about twice fp32's speed there), else fp32.
- **Threads.** ``OMP_NUM_THREADS`` when set, else one per core of the process's affinity mask; one
  thread when each layer is too little work to share.
- **Memory budget.** How many bytes of activations a batch of tiles may take (see
  :func:`default_memory_budget`).

A library module: it never prints, and refuses with a one-line :class:`~unetcli.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import os

import torch

from unetcli.errors import ConfigError
from unetcli.guards import cpu_cores   # the cores of this process's affinity mask: one rule, in guards

PRECISIONS = ("fp32", "bf16", "fp16")
SMALL_LAYER_FLOPS = 5e7  # below this many FLOPs per layer call, one CPU thread beats several

_DEVICE_HINT = "use auto, cpu, cuda, cuda:N or mps"


# ------------------------------------------------------------------------------------------ devices

def _has_mps() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _rank_gpu(local_rank: int | None) -> torch.device:
    """A bare CUDA device, or the local rank's GPU when a rank is given."""
    if local_rank is None:
        return torch.device("cuda")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a torch device.

    ``local_rank`` (distributed training): ``auto`` and a bare ``cuda`` take GPU ``local_rank`` modulo
    the GPUs present; without it they stay the current CUDA device. Raises a one-line ConfigError for a
    name that is no device or a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return _rank_gpu(local_rank)
        return torch.device("mps") if _has_mps() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device {spec!r}: not a device", hint=_DEVICE_HINT) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA GPU is available on this machine",
                              hint="use --device cpu (or auto)")
        if dev.index is None:
            return _rank_gpu(local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0")
    elif dev.type == "mps":
        if not _has_mps():
            raise ConfigError(f"--device {spec}: Apple MPS is not available on this machine",
                              hint="use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {spec!r}: not supported", hint=_DEVICE_HINT)
    return dev


# ---------------------------------------------------------------------------------------- precision

@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86: AVX512-BF16 or AMX-BF16; Arm: BF16). Elsewhere
    torch emulates bf16, which is slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` checked for ``device`` (see the module's rule); ``auto`` resolved."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "bf16" if device.type == "cpu" and cpu_native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint="use fp32, bf16 or fp16")
    if precision == "fp16" and device.type not in ("cuda", "mps"):
        raise ConfigError(f"--precision fp16 needs a GPU; {device} computes in fp32 or bf16",
                          hint="use --precision bf16 or fp32 here")
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support "
                              f"bfloat16", hint="use --precision fp16")
        if device.type == "mps":
            raise ConfigError("--precision bf16 is not supported on Apple MPS", hint="use --precision fp16")
    return precision


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (fp32, bf16 or fp16) on ``device``: None for fp32.

    Raises ConfigError where :func:`resolve_precision` refuses the pair.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint="use fp32, bf16 or fp16")
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ------------------------------------------------------------------------------------------ threads

def auto_threads() -> int:
    """Threads for large convolutions: ``OMP_NUM_THREADS`` if set, else one per core of this process's
    affinity mask."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return cpu_cores()


def threads_for_work(flops_per_layer: float, given: int | None = None, auto: int | None = None) -> int:
    """CPU threads for a network whose layer calls each take ``flops_per_layer``: ``given`` if set;
    else 1 when a layer is too little work to share (the threads' hand-overs would cost more than they
    save); else ``auto`` (default :func:`auto_threads`)."""
    if given is not None:
        return given
    if flops_per_layer < SMALL_LAYER_FLOPS:
        return 1
    return auto if auto is not None else auto_threads()


# ------------------------------------------------------------------------------------ memory budget

def available_memory() -> int:
    """Bytes of system memory still available."""
    from unetcli.images import available_memory as avail

    return avail()


def default_memory_budget(device: torch.device | str) -> int:
    """The default memory budget in bytes for the activations of a batch of tiles.

    CPU: a quarter of the available memory, at most 512 MiB. Larger tiles gain little more on a CPU
    (for the paper's network on a 2048x2048 image, 4 GiB of tiles would save 15% of the operations),
    and with this cap the whole command, torch included, stays under 1 GB even for a 16384x16384 image
    (the tile-memory estimate leaves room for the allocator's fragmentation).
    CUDA: half of the free device memory. MPS: a quarter of the available memory, at most 4 GiB.
    ``device`` may also be a device's name ('cpu').
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    if device.type == "mps":
        return int(min(available_memory() / 4, 4 * 2**30))
    return int(min(available_memory() / 4, 512 * 2**20))
