"""Llama and the families mlx-lm serves with ``llama.py`` (Mistral, ...), with ``sliding_attention`` layers where
``layer_types`` names them. A ``sliding_window`` without ``layer_types`` is full attention in mlx-lm, here too."""

from mlx_lm.models import llama

from .common import Family


def checked_window(family: str, sliding: list[bool], window) -> list[int | None]:
    """Per-layer windows from which layers slide and the config's window, refusing a sliding layer without one."""
    if any(sliding) and (not isinstance(window, int) or window < 1):
        raise ValueError(f"the {family} config has sliding-window layers but sliding_window is {window!r}; set it")
    return [window if s else None for s in sliding]


class Llama(Family):
    name = "llama"
    dense_mlp = llama.MLP

    def windows(self):
        return checked_window(self.name, [layer.use_sliding for layer in self.layers], self.text.sliding_window)
