"""Micro-batching with a tiny fixed-weight model and fakeredis: no servers, no real models."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import fakeredis
import pytest
import torch
from torch import nn
from torchvision.transforms._presets import ImageClassification

from contract.errors import NotFound
from contract.job import ErrorInfo, Job
from contract.store import JobStore
from worker.inference import Classifier, Payload, PayloadKind
from worker.metrics import Metrics
from worker.models import LoadedModel
from worker.pipeline import Completion, Pipeline, WorkItem

LABELS = ("zero", "one", "two", "three")


class Tiny(nn.Module):
    """Logits are fixed functions of the input; a pixel above 100 makes the forward pass fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if (x > 100).any():
            raise RuntimeError("poisoned input")
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([mean * k for k in range(len(LABELS))], dim=1)


class CountingStore(JobStore):
    def __init__(self) -> None:
        super().__init__(fakeredis.FakeRedis())
        self.round_trips: list[int] = []

    def finish_many(self, jobs: list[Job]) -> list[bool]:
        self.round_trips.append(len(jobs))
        return super().finish_many(jobs)


@pytest.fixture
def tiny() -> Tiny:
    return Tiny()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


def _pipeline(
    model: Tiny,
    store: JobStore,
    max_batch: int = 8,
    wait_s: float = 0.2,
    *,
    store_batch: int = 64,
    store_wait_s: float = 0.005,
    inline_infer: bool | None = None,
) -> Pipeline:
    loaded = LoadedModel(
        "tiny", model, ImageClassification(crop_size=4, resize_size=4), LABELS, "test", False
    )
    classifier = Classifier(
        loaded,
        torch.device("cpu"),
        torch.float32,
        channels_last=False,
        compile=False,
        batch_size=max_batch,
    )
    return Pipeline(
        classifier,
        store,
        Metrics("tiny"),
        max_batch=max_batch,
        max_wait_s=wait_s,
        store_batch=store_batch,
        store_wait_s=store_wait_s,
        inline_infer=_INLINE_INFER[0] if inline_infer is None else inline_infer,
    )


# Whether the pipelines built here run inference on the assemble thread (as on a CPU device) or
# on their own infer thread (as on a GPU): every test runs both ways.
_INLINE_INFER = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["infer-thread", "inline-infer"])
def _infer_where(request: pytest.FixtureRequest) -> Iterator[None]:
    _INLINE_INFER[0] = request.param
    yield
    _INLINE_INFER[0] = False


def _item(store: JobStore, n: int, value: float) -> WorkItem:
    job = Job(id=f"j{n}", uri=f"{n}.jpg", model="tiny", top_k=2, submitted=0.0)
    store.create_many([job])
    return WorkItem(job, payload=Payload(PayloadKind.READY, torch.full((3, 4, 4), value)))


def _run(pipeline: Pipeline, items: list[WorkItem], together: bool = False) -> list[Job]:
    """Start, submit ``items`` (one by one, or ``together`` in one hand-over), their records."""
    pipeline.start()
    pipeline.expect(len(items))
    try:
        if together:
            pipeline.submit_many(items)
        else:
            for item in items:
                pipeline.submit(item)
        return [i.result(timeout=10) for i in items]
    finally:
        assert pipeline.close(timeout_s=10)


def test_waiting_jobs_share_one_forward_pass_and_one_store_round_trip(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(5)]
    records = _run(_pipeline(tiny, store), items)
    assert tiny.calls == [5]
    assert store.round_trips == [5]
    assert all(r.status == "done" for r in records)


def test_probabilities_are_the_softmax_of_the_logits_sorted_descending(tiny, store) -> None:
    (record,) = _run(_pipeline(tiny, store), [_item(store, 0, 1.0)])
    expected = torch.tensor([0.0, 1.0, 2.0, 3.0]).softmax(0)
    assert [p.label for p in record.predictions] == ["three", "two"]
    assert record.predictions[0].probability == pytest.approx(expected[3].item(), rel=1e-6)
    assert record.predictions[1].probability == pytest.approx(expected[2].item(), rel=1e-6)


