"""The shared row buffers against their definitions: ring slots, oldest-first order, SwAV's newest-first queue."""

import torch

from streamssl.models.ring import oldest_first, push_newest_first, ring_slots


def test_ring_slots_continue_after_the_last_write_and_wrap_around() -> None:
    skipped, slots = ring_slots(torch.tensor(8), 4, 10)  # next write at 8: slots 8, 9, then 0, 1
    assert skipped == 0 and slots.tolist() == [8, 9, 0, 1]
    _, same = ring_slots(torch.tensor(18), 4, 10)  # any counter congruent mod the size
    assert same.tolist() == slots.tolist()


def test_ring_slots_keep_only_the_last_rows_of_a_batch_larger_than_the_ring() -> None:
    skipped, slots = ring_slots(torch.tensor(3), 7, 5)
    # Written one by one, rows 0..6 would go to 3, 4, 0, 1, 2, 3, 4: rows 2..6 are the ones that remain.
    assert skipped == 2 and slots.tolist() == [0, 1, 2, 3, 4]


def test_oldest_first_lists_the_filled_slots_from_the_oldest_write() -> None:
    assert oldest_first(torch.tensor(3), 5).tolist() == [0, 1, 2]  # not yet full
    assert oldest_first(torch.tensor(5), 5).tolist() == [0, 1, 2, 3, 4]
    assert oldest_first(torch.tensor(7), 5).tolist() == [2, 3, 4, 0, 1]  # wrapped: slot 2 holds row 2 of 7


def test_push_newest_first_shifts_each_queue_and_drops_the_oldest() -> None:
    queue, written = torch.zeros(2, 5, 1), torch.zeros((), dtype=torch.long)
    for batch in range(3):  # batches of 2 rows per queue, values 10 * batch + row (+ 100 in the second queue)
        rows = (10 * batch + torch.arange(2.0)).reshape(1, 2, 1) + torch.tensor([0.0, 100.0]).reshape(2, 1, 1)
        push_newest_first(queue, written, rows)
    assert queue[0, :, 0].tolist() == [20, 21, 10, 11, 0]  # newest batch first; row 1 of batch 0 fell off
    assert queue[1, :, 0].tolist() == [120, 121, 110, 111, 100]
    assert written.item() == 6
