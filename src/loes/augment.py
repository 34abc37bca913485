"""Augmentations that make the *views* used by InfoNCE, LiDAR and DiME.

Text augmentations follow the perturbations of the "Layer by Layer" study:
words split in two, random character changes and keyboard typos. Image
augmentations are simple tensor operations (crop-and-resize, flip, noise,
brightness/contrast). Every function draws from an explicit
``random_state`` (:func:`loes._rng.check_random_state`); the global RNG is never used.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._rng import RandomState, check_random_state, torch_generator

__all__ = [
    "ImageAugmenter",
    "TextAugmenter",
    "color_jitter",
    "gaussian_noise",
    "horizontal_flip",
    "keyboard_typos",
    "make_views",
    "random_char_changes",
    "random_resized_crop",
    "split_words",
]


_QWERTY = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_OFFSETS = [0.0, 0.25, 0.75]  # horizontal stagger of the three rows


def _keyboard_neighbours() -> dict:
    pos = {}
    for r, row in enumerate(_QWERTY):
        for c, ch in enumerate(row):
            pos[ch] = (r, c + _OFFSETS[r])
    out = {}
    for ch, (r, c) in pos.items():
        out[ch] = "".join(
            o for o, (r2, c2) in pos.items() if o != ch and abs(r2 - r) <= 1 and abs(c2 - c) <= 1.0
        )
    return out


#: Keys next to each letter on a QWERTY keyboard (same row and the rows above/below).
KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise LOESError(f"probability p must be in [0, 1]; got {p!r}")
    return float(p)


def _map_words(
    text: str,
    p: float,
    rng: np.random.Generator,
    change: Callable[[str, np.random.Generator], str],
    min_len: int = 2,
) -> str:
    """Apply ``change`` to each whitespace-separated word (length >= min_len) with probability p."""
    _check_p(p)
    parts = text.split(" ")
    for i, word in enumerate(parts):
        if len(word) >= min_len and rng.random() < p:
            parts[i] = change(word, rng)
    return " ".join(parts)


def split_words(text: str, p: float = 0.1, random_state: RandomState = 0) -> str:
    """Split each word of two or more characters in two, with probability ``p``.

    >>> out = split_words("representation", p=1.0, random_state=0)
    >>> out.count(" "), out.replace(" ", "")
    (1, 'representation')
    """
    return _map_words(
        text,
        p,
        check_random_state(random_state),
        lambda w, r: w[: (k := int(r.integers(1, len(w))))] + " " + w[k:],
    )


def random_char_changes(
    text: str, p: float = 0.1, action: str = "substitute", random_state: RandomState = 0
) -> str:
    """Change one random character in each word with probability ``p``.

    Parameters
    ----------
    action : {"substitute", "insert", "swap", "delete"}
        Replace a character by a random letter, insert a random letter, swap two
        neighbouring characters, or delete a character.

    >>> [len(w) for w in random_char_changes("layer by layer", p=1.0, action="delete").split()]
    [4, 1, 4]
    """
    if action not in ("substitute", "insert", "swap", "delete"):
        raise LOESError(
            f"action must be 'substitute', 'insert', 'swap' or 'delete'; got {action!r}"
        )
    letters = string.ascii_lowercase

    def change(word: str, r: np.random.Generator) -> str:
        i = int(r.integers(0, len(word)))
        if action == "substitute":
            return word[:i] + letters[int(r.integers(0, 26))] + word[i + 1 :]
        if action == "insert":
            return word[:i] + letters[int(r.integers(0, 26))] + word[i:]
        if action == "delete":
            return word[:i] + word[i + 1 :]
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]

    return _map_words(text, p, check_random_state(random_state), change)


def keyboard_typos(text: str, p: float = 0.05, random_state: RandomState = 0) -> str:
    """Replace each letter with a neighbouring QWERTY key with probability ``p``
    (case kept; other characters untouched).

    >>> out = keyboard_typos("Hello", p=1.0, random_state=0)
    >>> out[0].isupper(), all(b in KEYBOARD_NEIGHBOURS[a] for a, b in zip("hello", out.lower()))
    (True, True)
    """
    _check_p(p)
    rng = check_random_state(random_state)
    out = []
    for ch in text:
        low = ch.lower()
        near = KEYBOARD_NEIGHBOURS.get(low)
        if near and rng.random() < p:
            new = near[int(rng.integers(0, len(near)))]
            ch = new.upper() if ch.isupper() else new
        out.append(ch)
    return "".join(out)


class TextAugmenter:
    """Compose the text augmentations; a callable ``text -> text``.

    Parameters
    ----------
    methods : sequence of {"split", "char", "keyboard"}
        Applied in this order.
    p : float
        Probability per word (split, char) or per letter (keyboard).
    char_action : str
        Action of the character changes (see :func:`random_char_changes`).
    random_state : int or numpy.random.Generator
        Each call draws from this generator, so successive calls differ and a
        whole run is reproducible.

    >>> aug = TextAugmenter(p=0.3, random_state=0)
    >>> aug("the drug worked well") != aug("the drug worked well")
    True
    """

    def __init__(
        self,
        methods: Sequence[str] = ("split", "char", "keyboard"),
        p: float = 0.1,
        char_action: str = "substitute",
        random_state: RandomState = 0,
    ):
        bad = [m for m in methods if m not in ("split", "char", "keyboard")]
        if bad:
            raise LOESError(
                f"unknown text augmentation(s) {bad}; choose from 'split', 'char', 'keyboard'"
            )
        self.methods = tuple(methods)
        self.p = _check_p(p)
        self.char_action = char_action
        self.rng = check_random_state(random_state)

    def __call__(self, text: str) -> str:
        for m in self.methods:
            if m == "split":
                text = split_words(text, self.p, self.rng)
            elif m == "char":
                text = random_char_changes(text, self.p, self.char_action, self.rng)
            else:
                text = keyboard_typos(text, self.p, self.rng)
        return text


# ------------------------------------------------------------------- images
def _as_images(x: Any) -> tuple[torch.Tensor, bool]:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 3:
        return t[None], True
    if t.ndim != 4:
        raise LOESError(
            f"images must have shape (channels, H, W) or (batch, channels, H, W); got {tuple(t.shape)}"
        )
    return t, False


def random_resized_crop(
    images: Any, scale: tuple[float, float] = (0.6, 1.0), random_state: RandomState = 0
):
    """Crop a random box covering a ``scale`` fraction of the area (aspect kept)
    from each image and resize it back (bilinear)."""
    x, single = _as_images(images)
    rng = check_random_state(random_state)
    b, c, h, w = x.shape
    out = torch.empty_like(x, dtype=torch.float32 if not x.is_floating_point() else x.dtype)
    for i in range(b):
        s = float(np.sqrt(rng.uniform(*scale)))
        ch, cw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw].float()
        out[i] = torch.nn.functional.interpolate(
            crop, size=(h, w), mode="bilinear", align_corners=False
        )[0]
    return out[0] if single else out


def horizontal_flip(images: Any, p: float = 0.5, random_state: RandomState = 0):
    """Mirror each image left-right with probability ``p``."""
    x, single = _as_images(images)
    rng = check_random_state(random_state)
    flip = torch.from_numpy(rng.random(x.shape[0]) < _check_p(p))
    out = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return out[0] if single else out


def gaussian_noise(images: Any, std: float = 0.05, random_state: RandomState = 0):
    """Add N(0, std²) noise, std relative to each image's own standard deviation."""
    x, single = _as_images(images)
    x = x.float() if not x.is_floating_point() else x
    scale = x.flatten(1).std(1).clamp(min=1e-12)[:, None, None, None]
    noise = torch.randn(
        x.shape, generator=torch_generator(check_random_state(random_state)), dtype=x.dtype
    )
    out = x + std * scale * noise
    return out[0] if single else out


