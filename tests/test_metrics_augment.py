"""Text and image augmentations used to make views."""

import pytest
import torch

from loes import LOESError
from loes.augment import (
    KEYBOARD_NEIGHBOURS,
    ImageAugmenter,
    TextAugmenter,
    color_jitter,
    gaussian_noise,
    horizontal_flip,
    keyboard_typos,
    make_views,
    random_char_changes,
    random_resized_crop,
    split_words,
)

TEXT = "The medication really helped with my anxiety, but I could not sleep at all."


def test_split_words_only_inserts_spaces():
    out = split_words(TEXT, p=1.0, random_state=3)
    assert out.replace(" ", "") == TEXT.replace(" ", "")
    assert out.count(" ") > TEXT.count(" ")
    assert split_words(TEXT, p=0.0) == TEXT
    assert split_words(TEXT, p=0.5, random_state=1) == split_words(TEXT, p=0.5, random_state=1)
    assert split_words(TEXT, p=0.5, random_state=1) != split_words(TEXT, p=0.5, random_state=2)


@pytest.mark.parametrize(
    "action, delta", [("substitute", 0), ("insert", 1), ("delete", -1), ("swap", 0)]
)
def test_char_changes_change_one_char_per_word(action, delta):
    words = TEXT.split(" ")
    out = random_char_changes(TEXT, p=1.0, action=action, random_state=0).split(" ")
    assert len(out) == len(words)
    for a, b in zip(words, out):
        if len(a) >= 2:
            assert len(b) == len(a) + delta
            if action == "swap":
                assert sorted(a) == sorted(b)
            if action == "substitute":
                assert sum(x != y for x, y in zip(a, b)) <= 1
    assert random_char_changes(TEXT, p=0.0, action=action) == TEXT


def test_keyboard_typos_use_neighbouring_keys():
    out = keyboard_typos(TEXT, p=1.0, random_state=0)
    assert len(out) == len(TEXT)
    for a, b in zip(TEXT, out):
        if a.lower() in KEYBOARD_NEIGHBOURS:
            assert b.lower() in KEYBOARD_NEIGHBOURS[a.lower()] and a.isupper() == b.isupper()
        else:
            assert a == b  # spaces, punctuation untouched
    assert set(KEYBOARD_NEIGHBOURS["g"]) == set("tyfhvb")
    assert all(
        a in KEYBOARD_NEIGHBOURS[b] for a in KEYBOARD_NEIGHBOURS for b in KEYBOARD_NEIGHBOURS[a]
    )


def test_text_augmenter_is_reproducible_and_varies():
    a, b = TextAugmenter(p=0.2, random_state=5), TextAugmenter(p=0.2, random_state=5)
    first = [a(TEXT) for _ in range(3)]
    assert first == [b(TEXT) for _ in range(3)]
    assert len(set(first)) == 3
    with pytest.raises(LOESError, match="unknown text augmentation"):
        TextAugmenter(methods=("shout",))
    with pytest.raises(LOESError, match=r"\[0, 1\]"):
        split_words(TEXT, p=1.5)
    with pytest.raises(LOESError, match="random_state must be None, an int seed"):
        keyboard_typos(TEXT, random_state=1.5)
    assert isinstance(
        keyboard_typos(TEXT, random_state=None), str
    )  # None: fresh randomness (sklearn)


def test_make_views_align_rows():
    items = ["alpha beta", "gamma delta", "epsilon"]
    views = make_views(
        items, TextAugmenter(methods=("split",), p=1.0), n_views=3, include_original=True
    )
    assert views[0] == items
    for view in views[1:]:
        assert [v.replace(" ", "") for v in view] == [i.replace(" ", "") for i in items]


def test_image_augmentations_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 12, 10, generator=g)
    torch.testing.assert_close(horizontal_flip(x, p=1.0), x.flip(-1))
    torch.testing.assert_close(horizontal_flip(x, p=0.0), x)
    torch.testing.assert_close(random_resized_crop(x, scale=(1.0, 1.0)), x)
    torch.testing.assert_close(color_jitter(x, 0.0, 0.0), x)
    torch.testing.assert_close(gaussian_noise(x, std=0.0), x)
    noisy = gaussian_noise(x, std=0.5, random_state=1)
    rel = (noisy - x).flatten(1).std(1) / x.flatten(1).std(1)
    assert torch.all((rel > 0.4) & (rel < 0.6))
    crop = random_resized_crop(x[0], scale=(0.3, 0.3), random_state=2)
    assert crop.shape == x[0].shape and not torch.allclose(crop, x[0])
    aug = ImageAugmenter(random_state=3)
    torch.testing.assert_close(aug(x), ImageAugmenter(random_state=3)(x))
    with pytest.raises(LOESError, match="images must have shape"):
        horizontal_flip(torch.rand(5, 5))
