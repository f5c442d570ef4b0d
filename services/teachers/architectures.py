"""The registered teacher architectures: torchvision's and timm's ImageNet networks and the CIFAR nets,
with their default preprocessing and feature taps. Importing `services.teachers` registers them."""

from __future__ import annotations

from collections.abc import Callable

import timm
import torchvision
from torch import nn

from services.teachers.cifar_models import CifarResNet, CifarWideResNet
from services.teachers.spec import Preprocessing
from services.teachers.zoo import register_teacher

IMAGENET_RESNET_TAPS = {f"layer{i}": f"layer{i}" for i in (1, 2, 3, 4)}
SENET_TAPS = {"layer3": "layer3", "layer4": "layer4"}
CIFAR_TAPS = {f"layer{i}": f"layer{i}" for i in (1, 2, 3)}
# The last stage's tap after the network's final BN-ReLU (CifarWideResNet.final_act), FT's and FEED's map.
CIFAR_WIDE_RESNET_TAPS = {"layer1": "layer1", "layer2": "layer2", "layer3": "final_act"}


def _torchvision_resnet(builder: Callable[..., nn.Module], num_classes: int, in_chans: int) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    if in_chans != 3:  # torchvision hard-codes RGB; swap the stem conv for one of the same geometry
        stem = model.conv1
        if not isinstance(stem, nn.Conv2d):
            raise TypeError(f"expected a Conv2d stem, got {type(stem).__name__}")
        model.conv1 = nn.Conv2d(in_chans, stem.out_channels, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet18(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet18, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet34(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet34, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet50(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet50, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet152(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet152, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=SENET_TAPS)
def senet154(num_classes: int, in_chans: int) -> nn.Module:
    return timm.create_model("senet154", pretrained=False, num_classes=num_classes, in_chans=in_chans)


# timm's legacy_senet154 is Cadene's pretrainedmodels SENet154 (`layer0`, `last_linear`), the layout that
# SENet154's ImageNet weights are usually published in; its preprocessing is timm's config for it.
@register_teacher(preprocessing=Preprocessing.imagenet(), taps=SENET_TAPS)
def legacy_senet154(num_classes: int, in_chans: int) -> nn.Module:
    return timm.create_model("legacy_senet154", pretrained=False, num_classes=num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet20(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(20, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet32(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(32, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet56(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(56, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet110(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(110, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_WIDE_RESNET_TAPS)
def cifar_wrn16_2(num_classes: int, in_chans: int) -> nn.Module:
    return CifarWideResNet(16, 2, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_WIDE_RESNET_TAPS)
def cifar_wrn16_4(num_classes: int, in_chans: int) -> nn.Module:
    return CifarWideResNet(16, 4, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_WIDE_RESNET_TAPS)
def cifar_wrn28_10(num_classes: int, in_chans: int) -> nn.Module:
    return CifarWideResNet(28, 10, num_classes, in_chans=in_chans)
