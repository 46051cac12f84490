"""Chapter 10 checks: the scheduler step against wrong schedulers, the stub, and the default answers."""

from course_lib.exercises import ch10
from course_lib.serving import schedule_step


def test_schedule_step_reference():
    batch, waiting, free = schedule_step([(0, 5, 5, 3), (1, 2, 9, 2)], [(7, 3), (8, 1)], 4, 0)
    assert batch == [1, 7] and waiting == [8] and free == 0  # 8 would fit 1 block, but 7 came first and took 3
    assert schedule_step([], [(1, 2), (2, 2)], 1, 9) == ([1], [2], 7)  # the batch limit


def test_scheduler_check():
    assert ch10.check_schedule_step(schedule_step)
    for wrong, word in ((ch10._keep_finished, "must leave"), (ch10._no_free, "back to the pool"),
                        (ch10._ignore_limit, "max_batch"), (ch10._overtake, "first come")):
        fb = ch10.check_schedule_step(wrong)
        assert not fb and word in fb.message, (wrong, fb.message)
    assert "three things" in ch10.check_schedule_step(lambda *a: [1]).message

    def stub(*a):
        raise NotImplementedError
    fb = ch10.check_schedule_step(stub)
    assert not fb and not fb.done


def test_default_answers_never_pass():
    rows = [dict(batch=1, tpot_ms=10.0), dict(batch=2, tpot_ms=12.0)]
    for fb in (ch10.check_max_batch("?", rows, 20.0), ch10.check_required_tokens_per_s("?", 150)):
        assert not fb and not fb.done
    assert not ch10.check_required_tokens_per_s(0.0, 150)
    stub = ch10.check_e2e(lambda *a: (_ for _ in ()).throw(NotImplementedError))
    assert not stub and not stub.done


def _scheduler(over_by=0, subtract=True, ids_only=True):
    """A learner's scheduler step: right, or one row over max_batch, or not taking the newcomers' blocks."""
    def fn(running, waiting, max_batch, free):
        batch = [rid for rid, done, wanted, _ in running if done < wanted]
        free += sum(held for _, done, wanted, held in running if done >= wanted)
        queue = list(waiting)
        while queue and len(batch) < max_batch + over_by and queue[0][1] <= free:
            rid, need = queue.pop(0)
            batch.append(rid)
            free -= need if subtract else 0
        return batch, [rid for rid, _ in queue] if ids_only else queue, free
    return fn


def test_scheduler_check_names_the_subtler_mistakes():
    assert ch10.check_schedule_step(_scheduler())
    over = ch10.check_schedule_step(_scheduler(over_by=1))
    assert not over and "at most max_batch = 3 rows" in over.message
    kept = ch10.check_schedule_step(_scheduler(subtract=False))
    assert not kept and "subtract its blocks_needed" in kept.message
    pairs = ch10.check_schedule_step(_scheduler(ids_only=False))
    assert not pairs and "request *ids*" in pairs.message


def test_answers_that_are_not_numbers_get_feedback_not_a_crash():
    rows = [dict(batch=1, tpot_ms=10.0), dict(batch=2, tpot_ms=12.0)]
    for fb in (ch10.check_max_batch("2", rows, 20.0), ch10.check_max_batch(None, rows, 20.0),
               ch10.check_required_tokens_per_s("3.25", 150), ch10.check_required_tokens_per_s(None, 150)):
        assert not fb and fb.done and "as a number" in fb.message
    assert ch10.check_max_batch(2, rows, 20.0) and ch10.check_required_tokens_per_s(150 / 60 * 1.3, 150)
