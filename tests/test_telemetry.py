"""Telemetry's arithmetic: counted FLOPs, tokens/s, MFU and the data-waiting share."""

from __future__ import annotations

import pytest
import torch

from foundation.telemetry import StepMeasurement, Telemetry, TelemetryConfig, describe


def test_a_measured_step_counts_forward_and_backward_flops():
    """A linear layer's step is 2·B·I·O FLOPs forward and twice that backward (the
    gradients of its weight and of its input)."""
    layer, batch = torch.nn.Linear(64, 32, bias=False), torch.randn(16, 64, requires_grad=True)
    with StepMeasurement() as measured:
        layer(batch).sum().backward()
    assert measured.flops == 6 * 16 * 64 * 32


def test_rates_shares_and_mfu_follow_from_the_recorded_steps():
    telemetry = Telemetry(TelemetryConfig(measure_every=10), torch.device("cpu"), world_size=1,
                          bf16=False)
    assert telemetry.measures(1) and telemetry.measures(11) and not telemetry.measures(10)
    assert telemetry.peak > 1e8  # the measured GEMM peak of this CPU
    layer, batch = torch.nn.Linear(64, 32, bias=False), torch.randn(16, 64, requires_grad=True)
    with telemetry.measure() as measured:
        layer(batch).sum().backward()
    telemetry.record(tokens=100, seconds=0.5, data_wait=0.1, measured=measured, local_tokens=100)
    telemetry.record(tokens=300, seconds=1.5, data_wait=0.0)
    row = telemetry.row()
    assert row["tokens_per_s"] == pytest.approx(200.0)
    assert row["data_wait_share"] == pytest.approx(0.05)
    assert row["flops_per_token"] == pytest.approx(6 * 16 * 64 * 32 / 100)
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * 200.0 / telemetry.peak)
    assert len(row["memory_mib"]) == 1 and row["memory_mib"][0] > 50
    telemetry.record(tokens=200, seconds=2.0, data_wait=1.0)  # the next window: data-bound
    assert telemetry.row()["data_wait_share"] == pytest.approx(0.5)
    summary = telemetry.summary()  # the whole run: 600 tokens in 4 s, 1.1 s waiting
    assert summary["tokens_per_s"] == pytest.approx(150.0)
    assert summary["data_wait_share"] == pytest.approx(1.1 / 4)
    assert "150 tokens/s" in describe(summary) and "data wait 27.5%" in describe(summary)


def test_the_collectives_share_is_step_time_neither_computing_nor_waiting_for_data():
    telemetry = Telemetry(TelemetryConfig(measure_every=0), torch.device("cpu"), world_size=1,
                          bf16=False)
    telemetry.record(tokens=100, seconds=1.0, data_wait=0.1, busy=0.6)
    telemetry.record(tokens=100, seconds=1.0, data_wait=0.0, busy=1.0)  # all computing
    assert telemetry.row()["collective_wait_share"] == pytest.approx(0.15)
    summary = telemetry.summary()
    assert summary["collective_wait_share"] == pytest.approx(0.15)
    assert "collectives 15.0%" in describe(summary)


def test_measuring_the_peak_leaves_the_global_random_state_alone():
    """Telemetry starts after a resume restored the RNG: it must not draw from it."""
    before = torch.get_rng_state()
    Telemetry(TelemetryConfig(), torch.device("cpu"), world_size=1, bf16=False)
    assert torch.equal(torch.get_rng_state(), before)
