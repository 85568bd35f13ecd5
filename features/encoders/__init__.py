"""Encoder families, one module per vendor; each registers its names on import.

``builtin`` (hand-crafted), ``owkin`` (phikon, phikon-v2), ``meta`` (dinov2-*),
``mahmood`` (uni, uni2-h), ``bioptimus`` (h-optimus-0), ``paige`` (virchow2) and
``timm_any`` (``timm:<name>``). Imported lazily by :mod:`wsi_mil.features.registry`.
"""

__all__ = ["bioptimus", "builtin", "mahmood", "meta", "owkin", "paige", "timm_any"]
