"""Intra-op thread control (``gpo_lit.threads``): the busy rule and what ``one_thread`` sets."""

from __future__ import annotations

import os

import pytest
import torch

from gpo_lit import threads


@pytest.mark.parametrize(("extra", "busy"), [(-1, False), (0, False), (1, True), (10, True)])
def test_machine_busy_is_more_tasks_runnable_now_than_cores(monkeypatch, extra, busy):
    """The instant count decides, whatever the (lagging) load average says."""
    cores = os.cpu_count() or 1
    monkeypatch.setattr(threads, "_runnable_now", lambda: max(1, cores + extra))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0 if busy else 100.0, 0.0, 0.0))
    assert threads.machine_busy() is busy


def test_runnable_now_reads_proc_loadavg():
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg here")
    with open("/proc/loadavg") as f:
        total = int(f.read().split()[3].split("/")[1])
    now = threads._runnable_now()
    assert now is not None and 1 <= now <= total + 64  # this thread is running as it reads


@pytest.mark.parametrize(
    ("extra", "busy"), [(-1.0, False), (0.5, False), (1.0, False), (1.01, True), (10.0, True)]
)
def test_without_proc_machine_busy_is_load_above_cores_plus_one(monkeypatch, extra, busy):
    cores = os.cpu_count() or 1
    monkeypatch.setattr(threads, "_runnable_now", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (max(0.0, cores + extra), 0.0, 0.0))
    assert threads.machine_busy() is busy


def test_unreadable_load_is_not_busy(monkeypatch):
    def unreadable():
        raise OSError("no load average here")

    monkeypatch.setattr(threads, "_runnable_now", lambda: None)
    monkeypatch.setattr(os, "getloadavg", unreadable)
    assert threads.machine_busy() is False


@pytest.mark.parametrize(("when", "inside"), [(True, 1), (False, 2)])
def test_one_thread_only_when_asked_and_restores_the_threads(when, inside):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.one_thread(torch.device("cpu"), when=when):
            seen = torch.get_num_threads()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert (seen, after) == (inside, 2)


def test_load_average_prints_the_three_figures_and_the_cores(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.234, 0.5, 12.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads.load_average() == "load average 1.23 0.50 12.00 (1, 5, 15 min) on 2 CPUs"


def test_unreadable_load_average_says_unknown(monkeypatch):
    def unreadable():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unreadable)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert threads.load_average() == "load average unknown on 1 CPUs"
