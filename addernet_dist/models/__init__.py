"""Model zoo: ``create_model(name, conv="adder" | "conv")`` builds an AdderNet or its CNN twin."""

from addernet_dist.models import lenet, pretrained, resnet, vgg  # noqa: F401  (registers the models)
from addernet_dist.models.pretrained import list_pretrained, pretrained_cfg
from addernet_dist.models.registry import CONV_KINDS, create_model, list_models, model_info

__all__ = ["CONV_KINDS", "create_model", "list_models", "list_pretrained", "model_info", "pretrained_cfg"]
