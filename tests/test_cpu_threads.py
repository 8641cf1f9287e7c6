"""Threads for the work: all cores on an idle machine, the free ones beside other work, the user's choice kept."""

from __future__ import annotations

import pytest
import torch

from difflab.cli import main
from difflab.cpu_threads import busy_cores, choose_threads
from difflab.errors import ConfigError


def test_an_idle_machine_keeps_pytorchs_choice_and_a_busy_one_uses_the_free_cores():
    assert choose_threads(None, cores=2, load=0.2, environment=None) == (None, None)
    threads, note = choose_threads(None, cores=2, load=1.1, environment=None)
    assert threads == 1 and "busy (other work keeps 1.1 of 2 cores busy)" in note and "--threads 2" in note
    assert choose_threads(None, cores=8, load=3.0, environment=None)[0] == 5
    assert choose_threads(None, cores=4, load=9.0, environment=None)[0] == 1  # one core is always the job's
    assert choose_threads(None, cores=1, load=5.0, environment=None) == (None, None)


def test_the_users_choice_wins_over_the_load():
    assert choose_threads(2, cores=2, load=3.0, environment=None) == (2, None)
    assert choose_threads(None, cores=2, load=3.0, environment="2") == (None, None)  # OMP_NUM_THREADS said it
    assert choose_threads(None, cores=2, load=None, environment=None) == (None, None)  # no load average here


def test_busy_cores_are_read_from_the_machines_counters_for_this_processs_cores(tmp_path):
    import threading

    stat = tmp_path / "stat"
    # cpuN user nice system idle iowait irq softirq: core 0 busy all the time, core 1 idle, core 2 not ours
    before = "cpu  0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0\ncpu1 50 0 0 150 0 0 0\ncpu2 0 0 0 0 0 0 0\n"
    after = "cpu  0 0 0 0 0 0 0\ncpu0 200 0 0 100 0 0 0\ncpu1 50 0 0 240 0 10 0\ncpu2 0 0 0 999 0 0 0\n"
    stat.write_text(before)
    threading.Timer(0.05, stat.write_text, [after]).start()
    # 100 busy ticks of core 0's 100, 10 of core 1's 100 (irq): 2 cores * 110 / 200 = 1.1 busy cores
    assert busy_cores({0, 1}, seconds=0.3, stat=str(stat)) == pytest.approx(1.1)
    stat.write_text(before)
    threading.Timer(0.05, stat.write_text, [after]).start()
    assert busy_cores({1}, seconds=0.3, stat=str(stat)) == pytest.approx(10 / 100)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_a_thread_count_below_one_is_refused(bad):
    with pytest.raises(ConfigError, match="--threads must be a whole number, at least 1"):
        choose_threads(bad, cores=2, load=0.0, environment=None)


def test_threads_on_the_command_line_set_pytorchs_and_bad_ones_are_one_line(capsys, tmp_path):
    before = torch.get_num_threads()
    try:
        # `noise` is a command that runs no training: quick, and it goes through the same main()
        assert main(["noise", "--threads", "2", "--data", "digits", "--out", str(tmp_path / "n.png")]) == 0
        assert torch.get_num_threads() == 2
        capsys.readouterr()
        assert main(["noise", "--threads", "0", "--data", "digits", "--out", str(tmp_path / "m.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["difflab: error: --threads must be a whole number, at least 1 (got 0)"]
        assert not (tmp_path / "m.png").exists()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["noise", "--threads", "two"])
    assert "invalid int value: 'two'" in capsys.readouterr().err
