"""Shared core of the adaptive server optimizers FedAdam, FedYogi and FedAdagrad (not a rule by itself).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295). The server treats the weighted mean
delta Δ̄ as a pseudo-gradient (with the sign flipped) and takes one optimizer step per round:

    m_t = β1·m_{t-1} + (1-β1)·Δ̄
    v_t = second_moment(v_{t-1}, Δ̄²)            # Adam, Yogi or Adagrad
    x_{t+1} = x_t + η_t · m_t / (√v_t + τ)

The optimizer state (m, v, t) lives in an explicit :class:`ServerState` that the caller stores and passes back, so the
rules stay pure and a restarted coordinator resumes exactly. The state is kept in the adapter's dtype promoted to
at least float32; the arithmetic is float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from strategies.types import AggregationError, ServerState, StateDict

SecondMoment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def state_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype server-state slots are stored in: the tensor's dtype, at least float32."""
    return torch.promote_types(t.dtype, torch.float32)


def check_state(rule: str, server_state: ServerState, global_state: Mapping[str, torch.Tensor],
                slots: tuple[str, ...]) -> None:
    """Refuse a server state made by another rule or for another adapter layout.

    Raises:
        AggregationError: On a different rule, missing slots, or keys/shapes that differ from the global adapter.
    """
    if server_state.rule != rule:
        raise AggregationError(f"{rule}: server state was produced by {server_state.rule!r}, not {rule!r}")
    if set(server_state.tensors) != set(slots):
        raise AggregationError(f"{rule}: server state has slots {sorted(server_state.tensors)}, expected {sorted(slots)}")
    for slot in slots:
        sd = server_state.tensors[slot]
        if sd.keys() != global_state.keys():
            raise AggregationError(f"{rule}: server state slot {slot!r} has keys that differ from the global adapter")
        for k, g in global_state.items():
            if tuple(sd[k].shape) != tuple(g.shape):
                raise AggregationError(f"{rule}: server state slot {slot!r} tensor {k!r} has shape "
                                       f"{tuple(sd[k].shape)}, expected {tuple(g.shape)}")


def adaptive_step(rule: str, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor],
                  server_state: ServerState | None, *, eta: float, beta_1: float, tau: float, initial_v: float,
                  second_moment: SecondMoment, adam_beta_2: float | None = None) -> tuple[StateDict, ServerState]:
    """One FedOpt server step, key by key (only one key's float64 temporaries exist at a time).

    Args:
        rule: Name of the calling rule (recorded in and checked against the state).
        global_state: The round's global adapter x_t.
        mean_delta: Weighted mean delta Δ̄ (may be lazy, see :meth:`FedAvgAccumulator.lazy_mean`).
        server_state: The previous state, or ``None`` on the first round (m = 0, v = ``initial_v``).
        eta: Server learning rate η.
        beta_1: First-moment decay β1.
        tau: Adaptivity τ added to √v.
        initial_v: Initial value of every v entry on the first round.
        second_moment: ``(v_prev, Δ̄²) -> v`` for the optimizer at hand.
        adam_beta_2: When set, use Adam's bias-corrected step η·√(1-β2^t)/(1-β1^t) with t the new step count.

    Returns:
        ``(new_global_state, new_server_state)``.
    """
    if server_state is not None:
        check_state(rule, server_state, global_state, ("m", "v"))
    step = (server_state.step if server_state is not None else 0) + 1
    eta_t = eta
    if adam_beta_2 is not None:
        eta_t = eta * (1.0 - adam_beta_2 ** step) ** 0.5 / (1.0 - beta_1 ** step)
    new_state: StateDict = {}
    m_out: StateDict = {}
    v_out: StateDict = {}
    for k, g in global_state.items():
        d = mean_delta[k].to(torch.float64)
        if server_state is None:
            m_prev = torch.zeros_like(d)
            v_prev = torch.full_like(d, initial_v)
        else:
            m_prev = server_state.tensors["m"][k].to(torch.float64)
            v_prev = server_state.tensors["v"][k].to(torch.float64)
        m = beta_1 * m_prev + (1.0 - beta_1) * d
        v = second_moment(v_prev, d * d)
        new_state[k] = (g.detach().to(torch.float64) + eta_t * m / (v.sqrt() + tau)).to(g.dtype)
        m_out[k] = m.to(state_dtype(g))
        v_out[k] = v.to(state_dtype(g))
    return new_state, ServerState(rule=rule, step=step, tensors={"m": m_out, "v": v_out})


def check_unit_interval(rule: str, name: str, value: float, *, closed_right: bool = False) -> None:
    """Raise :class:`AggregationError` unless ``0 <= value < 1`` (``<= 1`` with ``closed_right``)."""
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise AggregationError(f"{rule}: {name} must be in {interval}, got {value}")


def check_positive(rule: str, name: str, value: float) -> None:
    """Raise :class:`AggregationError` unless ``value > 0``."""
    if not value > 0:
        raise AggregationError(f"{rule}: {name} must be > 0, got {value}")
