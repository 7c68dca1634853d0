"""Class names per data set, in label order, for CLIP's text prompts.

Names follow the data sets' own label lists (CIFAR-100: its fine labels,
alphabetical, underscores read as spaces as CoOp does); MNIST and FEMNIST
classes are the characters themselves (LEAF/TFF label order for FEMNIST:
digits, then upper case, then lower case).
"""

from __future__ import annotations

import string

PROMPT_TEMPLATE = "a photo of a {}."

_CIFAR100 = (  # noqa: SIM905 - one line per row of the label list reads better than 100 literals
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(string.digits),
    "fmnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "cifar100": tuple(name.replace("_", " ") for name in _CIFAR100),
    "femnist": tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase),
}


def class_names(dataset: str, num_classes: int) -> tuple[str, ...]:
    """The names of ``dataset``'s classes; refuses a count that does not match (a wrong table would mislabel)."""
    if dataset not in CLASS_NAMES:
        raise ValueError(f"dataset: no class names for {dataset!r}; CLIP methods know {', '.join(CLASS_NAMES)}")
    names = CLASS_NAMES[dataset]
    if len(names) != num_classes:
        raise ValueError(f"dataset: {dataset!r} has {num_classes} classes but {len(names)} class names")
    return names


def prompts(names: tuple[str, ...], template: str = PROMPT_TEMPLATE) -> list[str]:
    return [template.format(name) for name in names]
