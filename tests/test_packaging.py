"""`qlora_core.kernels` imports from an installed copy, an editable install and the repository root, and the
top-level name `kernels` (a different PyPI package) is never claimed.

The installs build the way a user's `pip install` does: with build isolation, from pyproject.toml's
[build-system] (so nothing depends on the setuptools or wheel that the interpreter happens to have). The nested
venv of the editable test sees the test interpreter's packages (torch, ...) through a .pth line, not the base
interpreter's: only path entries are added, so the outer venv's own editable install of qlora_core stays invisible.
"""
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, json, qlora_core, qlora_core.kernels as k; "
    "spec = importlib.util.find_spec('kernels'); "
    "print(json.dumps({'pkg': qlora_core.__file__, 'kernels': list(k.__path__), "
    "'toplevel_origin': spec.origin if spec else None}))"
)


def probe(python, cwd, env=None):
    out = subprocess.run([python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def pip(python, *args):
    """Run pip; on failure the assertion shows pip's own output (the build log), not only an exit status."""
    out = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"pip {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(extra)
    return env


def test_from_repository_root():
    r = probe(sys.executable, ROOT, clean_env())
    assert Path(r["pkg"]).parent == ROOT / "qlora_core"
    assert [Path(p) for p in r["kernels"]] == [ROOT / "kernels"]
    # from the root, our `kernels/` must not become a regular top-level package (no __init__.py on purpose): a
    # top-level `kernels` with a file is PyPI's (transformers installs it), never this folder
    origin = r["toplevel_origin"]
    assert origin is None or ROOT / "kernels" not in Path(origin).resolve().parents, origin
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_from_installed_copy(tmp_path):
    target = tmp_path / "site"
    pip(sys.executable, "install", "-q", "--no-deps", "--target", str(target), str(ROOT))
    r = probe(sys.executable, tmp_path, clean_env(PYTHONPATH=str(target)))
    assert Path(r["pkg"]).parent == target / "qlora_core"
    assert [Path(p) for p in r["kernels"]] == [target / "qlora_core" / "kernels"]
    assert (target / "qlora_core" / "kernels" / "quant4.py").exists()
    assert not (target / "kernels").exists()


def test_from_editable_install(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    nested_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    # this interpreter's site-packages as plain path entries (torch, numpy, ... for the probe's import)
    Path(nested_site, "outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip(sys.executable, "--python", python, "install", "-q", "--no-deps", "-e", str(ROOT))
    r = probe(python, tmp_path, clean_env())
    assert Path(r["pkg"]).parent == ROOT / "qlora_core"
    assert [Path(p) for p in r["kernels"]] == [ROOT / "kernels"]
