"""The Transformers backend sweep's summary, printed at the end of the session from pytest's own
reports: how many architectures ran, passed and failed, and why each failure failed."""

from __future__ import annotations

SWEEP = "test_transformers_backend.py::test_parity["


def _reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return report.wasxfail
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0]
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr).splitlines()[-1]


def pytest_terminal_summary(terminalreporter):
    outcomes: dict[str, list] = {}
    for outcome in ("passed", "failed", "xfailed", "xpassed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if SWEEP in getattr(report, "nodeid", "") and (report.when == "call" or outcome == "skipped"):
                outcomes.setdefault(outcome, []).append(report)
    if not outcomes:
        return
    passed = len(outcomes.get("passed", []))
    failures = outcomes.get("failed", []) + outcomes.get("xfailed", []) + outcomes.get("xpassed", [])
    skipped = outcomes.get("skipped", [])
    ran = passed + len(failures)
    write = terminalreporter.write_line
    terminalreporter.section("Transformers backend sweep")
    write(f"{ran} architectures ran: {passed} passed ({100 * passed / max(ran, 1):.0f}%), {len(failures)} failed"
          f" ({len(outcomes.get('xfailed', []))} known), {len(skipped)} not applicable")
    labels = {"failed": "failed", "xfailed": "known", "xpassed": "XPASS, drop it from KNOWN_FAILURES", "skipped": "n/a"}
    rows = [(report.nodeid, labels[outcome], _reason(report))
            for outcome in labels for report in outcomes.get(outcome, [])]
    for nodeid, label, reason in sorted(rows):
        write(f"  {nodeid.split('[', 1)[1].rstrip(']')}: {label}: {reason}")
