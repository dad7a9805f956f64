"""Text inside plotly figures: plotly reads titles, labels, legend names and cell text as a small HTML
subset (``<br>``, ``<sup>``, ``<b>``, ``<s>`` = strike-through, ...), so a token such as ``<s>`` or
``</s>`` is drawn as markup and disappears. :func:`escape` makes data text literal (plotly decodes
``&lt;``/``&gt;``/``&amp;``); :func:`plain` is what a reader sees, for captions and tests."""

from __future__ import annotations

import html
import re

# the tags plotly's text renderer interprets (plotly.js src/lib/svg_text_utils.js): everything else is text
_TAGS = re.compile(r"<(/?)(br|b|i|em|sup|sub|s|u|span|a)\b[^<>]*>", re.IGNORECASE)


def escape(text: object) -> str:
    """``text`` as plotly shows it literally: ``<``, ``>`` and ``&`` as entities."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def plain(text: str) -> str:
    """The words plotly draws for ``text``: ``<br>`` as " — ", other tags dropped, entities decoded, spaces
    collapsed."""
    text = re.sub(r"<br\s*/?>", " — ", text, flags=re.IGNORECASE)
    return " ".join(html.unescape(_TAGS.sub(" ", text)).split())
