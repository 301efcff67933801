"""Make the repository's top-level `kernels/` folder importable as `qlora_core.kernels`.

The design puts the Triton kernels in `kernels/` at the repository root, but a top-level package named
`kernels` already exists on PyPI, so we never claim that name: `kernels/` has no `__init__.py` (a bare
folder loses to any installed regular package of that name) and is only ever imported as
`qlora_core.kernels`. An installed wheel gets it there through setup.py's `package_dir`; in an editable
install or a plain checkout this shim binds the folder to that name when `qlora_core` is imported.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
import types


def bind(package_name: str, package_dir: str) -> None:
    """Bind `<package_name>.kernels` to the `kernels/` folder beside package_dir (the repository root's).

    No-op when that module is already in sys.modules, when package_dir holds its own `kernels/` (an installed
    wheel), or when there is no such folder. Side effects: a package module in sys.modules and an attribute of the
    already-imported package `package_name`; nothing inside the folder is imported yet.
    """
    name = package_name + ".kernels"
    if name in sys.modules or os.path.isdir(os.path.join(package_dir, "kernels")):
        return  # already bound, or an installed copy that carries qlora_core/kernels itself
    src = os.path.join(os.path.dirname(package_dir), "kernels")
    if not os.path.isdir(src):
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [src]
    module = types.ModuleType(name, "Triton kernels of qlora_core (bound from the repository's kernels/).")
    module.__spec__ = spec
    module.__path__ = [src]
    module.__package__ = name
    sys.modules[name] = module
    setattr(sys.modules[package_name], "kernels", module)
