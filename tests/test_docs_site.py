"""The docs under docs/ build as a mkdocs-material site with --strict (no broken links, no missing anchors, no
page left out of the nav), and every Markdown page under docs/ is listed in mkdocs.yml's nav."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_docs_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}\n{result.stdout}"
    assert (site / "index.html").is_file()
    assert (site / "policies" / "tome" / "index.html").is_file()


class _IgnoreTagsLoader(yaml.SafeLoader):
    """safe_load that tolerates tags such as !!python/name: (used by some Markdown extensions' settings)."""


_IgnoreTagsLoader.add_multi_constructor("", lambda loader, suffix, node: None)
_IgnoreTagsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _nav_pages(entry):
    if isinstance(entry, str):
        yield entry
    elif isinstance(entry, list):
        for item in entry:
            yield from _nav_pages(item)
    elif isinstance(entry, dict):
        for value in entry.values():
            yield from _nav_pages(value)


def test_every_docs_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_IgnoreTagsLoader)
    in_nav = {page for page in _nav_pages(config["nav"]) if page.endswith(".md")}
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert on_disk - in_nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(on_disk - in_nav)}"
    assert in_nav - on_disk == set(), f"nav entries with no page under docs/: {sorted(in_nav - on_disk)}"
