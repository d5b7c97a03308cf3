"""Shared test set-up: Hypothesis profiles, and the reliability tally printed after a run.

Hypothesis profiles (the property tests in tests/test_properties.py and others):

- ``default``: 100 examples per property test (a few hundred in all), for every run;
- ``long``: 2,000 per property test: ``pytest tests/test_properties.py --hypothesis-profile=long``.

Both have no deadline (an onnxruntime session takes from 2 ms to 200 ms depending on the
machine's load) and print the ``@reproduce_failure`` blob of a failure next to the
falsifying example, which already shows the whole graph spec (see tests/model_strategies.py).

The tally (`tally` fixture) counts inputs tried by tests/test_reliability.py and
tests/test_properties.py; the summary line at the end of the run gives the figures quoted in
README's Reliability section.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil

import pytest
from hypothesis import settings

# The default profile is derandomized: the same examples every run, so `make test` (and CI)
# is reproducible; the long profile explores fresh random examples.
settings.register_profile("default", max_examples=100, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile("default")


def pytest_configure(config):
    # Registered profiles exist only once this file is imported: load the one asked for
    # here too, whatever the order in which pytest and Hypothesis's plugin configure.
    settings.load_profile(config.getoption("hypothesis_profile", None) or "default")

_TALLY: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="session")
def tally() -> collections.Counter[str]:
    """Counts of inputs tried, by kind; printed at the end of the run."""
    return _TALLY


def pytest_terminal_summary(terminalreporter):
    if _TALLY:
        profile = settings.get_current_profile_name()
        items = ", ".join(f"{k} {v}" for k, v in sorted(_TALLY.items()))
        terminalreporter.write_line(f"reliability tally (hypothesis profile {profile!r}): {items}")


@contextlib.contextmanager
def read_only_folder(path):
    """Create ``path`` as a folder nobody may write to and yield the command prefix that
    makes that true for a child process (root writes anywhere: setpriv drops the
    capability); the folder is made writable again afterwards so pytest can clean up."""
    path.mkdir()
    path.chmod(0o555)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            path.chmod(0o755)
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
    try:
        yield prefix
    finally:
        path.chmod(0o755)
