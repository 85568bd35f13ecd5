"""``timm:<model name>``: any timm model, pooled with the model's own head-less forward."""

from __future__ import annotations

from wsi_mil.errors import EncoderError
from wsi_mil.features.encoders._vit import TimmBackbone, build_timm
from wsi_mil.features.registry import TIMM_PREFIX, EncoderSpec

__all__ = ["timm_spec"]


def timm_spec(name: str) -> EncoderSpec:
    """Resolve ``timm:<model>`` into a spec (dim is filled in once the model is built).

    Input size and normalisation come from the model's timm pretrained config.

    Raises:
        EncoderError: timm does not know the model name.
    """
    import timm

    model_name = name[len(TIMM_PREFIX) :]
    arch = model_name.split(".")[0]
    if not model_name or not timm.is_model(arch):
        raise EncoderError(
            f"timm has no model {model_name!r} (from encoder {name!r}); "
            "list them with `python -c 'import timm; print(timm.list_models())'`"
        )
    cfg = timm.get_pretrained_cfg(model_name, allow_unregistered=True)
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    input_size = cfg_dict.get("input_size") or (3, 224, 224)
    hub_id = cfg_dict.get("hf_hub_id")

    def build(spec: EncoderSpec) -> TimmBackbone:
        return build_timm(arch, "timm")

    return EncoderSpec(
        name=name,
        dim=None,
        input_px=int(input_size[-1]),
        mean=tuple(cfg_dict.get("mean") or (0.485, 0.456, 0.406)),
        std=tuple(cfg_dict.get("std") or (0.229, 0.224, 0.225)),
        mpp=None,
        pooling="timm",
        licence=str(cfg_dict.get("license") or "see model card"),
        source=f"timm {model_name}",
        architecture=f"timm {arch}",
        hub=(hub_id, "timm") if hub_id else None,
        builder=build,
    )
