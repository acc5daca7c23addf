"""Data sets (the ``data`` config group): in-memory tensors sampled by index."""

from ganlab.data.base import EvalSpec, InMemoryData, describe
from ganlab.data.digits import Digits, load_digits_uint8
from ganlab.data.folder import ImageFolder
from ganlab.data.stacked import StackedDigits
from ganlab.data.torchvision_sets import CIFAR10, MNIST, StackedMNIST
from ganlab.data.toy import Gauss1D, GaussianMixture2D, Grid25, Ring8

__all__ = [
    "CIFAR10",
    "MNIST",
    "Digits",
    "EvalSpec",
    "Gauss1D",
    "GaussianMixture2D",
    "Grid25",
    "ImageFolder",
    "InMemoryData",
    "Ring8",
    "StackedDigits",
    "StackedMNIST",
    "describe",
    "load_digits_uint8",
]
