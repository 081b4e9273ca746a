"""How the local runner lays workers out over the devices of one host."""

from __future__ import annotations

import os

from trainer.runner import cpu_threads_per_worker, visible_devices


def test_cpu_workers_share_the_cores_and_gpu_workers_keep_torch_defaults(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cpu_threads_per_worker(["cpu", "cpu"]) == 8
    assert cpu_threads_per_worker(["cpu"] * 32) == 1
    assert cpu_threads_per_worker(["cpu"]) == 0
    assert cpu_threads_per_worker(["cuda:0", "cuda:1"]) == 0


def test_one_worker_per_visible_gpu_or_the_requested_number_of_cpu_workers(monkeypatch):
    monkeypatch.setattr("trainer.runner._cuda_device_count", lambda: 2)
    assert visible_devices("auto", 0) == ["cuda:0", "cuda:1"]
    assert visible_devices("cuda", 1) == ["cuda:0"]
    assert visible_devices("cpu", 2) == ["cpu", "cpu"]
    monkeypatch.setattr("trainer.runner._cuda_device_count", lambda: 0)
    assert visible_devices("auto", 0) == ["cpu"]
    assert visible_devices("cuda:1", 0) == ["cuda:1"]
