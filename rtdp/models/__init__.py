"""The model base every trained model in rtdp stands on (``rtdp.models.base``)."""

from rtdp.models.base import (
    MODEL_TYPES,
    SCHEMA_VERSION,
    Model,
    ModelConfig,
    load_model,
    read_meta,
    register_model_type,
)

__all__ = ["MODEL_TYPES", "SCHEMA_VERSION", "Model", "ModelConfig", "load_model", "read_meta", "register_model_type"]
