"""Feature extraction: encoder registry, weight loading, worker pool and HDF5 bags.

Public API (imported lazily so ``import wsi_mil.features`` stays cheap):

* Bags — :func:`write_bag`, :func:`read_bag`, :func:`bag_info`, :func:`join_bags`,
  :func:`read_slide_bags`, :func:`bag_path`, :func:`verify_bag`, :class:`Bag`;
  :func:`join_multiscale` joins bags of different µm/px spatially.
* Encoders — :func:`create_encoder`, :func:`list_encoders`, :func:`get_encoder_spec`,
  :func:`register_encoder`, :class:`EncoderSpec`, :class:`Encoder`.
* Weights — :func:`load_weights`, :func:`file_sha256`.
* Extraction — :func:`extract_features` (per-device worker pool), :func:`extract_slide`.
"""

from __future__ import annotations

from wsi_mil._lazy import lazy_exports

__all__ = [
    "Bag",
    "BagError",
    "Encoder",
    "EncoderSpec",
    "NonFiniteFeaturesError",
    "bag_info",
    "bag_path",
    "create_encoder",
    "extract_features",
    "extract_slide",
    "file_sha256",
    "get_encoder_spec",
    "join_bags",
    "join_multiscale",
    "list_encoders",
    "load_weights",
    "read_bag",
    "read_slide_bags",
    "register_encoder",
    "verify_bag",
    "write_bag",
]

_LOCATIONS = {
    "Bag": "bags",
    "BagError": "bags",
    "NonFiniteFeaturesError": "bags",
    "bag_info": "bags",
    "bag_path": "bags",
    "join_bags": "bags",
    "read_bag": "bags",
    "read_slide_bags": "bags",
    "verify_bag": "bags",
    "write_bag": "bags",
    "join_multiscale": "multiscale",
    "Encoder": "registry",
    "EncoderSpec": "registry",
    "create_encoder": "registry",
    "get_encoder_spec": "registry",
    "list_encoders": "registry",
    "register_encoder": "registry",
    "file_sha256": "weights",
    "load_weights": "weights",
    "extract_features": "extract",
    "extract_slide": "extract",
}


__getattr__, __dir__ = lazy_exports(__name__, _LOCATIONS)
