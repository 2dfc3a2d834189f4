"""The documentation site: its generated reference pages equal what the code says now (config keys, every
command's --help as the CLI prints it, exit codes, metric keys), and `mkdocs build --strict` passes (no broken
link or anchor, no page outside the nav, no warning). The README stays short and points into the site."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_generated_reference_pages_are_current():
    r = subprocess.run(
        [sys.executable, "scripts/gen_docs.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_site_builds_strictly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_the_readme_is_short_and_links_into_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert (
        "bash scripts/setup.sh && dist-ft demo" in readme
        and "bash scripts/setup.sh && python3 -m pytest -q" in readme
    )
    for page in ("docs/index.md", "docs/reference/config.md", "docs/tutorials/slurm.md"):
        assert f"({page})" in readme, page
