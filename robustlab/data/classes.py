"""Default class names of the standard data sets, in label-index order."""

from __future__ import annotations

DIGIT_NAMES: list[str] = [str(i) for i in range(10)]

FASHION_MNIST_NAMES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

CIFAR10_NAMES: list[str] = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]

# CIFAR-100 fine labels: the official order is alphabetical.
CIFAR100_NAMES: list[str] = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]

DEFAULT_CLASSES: dict[str, list[str]] = {
    "digits": DIGIT_NAMES,
    "mnist": DIGIT_NAMES,
    "fashion_mnist": FASHION_MNIST_NAMES,
    "cifar10": CIFAR10_NAMES,
    "cifar100": CIFAR100_NAMES,
    "svhn": DIGIT_NAMES,
}


def default_classes(name: str) -> list[str]:
    """A fresh copy of the default class names of data set ``name``."""
    return list(DEFAULT_CLASSES[name])
