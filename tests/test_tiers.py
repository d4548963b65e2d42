"""The suite's tiers (tests/conftest.py): each test is marked from what it uses, and `pytest -m fast`
takes only tests that need no Ray, cluster, CLI, model or S3. Run on planted tests with this suite's own
conftest, in a subprocess (pytester), so nothing heavy starts here."""

from __future__ import annotations

from pathlib import Path

PLANTED = """
import pytest
import conftest

def test_plain():
    pass

def test_on_the_session_ray(ray_session):
    pass

def test_on_the_ray_address(ray_address):
    pass

def test_with_the_tiny_model(tiny_model):
    pass

def test_on_s3(s3_endpoint):
    pass

@pytest.mark.cli
def test_marked_cli():
    conftest._started["cli"] += 1

@pytest.mark.slow
def test_marked_slow():
    pass

def test_runs_the_cli_unmarked():
    conftest._started["cli"] += 1  # what run_cli does

def test_starts_a_cluster_unmarked():
    conftest._started["cluster"] += 1  # what isolated_cluster does
"""


def _suite(pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_planted=PLANTED)


def _selected(pytester, *args: str) -> set[str]:
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    return {line.split("::")[1] for line in result.outlines if "::" in line}


def test_a_test_using_a_ray_fixture_is_never_in_the_fast_tier(pytester):
    _suite(pytester)
    fast = _selected(pytester, "-m", "fast")
    assert fast == {"test_plain", "test_runs_the_cli_unmarked", "test_starts_a_cluster_unmarked"}
    assert _selected(pytester, "-m", "ray") == {"test_on_the_session_ray", "test_on_the_ray_address"}
    assert {"test_with_the_tiny_model", "test_on_s3", "test_on_the_session_ray"} <= _selected(
        pytester, "-m", "model or s3"
    )


def test_the_fast_tier_fails_a_test_that_starts_the_cli_or_a_cluster_unmarked(pytester):
    _suite(pytester)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-m", "fast or cli")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_runs_the_cli_unmarked is in the fast tier but starts cli: mark it @pytest.mark.cli",
            "*test_starts_a_cluster_unmarked is in the fast tier but starts cluster: mark it "
            "@pytest.mark.cluster",
        ]
    )
