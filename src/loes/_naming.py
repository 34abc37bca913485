"""The one way a layer is named wherever a person reads it.

A layer is always shown as the index the API takes, followed by the model's
own name for it when one is known: ``7 (hidden_states[8])``; just ``7`` when
no names are known (custom embeddings). Tables, summaries, reports, plots
and the CLI all call :func:`layer_label`, so an index and a name never sit
side by side off by one.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["layer_label"]


def layer_label(index: int, names: Sequence[str] | None = None) -> str:
    """How layer ``index`` is shown to a person.

    Parameters
    ----------
    index : int
        The layer index the API takes (``selected_layers``, ``layers=``).
    names : sequence of str, optional
        The model's name of each layer (``LOESResult.layer_names``), indexed
        like the layers; None or too short when unknown.

    Returns
    -------
    str
        ``"7 (hidden_states[8])"`` with a name, else ``"7"``.

    Examples
    --------
    >>> layer_label(7, [f"hidden_states[{i + 1}]" for i in range(12)])
    '7 (hidden_states[8])'
    >>> layer_label(7)
    '7'
    """
    index = int(index)
    if names is not None and 0 <= index < len(names) and names[index]:
        return f"{index} ({names[index]})"
    return str(index)
