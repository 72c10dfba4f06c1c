"""fedbridge's adapters and tasks inside Flower messages (the Flower adapter's wire, shared by both of its sides).

Tensors cross Flower's transport as safetensors only: a whole adapter state (or a FedEx-LoRA base residual) is one
Flower ``Array`` whose ``stype`` is ``"safetensors"`` and whose bytes are :func:`fedcommon.tensors.encode_state`'s,
decoded with :func:`fedcommon.tensors.decode_state` (header checked, no pickle), so bfloat16 and every other wire
dtype travel unchanged and the receiving side checks the bytes exactly as it checks fedbridge's own uploads. The
round's task is the fedbridge ``Task`` message itself, serialised into the config record, so the site trains from the
same fields it gets over fedbridge's transport.

``flwr`` is imported only inside the functions: importing this module costs nothing on a machine without Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord

STYPE = "safetensors"
STATE_KEY = "state"  # the one Array of an ArrayRecord that carries a fedbridge state
TASK_KEY = "fedbridge-task"  # the serialised pb.Task in a ConfigRecord
RULE_KEY = "fedbridge-strategy"  # the ServerApp's rule (a lower-rank site projects the global adapter with it)
# Keys of the records in a Flower message (RecordDict keys).
ADAPTER_RECORD = "arrays"  # the global adapter (to the site) or the site's delta (to the server)
RESIDUAL_RECORD = "base-residual"  # FedEx-LoRA's cumulative scaled base residual (to the site; absent: none)
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
WEIGHT_KEY = "num-examples"  # the FedAvg weight in a reply's MetricRecord (Flower's own default key)
RANK_KEY = "lora-rank"  # the LoRA rank the site trained (mixed-rank rules)


class FlowerWireError(ValueError):
    """A Flower message does not carry what fedbridge expects (names the record and what is wrong)."""


def state_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A fedbridge state as an ArrayRecord holding its safetensors bytes."""
    from flwr.app import Array, ArrayRecord

    data = tensors.encode_state(state)
    return ArrayRecord({STATE_KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def record_bytes(record: ArrayRecord, what: str = "arrays") -> bytes:
    """The safetensors bytes of an ArrayRecord made by :func:`state_record` (not yet decoded).

    Raises:
        FlowerWireError: The record is not one array of safetensors bytes.
    """
    arr = record.get(STATE_KEY) if hasattr(record, "get") else None
    if arr is None or set(record.keys()) != {STATE_KEY}:
        raise FlowerWireError(f"record {what!r}: expected one array {STATE_KEY!r} of safetensors bytes, got keys "
                              f"{sorted(record.keys())[:5]}")
    if arr.stype != STYPE:
        raise FlowerWireError(f"record {what!r}: array {STATE_KEY!r} is serialised as {arr.stype!r}, not {STYPE!r} "
                              "(tensors cross as safetensors only)")
    return bytes(arr.data)


def record_state(record: ArrayRecord, what: str = "arrays") -> dict[str, torch.Tensor]:
    """The fedbridge state an ArrayRecord made by :func:`state_record` carries.

    Raises:
        FlowerWireError: The record is not one array of safetensors bytes, or the bytes are not valid safetensors.
    """
    data = record_bytes(record, what)
    try:
        return tensors.decode_state(data)
    except tensors.CodecError as e:
        raise FlowerWireError(f"record {what!r}: {e}") from None


def task_config(task: pb.Task, extra: Mapping[str, int | float | str | bool] | None = None) -> ConfigRecord:
    """The round's fedbridge task (and ``extra`` plain values) as a ConfigRecord."""
    from flwr.app import ConfigRecord

    return ConfigRecord({TASK_KEY: task.SerializeToString(deterministic=True), **(extra or {})})


def config_task(config: ConfigRecord) -> pb.Task:
    """The fedbridge task a ConfigRecord made by :func:`task_config` carries.

    Raises:
        FlowerWireError: No task, or bytes that do not parse as a ``fedbridge.v1.Task``.
    """
    from google.protobuf.message import DecodeError

    raw = config.get(TASK_KEY)
    if not isinstance(raw, bytes):
        raise FlowerWireError(f"record 'config': no {TASK_KEY!r} bytes (is this ServerApp fedbridge's?)")
    try:
        return pb.Task.FromString(raw)
    except DecodeError:
        raise FlowerWireError(f"record 'config': {TASK_KEY!r} is not a fedbridge.v1.Task") from None
