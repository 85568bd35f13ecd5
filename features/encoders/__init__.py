"""Encoder families, one module per vendor; each registers its names on import.

``builtin`` (hand-crafted), ``owkin`` (phikon, phikon-v2), ``meta`` (dinov2-*),
``mahmood`` (uni, uni2-h, conch), ``bioptimus`` (h-optimus-0, h-optimus-1), ``paige``
(virchow, virchow2), ``providence`` (prov-gigapath), ``histai`` (hibou-b, hibou-l),
``kaiko`` (kaiko-vit*), ``transpath`` (ctranspath) and ``timm_any``
(``timm:<name>``). Imported lazily by :mod:`wsi_mil.features.registry`.
"""

__all__ = [
    "bioptimus", "builtin", "histai", "kaiko", "mahmood", "meta", "owkin", "paige", "providence",
    "timm_any", "transpath",
]  # fmt: skip
