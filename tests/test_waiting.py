"""When a waiter takes its result subscription for deaf (producer/waiting.py ``Deafness``). Pure logic."""

from __future__ import annotations

from rerankq.producer.waiting import DEAF_SWEEPS, Deafness


def test_sweeps_that_find_results_with_no_message_heard_between_them_reopen_the_subscription() -> None:
    deafness = Deafness()
    assert [deafness.swept(1) for _ in range(DEAF_SWEEPS)] == [False] * (DEAF_SWEEPS - 1) + [True]
    assert not deafness.swept(1)  # counting starts over on the new connection


def test_one_sweep_finding_a_result_is_no_sign_a_result_is_written_before_it_is_published() -> None:
    deafness = Deafness()
    assert DEAF_SWEEPS > 1
    assert not deafness.swept(3)
    assert not deafness.swept(0)
    assert not deafness.swept(3)


def test_a_message_heard_since_the_last_sweep_means_the_subscription_is_alive() -> None:
    deafness = Deafness()
    for _ in range(3 * DEAF_SWEEPS):
        deafness.heard()
        assert not deafness.swept(2)