def test_a_batch_never_exceeds_the_batch_size(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(10)]
    _run(_pipeline(tiny, store, max_batch=4), items)
    assert max(tiny.calls) <= 4
    assert sum(tiny.calls) == 10


def test_a_failing_batch_is_split_until_the_bad_job_is_alone(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(8)]
    items[5] = _item(store, 5, 1000.0)
    records = _run(_pipeline(tiny, store), items)
    statuses = {r.id: r.status for r in records}
    assert statuses.pop("j5") == "failed"
    assert set(statuses.values()) == {"done"}
    assert records[5].error.type == "internal"
    assert "poisoned input" in records[5].error.message


def test_jobs_that_failed_before_inference_are_stored_with_their_neighbours(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(3)]
    items[1].payload, items[1].error = None, NotFound("no such file: 1.jpg")
    records = _run(_pipeline(tiny, store), items)
    assert [r.status for r in records] == ["done", "failed", "done"]
    assert records[1].error.type == "not_found"
    assert sum(store.round_trips) == 3
    assert store.get("j1").status == "failed"


def test_a_lone_job_at_idle_runs_without_waiting_for_a_batch(tiny, store) -> None:
    pipeline = _pipeline(tiny, store, wait_s=30)
    pipeline.start()
    try:
        record = pipeline.submit(_item(store, 0, 0.5)).result(timeout=10)
    finally:
        assert pipeline.close(timeout_s=10)
    assert record.status == "done"
    assert tiny.calls == [1]


def test_a_job_marked_alone_runs_in_a_batch_of_its_own(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(4)]
    items[2].alone = True
    _run(_pipeline(tiny, store, wait_s=0.5), items)
    assert 1 in tiny.calls
    assert sum(tiny.calls) == 4


def test_items_handed_over_together_are_split_into_batches_and_each_resolved(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(10)]
    items[6].alone = True
    pipeline = _pipeline(tiny, store, max_batch=4, wait_s=0.5)
    pipeline.start()
    pipeline.expect(len(items))
    try:
        pipeline.submit_many(items[:7])
        pipeline.submit_many(items[7:])
        records = [i.result(timeout=10) for i in items]
    finally:
        assert pipeline.close(timeout_s=10)
    assert [r.id for r in records] == [f"j{n}" for n in range(10)]
    assert all(r.status == "done" for r in records)
    assert max(tiny.calls) <= 4 and sum(tiny.calls) == 10
    assert 1 in tiny.calls


# A store wait no test lives to see: a result stored under it was not held back by the wait.
FOREVER_S = 3600.0


def test_results_of_several_device_batches_in_flight_are_stored_in_one_call(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(6)]
    pipeline = _pipeline(tiny, store, max_batch=1, store_wait_s=FOREVER_S)
    pipeline.start()
    pipeline.expect(len(items))
    try:
        for item in items:  # each runs alone (batches of one); the rest are still expected
            pipeline.submit(item)
        records = [i.result(timeout=10) for i in items]
    finally:
        assert pipeline.close(timeout_s=10)
    assert tiny.calls == [1] * 6
    assert store.round_trips == [6]
    assert all(r.status == "done" for r in records)


def test_the_store_stops_gathering_once_it_holds_a_store_batch(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(6)]
    pipeline = _pipeline(tiny, store, max_batch=1, store_batch=2, store_wait_s=FOREVER_S)
    pipeline.start()
    pipeline.expect(len(items))
    try:
        for item in items:
            pipeline.submit(item)
        records = [i.result(timeout=10) for i in items]
    finally:
        assert pipeline.close(timeout_s=10)
    # Results reach the store stage in groups, so where the cuts fall varies; no call is larger.
    assert max(store.round_trips) <= 2 and sum(store.round_trips) == 6
    assert all(r.status == "done" for r in records)


