"""wsi-mil: whole-slide images → tiles → features → multiple-instance learning → reports.

The repository root is this package. Subpackages, in dependency order:
``wsi`` (slide access) → ``tiling`` / ``features`` / ``survival`` → ``mil`` → ``workflows``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
