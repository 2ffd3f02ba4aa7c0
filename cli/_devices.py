"""``confkd segment --devices``: the device list and the model loader that every worker process calls."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confkd.cli._common import fail
from confkd.errors import ConfKDError

if TYPE_CHECKING:
    from confkd.inference.model import LoadedModel
    from confkd.inference.multidevice import DevicePool


def device_list(devices: str | None, device: str, backend: str) -> tuple[str, ...] | None:
    """``--devices`` checked (one-line usage errors); ``None`` when not given."""
    if devices is None:
        return None
    if device != "auto":
        fail("--device and --devices exclude each other: --devices 0,1 runs one worker per device")
    if backend == "triton":
        fail("--devices does not apply to --backend triton: the server chooses its GPUs (its instance_group)")
    from confkd.inference.multidevice import parse_devices

    try:
        parsed = parse_devices(devices)
    except ConfKDError as e:
        fail(str(e))
    return parsed


def load_on_device(model_path: Path, engine_dir: Path | None, options: dict[str, Any], device: str) -> LoadedModel:
    """``load_model`` as ``confkd segment`` calls it (with the TensorRT engine cache for an exported directory).

    Module level, so that it pickles into the worker processes, where it runs.
    """
    from confkd.inference.model import load_model

    provider = None
    if options.get("backend") in ("auto", "tensorrt") and model_path.is_dir():
        from confkd.export.engine_cache import engine_provider

        provider = engine_provider(engine_dir)
    return load_model(model_path, device=device, engine_provider=provider, **options)


def start_pool(
    model_path: Path, devices: tuple[str, ...] | None, engine_dir: Path | None, **options: Any
) -> DevicePool | None:
    """One worker process per device, each with the model loaded (``None`` without ``devices``).

    Raises:
        WorkerError: a worker's model did not load (the message names the device).
    """
    if devices is None:
        return None
    from confkd.inference.multidevice import DevicePool

    return DevicePool(partial(load_on_device, model_path, engine_dir, options), devices)
