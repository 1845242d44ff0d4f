"""Attention kinds behind one interface (``base.Attention``); ``model.network.attention`` picks one by its options.

Each kind is one file: its options (an ``AttentionKind`` dataclass: name, checks, constructor) and its module.
Importing the file registers the kind; a kind outside the library registers the same way.
"""

from sparse_transformer.model.attention.adaptive_span import AdaptiveSpan
from sparse_transformer.model.attention.base import Attention, CannotDecode
from sparse_transformer.model.attention.performer import Performer
from sparse_transformer.model.attention.sparse import Sparse

__all__ = ["AdaptiveSpan", "Attention", "CannotDecode", "Performer", "Sparse"]
