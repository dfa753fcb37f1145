"""The benchmark workload: the same seed gives every system the same requests, within the asked shape."""

from __future__ import annotations

from bench.workload import pairs, workload


def test_a_seed_gives_the_same_workload_and_another_seed_a_different_one() -> None:
    assert workload(3, 20) == workload(3, 20)
    assert workload(3, 20) != workload(4, 20)


def test_requests_keep_within_the_asked_numbers_of_docs_and_words() -> None:
    requests = workload(1, 200, min_docs=2, max_docs=7, min_words=5, max_words=9)
    assert {len(r.docs) for r in requests} == set(range(2, 8))
    assert all(5 <= len(doc.split()) <= 9 for r in requests for doc in r.docs)
    assert pairs(requests) == sum(len(r.docs) for r in requests)


def test_a_simulated_bench_worker_gets_one_model_its_timings() -> None:
    """A worker takes one --model per model served: the zero-cost runs failed at start when given the weights too."""
    from bench.peers import ZERO_COST
    from bench.systems import worker_command

    simulated = worker_command("/weights", ("--ranker", "simulated", "--model", ZERO_COST))
    assert simulated.count("--model") == 1 and simulated[simulated.index("--model") + 1] == ZERO_COST
    real = worker_command("/weights", ("--device", "cpu"))
    assert real.count("--model") == 1 and real[real.index("--model") + 1] == "/weights"


def test_a_result_file_names_the_versions_that_change_its_figures() -> None:
    import importlib.metadata

    from bench import provenance

    packages = provenance.describe()["packages"]
    assert packages["torch"] == importlib.metadata.version("torch")
    assert packages["sentence-transformers"] == importlib.metadata.version("sentence-transformers")
