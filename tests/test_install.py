"""`adapters/` and `evals/` install as `vtprune.adapters` and `vtprune.evals`, editable and not."""
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _is_editable() -> bool:
    for dist in metadata.distributions(name="vtprune"):
        text = dist.read_text("direct_url.json")
        if text and json.loads(text).get("dir_info", {}).get("editable", False):
            return True
    return False


def test_current_install_maps_subpackages_into_the_namespace():
    import vtprune.adapters
    import vtprune.evals

    adapters = Path(vtprune.adapters.__file__).resolve()
    evals = Path(vtprune.evals.__file__).resolve()
    if _is_editable():  # the README's install: the source tree itself is imported
        assert adapters == REPO / "adapters" / "__init__.py"
        assert evals == REPO / "evals" / "__init__.py"
    else:
        assert adapters.parent.parent.name == "vtprune" and evals.parent.parent.name == "vtprune"
    assert vtprune.adapters.__name__ == "vtprune.adapters"
    assert "adapters" not in sys.modules and "evals" not in sys.modules  # no top-level packages


def test_regular_install_puts_adapters_and_evals_inside_vtprune(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    assert (target / "vtprune" / "adapters" / "timm_vit.py").is_file()
    assert (target / "vtprune" / "evals" / "__init__.py").is_file()
    assert (target / "vtprune" / "configs" / "llava-1.5-7b.json").is_file()  # package data: the FLOPs configs
    assert not (target / "adapters").exists() and not (target / "evals").exists()
    probe = ("import vtprune, vtprune.adapters, vtprune.evals, vtprune.flops, json; "
             "print(json.dumps([vtprune.__file__, vtprune.adapters.__file__, vtprune.evals.__file__, "
             "vtprune.flops.estimate('llava-1.5-7b').total]))")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    *paths, total = json.loads(out.stdout)
    files = [Path(p).resolve() for p in paths]
    assert files == [target.resolve() / "vtprune" / "__init__.py",
                     target.resolve() / "vtprune" / "adapters" / "__init__.py",
                     target.resolve() / "vtprune" / "evals" / "__init__.py"]
    assert round(total / 1e12, 2) == 3.82  # read from the installed config file
