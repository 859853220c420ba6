"""Admission control: a queue bounded by count and tokens; 429s that say when to retry."""

from __future__ import annotations

import pytest

from surge.server.admission import AdmissionController, AdmissionRejected

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_controller(
    max_requests: int = 4, max_tokens: int = 1000, clock: FakeClock | None = None
) -> AdmissionController:
    return AdmissionController(max_requests, max_tokens, time_fn=clock or FakeClock())


def test_rejects_past_request_limit_and_says_limit_and_depth() -> None:
    controller = make_controller(max_requests=2)
    controller.admit(10)
    controller.admit(10)
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(10)
    rejected = caught.value
    assert rejected.reason == "queue_full_requests"
    assert "2 requests are waiting" in rejected.message
    assert "--max-queued-requests=2" in rejected.message
    assert rejected.retry_after >= 1
    # A refused request takes no place in the queue.
    assert controller.num_queued == 2
    assert controller.queued_tokens == 20


def test_rejects_past_token_limit_and_says_both_numbers() -> None:
    controller = make_controller(max_requests=10, max_tokens=100)
    controller.admit(60)
    controller.admit(40)  # exactly at the limit is allowed
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(1)
    assert caught.value.reason == "queue_full_tokens"
    assert "100 prompt tokens are waiting" in caught.value.message
    assert "adds 1" in caught.value.message
    assert "--max-queued-tokens=100" in caught.value.message


def test_prompt_larger_than_token_limit_is_admitted_into_an_empty_queue() -> None:
    # Otherwise it would be refused forever and Retry-After would be a lie.
    controller = make_controller(max_tokens=100)
    ticket = controller.admit(500)
    assert controller.queued_tokens == 500
    with pytest.raises(AdmissionRejected):
        controller.admit(1)
    ticket.release()
    assert controller.queued_tokens == 0


def test_started_frees_the_slot_for_the_next_request() -> None:
    controller = make_controller(max_requests=1)
    ticket = controller.admit(10)
    with pytest.raises(AdmissionRejected):
        controller.admit(10)
    ticket.started()
    assert (controller.num_queued, controller.queued_tokens) == (0, 0)
    controller.admit(10)
    assert controller.num_queued == 1


def test_release_and_started_are_idempotent() -> None:
    controller = make_controller()
    first, second = controller.admit(10), controller.admit(20)
    first.started()
    first.release()
    first.release()
    first.started()
    assert (controller.num_queued, controller.queued_tokens) == (1, 20)
    second.release()
    second.release()
    assert (controller.num_queued, controller.queued_tokens) == (0, 0)


def test_with_block_releases_on_exception() -> None:
    # A handler that fails (or a client that hangs up) must not leak its queue slot.
    controller = make_controller(max_requests=1)
    with pytest.raises(RuntimeError), controller.admit(10):
        raise RuntimeError("client disconnected")
    assert controller.num_queued == 0
    controller.admit(10)


def test_retry_after_follows_departure_rate() -> None:
    clock = FakeClock()
    controller = make_controller(max_requests=4, clock=clock)
    tickets = [controller.admit(1) for _ in range(4)]
    # Requests leave the queue every 2 s: four queued ones take about 8 s to start.
    for ticket in tickets:
        clock.advance(2.0)
        ticket.started()
        controller.admit(1)
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(1)
    assert caught.value.retry_after == 8
    assert "Retry after 8 s" in caught.value.message


def test_retry_after_is_at_least_one_second_when_queue_moves_fast() -> None:
    clock = FakeClock()
    controller = make_controller(max_requests=2, clock=clock)
    for _ in range(20):
        clock.advance(0.001)
        controller.admit(1).started()
    controller.admit(1)
    controller.admit(1)
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(1)
    assert caught.value.retry_after == 1


def test_retry_after_grows_while_queue_is_stalled_and_caps_at_60() -> None:
    # A stuck engine makes no departures, so the average alone would never change.
    clock = FakeClock()
    controller = make_controller(max_requests=1, clock=clock)
    controller.admit(1)
    clock.advance(5.5)
    assert controller.retry_after() == 6
    clock.advance(3600)
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(1)
    assert caught.value.retry_after == 60


@pytest.mark.parametrize(("requests", "tokens"), [(0, 10), (10, 0), (-1, 10), (True, 10)])
def test_limits_must_be_positive_integers(requests: int, tokens: int) -> None:
    with pytest.raises(ValueError, match="must be a whole number >= 1"):
        AdmissionController(requests, tokens)


def test_negative_prompt_length_is_a_bug_not_a_rejection() -> None:
    with pytest.raises(ValueError):
        make_controller().admit(-1)
