"""Reading a Prometheus text scrape in tests: samples by name and labels, and promtool's check."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """``(sample name, sorted labels) -> value`` of one scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0.0 when the scrape does not have it."""
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` over ``text`` (fails the test when promtool is missing)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (Debian package prometheus)")
    return subprocess.run(
        [binary, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


def fetch(url: str, timeout_s: float = 10.0) -> Samples:
    """Scrape ``url`` (a daemon's ``/metrics``) over HTTP."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return samples(response.read().decode())


def probes_url(log: str) -> str | None:
    """The daemon's HTTP base URL, from its "probes at http://..." log line (None: not yet)."""
    match = re.search(r"probes at (http://[0-9a-z.:\[\]-]+)", log)
    return match.group(1) if match else None
