"""A small photo set for the README's "Search your own images": skimage.data photographs.

``make_photo_set(root)`` writes ``photos/`` (each subject whole, mirrored and cropped) with
``captions.tsv``, and ``photos_test/`` (another crop of each subject, mirrored) with
``captions_test.tsv``: five captions per photo, ``name<TAB>caption`` lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUBJECTS: dict[str, tuple[str, ...]] = {
    "astronaut": (
        "an astronaut in a white spacesuit smiling",
        "a woman astronaut posing in front of a flag",
        "portrait of a smiling astronaut",
        "an astronaut with a space shuttle model",
        "a person in a space suit next to the american flag",
    ),
    "camera": (
        "a man with a camera on a tripod",
        "a black and white photo of a photographer",
        "a cameraman standing on grass",
        "a man in a coat looking through a camera",
        "a photographer outdoors in black and white",
    ),
    "chelsea": (
        "a ginger cat looking at the camera",
        "a tabby cat resting",
        "close-up of an orange cat",
        "a small striped cat lying down",
        "a cat with big eyes",
    ),
    "coffee": (
        "a cup of coffee on a saucer",
        "a red coffee cup with a spoon",
        "a hot drink in a cup seen from above",
        "an espresso cup on a table",
        "coffee with milk foam in a cup",
    ),
    "rocket": (
        "a rocket on the launch pad",
        "a space rocket ready for launch",
        "a tall rocket standing next to a tower",
        "a launch vehicle under a blue sky",
        "a rocket before lift-off",
    ),
    "coins": (
        "a collection of old coins",
        "many round coins on a dark background",
        "ancient coins in rows",
        "a black and white photo of coins",
        "metal coins laid out in a grid",
    ),
    "moon": (
        "the surface of the moon with craters",
        "a grey lunar landscape",
        "craters on the moon",
        "a close view of the moon",
        "the rough surface of the moon in black and white",
    ),
    "page": (
        "a page of printed text",
        "an old book page with writing",
        "a scanned page of a document",
        "lines of text on paper",
        "a printed page in black and white",
    ),
    "clock": (
        "a clock on a wall",
        "a round clock face with hands",
        "an analog clock showing the time",
        "a black and white photo of a clock",
        "the face of a wall clock",
    ),
    "hubble_deep_field": (
        "galaxies in deep space",
        "a telescope image of many galaxies",
        "stars and galaxies on a black sky",
        "the night sky full of distant galaxies",
        "a deep field image of the universe",
    ),
    "immunohistochemistry": (
        "stained tissue under a microscope",
        "a microscope image of cells in brown and blue",
        "a tissue sample seen through a microscope",
        "stained cells on a slide",
        "a medical microscope image",
    ),
    "brick": (
        "a brick wall",
        "a wall of grey bricks",
        "rows of bricks and mortar",
        "a close view of a brick wall",
        "the texture of an old brick wall",
    ),
    "colorwheel": (
        "a colour wheel",
        "a circle with all the colours of the rainbow",
        "a round rainbow gradient on white",
        "a wheel of bright colours",
        "a circular colour chart",
    ),
    "retina": (
        "a photo of the retina of an eye",
        "the back of an eye with blood vessels",
        "an orange retina image",
        "a medical image of the eye",
        "blood vessels on the retina",
    ),
}


def _image(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _crop(img: np.ndarray, top: float, left: float, size: float) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = int(h * top), int(w * left)
    return img[y : y + int(h * size), x : x + int(w * size)]


def make_photo_set(root: Path) -> dict[str, list[str]]:
    """Write the photo folders and captions files under ``root``; returns the file names per folder."""
    from PIL import Image

    variants = {
        "photos": {"": lambda a: a, "_mirror": lambda a: a[:, ::-1], "_crop": lambda a: _crop(a, 0.0, 0.0, 0.8)},
        "photos_test": {"_test": lambda a: _crop(a, 0.15, 0.15, 0.8)[:, ::-1]},
    }
    tsv = {"photos": "captions.tsv", "photos_test": "captions_test.tsv"}
    names: dict[str, list[str]] = {}
    for folder, ops in variants.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        lines, names[folder] = [], []
        for subject, captions in SUBJECTS.items():
            img = _image(subject)
            for suffix, op in ops.items():
                file = f"{subject}{suffix}.jpg"
                Image.fromarray(np.ascontiguousarray(op(img))).save(root / folder / file, quality=90)
                names[folder].append(file)
                lines += [f"{file}\t{c}" for c in captions]
        (root / tsv[folder]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return names