def _count_hand_overs(pipeline: Pipeline) -> list[int]:
    """The sizes of the groups of items handed to the store thread, in order."""
    handed: list[int] = []
    put = pipeline._to_store.put

    def counted(got: list[WorkItem] | object, *args: object, **kwargs: object) -> None:
        if isinstance(got, list):
            handed.append(len(got))
        put(got, *args, **kwargs)  # type: ignore[arg-type]

    pipeline._to_store.put = counted  # type: ignore[method-assign]
    return handed


def test_results_of_back_to_back_batches_reach_the_store_in_one_hand_over(tiny, store) -> None:
    # Inline, the thread that runs inference has every batch at hand: it hands their results
    # over once, when it is about to wait (each hand-over wakes the store thread).
    items = [_item(store, n, 0.5) for n in range(6)]
    pipeline = _pipeline(tiny, store, max_batch=1, store_wait_s=FOREVER_S, inline_infer=True)
    handed = _count_hand_overs(pipeline)
    records = _run(pipeline, items, together=True)
    assert tiny.calls == [1] * 6
    assert handed == [6] and store.round_trips == [6]
    assert all(r.status == "done" for r in records)


def test_finished_results_reach_the_store_before_the_device_is_checked(tiny, store) -> None:
    # A job that fails alone makes the pipeline check the device, which exits the process if
    # the device is lost: the results that finished before it must be on their way to Redis.
    items = [_item(store, 0, 0.5), _item(store, 1, 0.5), _item(store, 2, 1000.0)]
    pipeline = _pipeline(tiny, store, max_batch=2, store_wait_s=FOREVER_S, inline_infer=True)
    handed = _count_hand_overs(pipeline)
    at_check: list[int] = []
    pipeline._check_device = lambda cause: at_check.append(sum(handed))  # type: ignore[method-assign]
    records = _run(pipeline, items, together=True)
    assert tiny.calls == [2, 1]
    assert at_check == [2]
    assert [r.status for r in records] == ["done", "done", "failed"]


