"""Start-up hook: `wp` and `widen` are registered as soon as mergekit's merge methods load.

The wheel ships this file a second time as the top-level module `_mergekit_wp_hook`, which
`mergekit_wp_hook.pth` imports at interpreter start-up; that is how plain `mergekit-yaml` finds
`wp` and `widen`. It uses the standard library only and calls `mergekit_wp.register()` (which
imports torch and mergekit) only right after mergekit's merge methods have loaded.
MERGEKIT_WP_NO_HOOK=1 turns it off.
"""

from __future__ import annotations

import os
import sys

TARGET = "mergekit.merge_methods"
DISABLE_ENV = "MERGEKIT_WP_NO_HOOK"


class _LoaderProxy:
    """The real loader of TARGET, plus registration of `wp` and `widen` once the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        uninstall()
        _register()


class RegisterWpFinder:
    """Meta path finder that only wraps the loader of TARGET; every other import is untouched."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderProxy(spec.loader)
                return spec
        return None


def _mergekit_wp_importing() -> bool:
    """Whether a module of mergekit_wp is still executing, i.e. it is what imports mergekit."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "mergekit_wp"
    )


def _register() -> None:
    # Registering now would import that half-built module; mergekit_wp's own code that imports
    # mergekit calls register() itself once it can (register(), the CLI, or the caller).
    if _mergekit_wp_importing():
        return
    try:
        import mergekit_wp

        mergekit_wp.register()
    except Exception as err:  # noqa: BLE001 - a broken extension must not break mergekit
        import warnings

        warnings.warn(f"mergekit-wp: could not register its merge methods: {err!r}")


def _is_ours(finder: object) -> bool:
    # By name: the package copy (mergekit_wp._hook) and the start-up copy are distinct classes.
    return type(finder).__name__ == RegisterWpFinder.__name__


def installed() -> bool:
    """Whether a finder from either copy of this module is waiting for mergekit."""
    return any(_is_ours(f) for f in sys.meta_path)


def install() -> None:
    """Arrange for `wp` and `widen` to be registered when mergekit's merge methods load."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0") or installed():
        return
    if TARGET in sys.modules:
        _register()
        return
    sys.meta_path.insert(0, RegisterWpFinder())


def uninstall() -> None:
    """Remove the finder; mergekit's later imports go untouched."""
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_ours(f)]
