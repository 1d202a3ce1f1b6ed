"""scripts.bench.cpu's readings of /proc, perf stat and strace -c (the parts that need no nginx)."""

from __future__ import annotations

from pathlib import Path

from scripts.bench import cpu

# /proc/<pid>/stat of an nginx worker, its name holding ") " as a process name may.
STAT = (
    "4242 (nginx: worker) x) S 4241 4241 4241 0 -1 4194624 1500 0 7 0 1234 567 0 0 20 0 1 0 "
    "8888 123456 789 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0"
)

PERF = """# started on Tue Dec  1 05:00:00 2026

81234,,raw_syscalls:sys_enter,5000000000,100.00,,
<not supported>,,page-faults,0,0.00,,
1200,,context-switches,5000000000,100.00,,
"""

STRACE = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 58.18    0.416053          20     20044           writev
 25.52    0.182472           6     30073         5 recvfrom
  0.04    0.000303          17        17           accept4
------ ----------- ----------- --------- --------- ----------------
100.00    0.715110           9     71603         5 total
"""


def test_parse_stat_takes_the_fields_after_the_last_parenthesis() -> None:
    stat = cpu.parse_stat(STAT)
    assert (stat.utime, stat.stime, stat.minflt) == (1234, 567, 1500)


def test_parse_perf_csv_keeps_counted_events_only() -> None:
    assert cpu.parse_perf_csv(PERF) == {"raw_syscalls:sys_enter": 81234, "context-switches": 1200}


def test_parse_strace_counts_calls_by_name_without_the_total() -> None:
    assert cpu.parse_strace(STRACE) == {"writev": 20044, "recvfrom": 30073, "accept4": 17}


def test_per_request_in_microseconds() -> None:
    before = cpu.WorkerStat(utime=100, stime=200, minflt=10)
    after = cpu.WorkerStat(utime=100 + cpu.CLK_TCK, stime=200 + 2 * cpu.CLK_TCK, minflt=30)
    figures = cpu.per_request(before, after, 10_000)
    assert figures == {"user_us": 100.0, "sys_us": 200.0, "minflt": 0.002}


def test_lost_lines_counts_nginx_warnings(tmp_path: Path) -> None:
    log = tmp_path / "error.log"
    assert cpu.lost_lines(log) == 0
    warning = "[warn] 1#1: *3 send() to syslog failed while logging request, client: 127.0.0.1\n"
    log.write_text(warning * 3 + "[alert] something else\n")
    assert cpu.lost_lines(log) == 3
