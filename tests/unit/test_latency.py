"""The latency budget: stage durations from stamps, percentiles, and the bus fields that carry them."""

import pytest

from pipeline import latency
from pipeline.bus import messages


def test_stages_of_a_packet_that_crossed_every_stage():
    # read 0, ingress sent at 10 µs, worker took it at 60, sent at 100; egress took at 150, wrote at 170.
    assert latency.arrival([0.0, 10e-6], took=60e-6) == {"ingress": [10], "to_worker": [50]}
    got = latency.departure([0.0, 10e-6, 60e-6, 100e-6], received=150e-6, written=170e-6)
    assert got == {"worker": [40], "to_egress": [50], "egress": [20], "total": [170]}


def test_output_the_worker_made_itself_starts_at_the_worker():
    assert latency.arrival([None, None], took=1.0) == {}
    got = latency.departure([None, None, 1.0, 1.0002], received=1.0003, written=1.0004)
    assert set(got) == {"worker", "to_egress", "egress"}
    assert got["worker"] == [200] and got["to_egress"] == [100] and got["egress"] == [100]


def test_budget_percentiles_counts_and_bounds():
    budget = latency.Budget(keep=100)
    budget.add({"worker": list(range(1, 101)), "no_such_stage": [5]})
    budget.add({"worker": [1000]})  # the oldest sample leaves the reservoir
    row = budget.summary()["worker"]
    assert row == {"p50_us": 51, "p99_us": 100, "count": 101}
    assert list(budget.summary()) == ["worker"]
    budget.clear()
    assert budget.summary() == {}


def test_summary_is_in_pipeline_order():
    budget = latency.Budget()
    budget.add({stage: [1] for stage in reversed(latency.STAGES)})
    assert list(budget.summary()) == list(latency.STAGES)


def test_stamped_packets_round_trip_and_unstamped_stay_plain():
    items = [(b"\x45" + bytes(19), None)]
    plain = messages.encode_packets(items)
    assert messages.decode(plain) == messages.Packets(items)
    stamped = messages.decode(messages.encode_packets(items, [1.5, 2.5]))
    assert stamped.stamps == [1.5, 2.5] and stamped.items == items
    offload = (1, 1, 54, 1448, 34, 16)
    both = messages.decode(messages.encode_packets([(b"x", offload)], [None, None, 3.0]))
    assert both.items == [(b"x", offload)] and both.stamps == [None, None, 3.0]


def test_latency_samples_round_trip():
    msg = messages.decode(messages.encode_latency("egress.1", {"egress": [3, 4], "total": [9]}))
    assert msg == messages.Latency("egress.1", {"egress": [3, 4], "total": [9]})


@pytest.mark.parametrize("fields", [
    [messages.VERSION, messages.PACKETS, None, "soon"],
    [messages.VERSION, messages.PACKETS, None, [1.0, 2.0, 3.0, 4.0, 5.0]],
    [messages.VERSION, messages.PACKETS, None, [1.0, "x"]],
    [messages.VERSION, messages.PACKETS, None, [1.0], "extra"],
])
def test_malformed_stamps_are_a_bus_error(fields):
    import msgpack

    with pytest.raises(messages.BusError):
        messages.decode([msgpack.packb(fields), b"packet"])


@pytest.mark.parametrize("samples", [{"egress": [-1]}, {"egress": "many"}, {1: [2]}, {"egress": [1.5]}, []])
def test_malformed_latency_samples_are_a_bus_error(samples):
    import msgpack

    with pytest.raises(messages.BusError):
        messages.decode([msgpack.packb([messages.VERSION, messages.LATENCY, "egress.1", samples])])
