"""Built-in networks and LightningModules.

Networks (plain ``nn.Module``): :class:`CifarResNet` (``cifar_resnet(depth)``), :class:`SmallCNN`,
:class:`VGGStyleCNN`, :class:`TransformerLM`. LightningModules: :class:`ImageClassifier`,
:class:`CausalLanguageModel`.
"""

from lit_compress.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from lit_compress.models.classifier import OUR_BACKBONES, ImageClassifier, build_backbone
from lit_compress.models.language_model import CausalLanguageModel
from lit_compress.models.small_cnn import SmallCNN, VGGStyleCNN
from lit_compress.models.transformer import Block, CausalSelfAttention, TransformerLM

__all__ = [
    "OUR_BACKBONES",
    "BasicBlock",
    "Block",
    "CausalLanguageModel",
    "CausalSelfAttention",
    "CifarResNet",
    "ImageClassifier",
    "PadShortcut",
    "SmallCNN",
    "TransformerLM",
    "VGGStyleCNN",
    "build_backbone",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]
