"""mergekit-wp: Weight Patching scores and the mechanism-aware `wp` merge method for MergeKit.

Importing this package imports neither torch nor mergekit. The `wp` and `widen` merge methods
are registered with mergekit by `register()`, which the start-up hook (plain `mergekit-yaml`)
and the `mergekit-wp` commands that merge call; Python code that runs mergekit's merge itself
calls it first.
"""

__version__ = "0.1.0"


def register() -> None:
    """Register the `wp` and `widen` merge methods with mergekit (idempotent)."""
    from mergekit_wp.merge_method import register_wp
    from mergekit_wp.widen import register_widen

    register_wp()
    register_widen()
