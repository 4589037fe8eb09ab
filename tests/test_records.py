"""Benchmark records: concurrent writers to one results file lose nothing."""

import multiprocessing

from cmpq.eval.records import append_record, read_records


def _writer(path: str, worker: int) -> None:
    for i in range(25):
        append_record(path, {"worker": worker, "i": i})


def test_concurrent_appends_keep_every_record(tmp_path):
    path = tmp_path / "r.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    records = read_records(path)
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(3) for i in range(25)]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
