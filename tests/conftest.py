from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # GPU tests are marked and run on the device (`pytest -m gpu`, `pytest -m multigpu` with 2+ GPUs); where the
    # GPUs are missing they are deselected, never skipped with a silent pass.
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    needs = {"gpu": 1, "multigpu": 2}
    keep, drop = [], []
    for item in items:
        short = any(item.get_closest_marker(m) and gpus < n for m, n in needs.items())
        (drop if short else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module (opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`).

    Tiny tensors gain nothing from intra-op threads, and on the shared 2-core box two OpenMP threads that wait on
    each other at every op made tests 10-100x slower under load (measured: a tiny-model training test 1.4 s ->
    120 s; 20 steps of the 8-bit optimizer reference 0.45 s -> 10.8 s; the main job's 12 steps > 10 min vs 158 s).
    Module scope, so it is in force before the module-scoped model fixtures are built.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _strict_run(config) -> str | None:
    """Why skips fail this run, or None: under CI (CI=true), and on the device (`-m gpu`), a skip means a test
    extra or the GPU stack is missing and an assertion silently did not run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return "CI"
    markexpr = config.getoption("markexpr", "") or ""
    if "gpu" in markexpr and "not gpu" not in markexpr:
        return "GPU run (-m gpu)"
    return None


def pytest_sessionfinish(session, exitstatus):
    why = _strict_run(session.config)
    if why is None:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reasons = sorted({str(getattr(r, "longrepr", ""))[-160:] for r in skipped})
        reporter.write_line(f"{why}: {len(skipped)} test(s) skipped; every assertion must run:", red=True)
        for reason in reasons[:10]:
            reporter.write_line(f"  {reason}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