def color_jitter(
    images: Any, brightness: float = 0.2, contrast: float = 0.2, random_state: RandomState = 0
):
    """Scale contrast around each image's mean by ``1 ± contrast`` and shift
    brightness by ``± brightness`` times its standard deviation (uniform draws)."""
    x, single = _as_images(images)
    x = x.float() if not x.is_floating_point() else x
    rng = check_random_state(random_state)
    b = x.shape[0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.flatten(1).std(1)[:, None, None, None]
    k = torch.from_numpy(rng.uniform(1 - contrast, 1 + contrast, b)).to(x.dtype)[
        :, None, None, None
    ]
    shift = torch.from_numpy(rng.uniform(-brightness, brightness, b)).to(x.dtype)[
        :, None, None, None
    ]
    out = mean + k * (x - mean) + shift * std
    return out[0] if single else out


class ImageAugmenter:
    """Crop-and-resize, flip, colour jitter and noise; a callable on image tensors.

    >>> import torch
    >>> aug = ImageAugmenter(random_state=0)
    >>> aug(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.6, 1.0),
        flip: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        noise: float = 0.05,
        random_state: RandomState = 0,
    ):
        self.scale, self.flip, self.brightness, self.contrast, self.noise = (
            scale,
            flip,
            brightness,
            contrast,
            noise,
        )
        self.rng = check_random_state(random_state)

    def __call__(self, images: Any):
        x = random_resized_crop(images, self.scale, self.rng)
        x = horizontal_flip(x, self.flip, self.rng)
        x = color_jitter(x, self.brightness, self.contrast, self.rng)
        return gaussian_noise(x, self.noise, self.rng) if self.noise > 0 else x


def make_views(
    items: Sequence[Any],
    augment: Callable[[Any], Any],
    n_views: int = 2,
    include_original: bool = False,
) -> list[list[Any]]:
    """``n_views`` augmented copies of every item: a list of views, each a list
    aligned with ``items`` (row i of every view comes from item i).

    Parameters
    ----------
    items : sequence
        Texts, images, ... whatever ``augment`` accepts one at a time.
    augment : callable
        A user function or a :class:`TextAugmenter` / :class:`ImageAugmenter`;
        it should draw fresh randomness on each call.
    include_original : bool
        Make the first view the unmodified items.

    >>> views = make_views(["a big cat", "two dogs"], TextAugmenter(p=0.5), n_views=3)
    >>> len(views), len(views[0])
    (3, 2)
    """
    if n_views < 1:
        raise LOESError(f"n_views must be >= 1; got {n_views}")
    views = []
    for v in range(n_views):
        if include_original and v == 0:
            views.append(list(items))
        else:
            views.append([augment(item) for item in items])
    return views
