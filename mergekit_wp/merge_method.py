"""The `wp` merge method (METHOD.md §8); being written, see issue 2."""


def register_wp() -> None:
    """Register `wp` with mergekit (idempotent)."""
