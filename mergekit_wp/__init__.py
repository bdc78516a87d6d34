"""mergekit-wp: Weight Patching scores and the mechanism-aware `wp` merge method for MergeKit.

Importing this package registers the `wp` merge method with mergekit.
"""

__version__ = "0.1.0"

from mergekit_wp.merge_method import register_wp

register_wp()