class Slow(Tiny):
    """A model whose every batch takes longer than the store wait."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.1)
        return super().forward(x)


def test_a_slow_models_results_are_stored_batch_by_batch(store) -> None:
    model = Slow()
    items = [_item(store, n, 0.5) for n in range(3)]
    pipeline = _pipeline(model, store, max_batch=1, store_wait_s=0.01)
    pipeline.start()
    pipeline.expect(len(items))
    try:
        pipeline.submit_many(items)
        assert items[0].group.wait(10)
        assert len(model.calls) < 3  # stored before the last batch was over
        records = [i.result(timeout=10) for i in items]
    finally:
        assert pipeline.close(timeout_s=10)
    assert store.round_trips == [1, 1, 1]
    assert all(r.status == "done" for r in records)


def test_a_lone_job_is_stored_at_once_whatever_the_store_wait(tiny, store) -> None:
    pipeline = _pipeline(tiny, store, store_wait_s=FOREVER_S)
    _each_stored_alone(pipeline, store)


def test_the_store_stops_gathering_once_the_store_wait_is_over(tiny, store) -> None:
    pipeline = _pipeline(tiny, store, max_batch=1, store_wait_s=0.0)
    _each_stored_alone(pipeline, store, expected=2)  # the second still due when the first ends


def _each_stored_alone(pipeline: Pipeline, store: CountingStore, expected: int = 0) -> None:
    """Two jobs submitted one after the other (after announcing ``expected``): each is stored
    in a round trip of its own, the first before the second is submitted."""
    pipeline.start()
    pipeline.expect(expected)
    try:
        first = pipeline.submit(_item(store, 0, 0.5)).result(timeout=10)
        assert store.round_trips == [1]
        second = pipeline.submit(_item(store, 1, 0.5)).result(timeout=10)
    finally:
        assert pipeline.close(timeout_s=10)
    assert store.round_trips == [1, 1]
    assert (first.status, second.status) == ("done", "done")


def test_close_stores_every_gathered_result_without_waiting_for_the_rest(tiny, store) -> None:
    items = [_item(store, n, 0.5) for n in range(5)]
    pipeline = _pipeline(tiny, store, max_batch=2, store_wait_s=FOREVER_S)
    pipeline.start()
    pipeline.expect(len(items) + 3)  # three of them never come
    pipeline.submit_many(items)
    assert pipeline.close(timeout_s=10)
    assert sum(store.round_trips) == 5
    assert [i.result(timeout=0).status for i in items] == ["done"] * 5
    assert [store.get(i.job.id).status for i in items] == ["done"] * 5


class FailingStore(CountingStore):
    """A store whose every write fails for good (an error no retry helps)."""

    def finish_many(self, jobs: list[Job]) -> list[bool]:
        self.round_trips.append(len(jobs))
        raise RuntimeError("the write failed")


def test_gathered_results_that_cannot_be_stored_fail_their_items(tiny) -> None:
    store = FailingStore()
    items = [_item(store, n, 0.5) for n in range(4)]
    pipeline = _pipeline(tiny, store, max_batch=1, store_wait_s=FOREVER_S)
    pipeline.start()
    pipeline.expect(len(items))
    try:
        for item in items:
            pipeline.submit(item)
        assert all(i.group.wait(10) for i in items)
    finally:
        assert pipeline.close(timeout_s=10)
    assert store.round_trips == [4]
    for item in items:
        with pytest.raises(RuntimeError, match="the write failed"):
            item.result(timeout=0)


def test_a_group_resolves_once_all_its_items_are_stored(tiny) -> None:
    store = CountingStore()
    group = Completion(3)
    items = [_item(store, n, 0.5) for n in range(3)]
    for item in items:
        item.group = group
    pipeline = _pipeline(tiny, store, max_batch=1)
    pipeline.start()
    try:
        pipeline.submit_many(items[:2])
        assert not group.wait(0.5)  # two of three stored: the message is not done yet
        with pytest.raises(TimeoutError):
            items[0].result(timeout=0)
        pipeline.submit(items[2])
        assert [i.result(timeout=10).status for i in items] == ["done"] * 3
    finally:
        assert pipeline.close(timeout_s=10)
    assert sum(store.round_trips) == 3


class StuckStore(CountingStore):
    """A store whose write blocks until released: a stage that cannot finish."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def finish_many(self, jobs: list[Job]) -> list[bool]:
        self.entered.set()
        self.release.wait()
        return super().finish_many(jobs)


def test_close_stops_waiting_for_a_stuck_stage_at_its_timeout(tiny) -> None:
    store = StuckStore()
    pipeline = _pipeline(tiny, store)
    pipeline.start()
    done = pipeline.submit(_item(store, 0, 0.5))
    try:
        assert store.entered.wait(10)
        assert pipeline.close(timeout_s=0.1) is False
        assert "pipeline-store_loop" not in pipeline.dead_stages()
    finally:
        store.release.set()
    assert done.result(timeout=10).status == "done"
    assert pipeline.close(timeout_s=10) is True


def test_metrics_count_a_batch_of_records_by_outcome_and_show_only_stages_seen() -> None:
    metrics = Metrics("tiny")
    job = Job(id="j", uri="j.jpg", model="tiny", top_k=1, submitted=0.0)
    missing = ErrorInfo("not_found", "no such file")
    metrics.finished([job.done([], "w", False, 1.0)] * 3 + [job.failed(missing, 1.0)] * 2)
    metrics.stage("fetch", 0.01)
    metrics.stage("fetch", 0.02)
    registry = metrics.registry
    assert (
        registry.get_sample_value(
            "imgcls_jobs_total", {"model": "tiny", "status": "done", "error_type": ""}
        )
        == 3
    )
    labels = {"model": "tiny", "status": "failed", "error_type": "not_found"}
    assert registry.get_sample_value("imgcls_jobs_total", labels) == 2
    count = "imgcls_stage_seconds_count"
    assert registry.get_sample_value(count, {"model": "tiny", "stage": "fetch"}) == 2
    assert registry.get_sample_value(count, {"model": "tiny", "stage": "decode"}) is None
