"""``comfy-tetriserve reliability`` at CI size: a real service (2 CPU workers, tiny FLUX and SD3),
500 soak jobs with flat memory, every hostile input refused while good jobs finish, the service
killed under 8 jobs (every client told, every resubmit finished), at least 3 worker faults during
at least 50 jobs with none lost (results equal to direct sampling), and a poison job that fails with
its reason. The full-size run is in docs/reliability.md."""
from __future__ import annotations

import json

import pytest

from comfy_tetriserve import cli
from comfy_tetriserve.reliability.command import Options, checks, summary
from comfy_tetriserve.reliability.hostile import CASES


@pytest.mark.slow
def test_ci_size_drills_pass_with_nothing_lost(tmp_path, capsys):
    out = tmp_path / "reliability.json"
    code = cli.main(["reliability", "--workers", "2", "--soak-jobs", "500", "--fault-jobs", "50", "--fault-kills", "3",
                     "--workdir", str(tmp_path / "work"), "--json", str(out), "--phase-timeout-s", "600"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    failed = {k: v for k, v in report["checks"].items() if not v[0]}
    assert code == 0 and report["verdict"], (failed, printed, report["service"])

    faults = report["faults"]
    assert faults["faults_injected"] >= 3 and faults["jobs_submitted"] >= 50 and faults["jobs_lost"] == 0
    assert faults["jobs_finished"] == faults["jobs_submitted"] == faults["checked_vs_direct"]
    assert faults["max_rel_err"] <= 1e-5 and faults["pool_restarts"] >= 3
    assert faults["jobs_requeued"] >= 1 and faults["noticed_max_s"] < 2.0
    # a hung worker (SIGSTOP) is found by the stall watchdog (--stall-timeout-s 3 in the drill)
    assert {k["signal"] for k in faults["kills"]} == {"SIGKILL", "SIGTERM", "SIGSTOP"}
    assert 3.0 <= faults["hang_noticed_max_s"] < 10.0
    poison = faults["poison"]
    assert poison["status"] == "failed" and poison["kills"] == 2 and "--max-job-faults 2" in poison["error"]
    assert poison["bystanders_finished"] == poison["bystanders"] == 4

    soak = report["soak"]
    assert soak["jobs_submitted"] == soak["jobs_ended"] == 500 and not soak["not_as_asked"]
    assert soak["finished"] + soak["cancelled_as_asked"] == 500 and soak["cancelled_as_asked"] >= 20
    assert soak["rss_growth"] < 0.10 and soak["jobs_held_after"] == 0
    assert soak["checked_vs_direct"] >= 40 and soak["max_rel_err"] <= 1e-5
    assert soak["determinism_pairs"] >= 20 and soak["determinism_max_rel_err"] <= 1e-5

    restart = report["restart"]
    assert restart["unfinished_at_kill"] >= 1 and not restart["silent"]
    assert restart["told_lost"] == restart["lost_counted"] == restart["resubmitted"] >= 1
    assert restart["finished"] == restart["jobs_submitted"] == 8

    hostile = report["hostile"]
    assert hostile["sent"] == len(CASES) >= 30 and hostile["refused"] == hostile["sent"]
    assert hostile["good_finished"] == hostile["good_jobs"] > 0 and hostile["service_alive"]
    assert report["service"]["exit_code"] == 0

    for line in ("workers killed / 0 jobs lost", "500 jobs submitted / 500 ended", "8/8 finished after resubmitting",
                 f"{len(CASES)} sent / {len(CASES)} refused", "PASS"):
        assert line in printed, (line, printed)


def test_a_failed_check_fails_the_verdict():
    report = {"soak": {"jobs_submitted": 500, "jobs_ended": 499, "finished": 480, "cancelled_as_asked": 19,
                       "not_as_asked": ["#7 cancel: None TimeoutError"], "checked_vs_direct": 50, "max_rel_err": 1e-7,
                       "determinism_pairs": 30, "determinism_max_rel_err": 0.0, "rss_early_mb": 300.0,
                       "rss_late_mb": 345.0, "rss_growth": 0.15, "jobs_held_after": 3, "duration_s": 10.0},
              "service": {"alive_at_end": True, "exit_code": 0}, "duration_s": 12.0}
    report["checks"] = checks(report, Options(phases=("soak",)))
    report["verdict"] = all(ok for ok, _ in report["checks"].values())
    assert not report["verdict"]
    assert not report["checks"]["soak: memory flat"][0] and not report["checks"]["soak: every job ended as asked"][0]
    assert "+15.0 %" in summary(report) and "FAIL" in summary(report)
