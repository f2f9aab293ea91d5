"""Where the vocabulary helpers used to live: they are ``megatron_minillm.parallel.vocab``'s now.

Kept only because ``planning/memory.py`` imports ``padded_vocab_size`` from here; delete it once that
import reads ``from megatron_minillm.parallel.vocab import padded_vocab_size``.
"""

from megatron_minillm.parallel.vocab import mask_padded_vocab, padded_vocab_size

__all__ = ["mask_padded_vocab", "padded_vocab_size"]
