"""mergekit-wp: Weight Patching scores and the mechanism-aware `wp` merge method for MergeKit.

Importing this package registers the `wp` and `widen` merge methods with mergekit.
"""

__version__ = "0.1.0"

from mergekit_wp.merge_method import register_wp
from mergekit_wp.widen import register_widen

register_wp()
register_widen()
