"""What every SmolVLM2-serving backend shares: checkpoint facts, answer reader, vision cache.

``checkpoint``: what a SmolVLM2 checkpoint must be and what scoring needs to know of it (digit
tokens, image tokens, normalisation), and the one-line errors of loading one. ``reader``: how
an answer is read, the score from the digit probabilities, then the description; the
transformers and mlx backends call it in the same order, each computing the probabilities its
own way. ``vision_cache``: per-frame vision features shared by overlapping windows. The
video prompt itself is rendered by ``streamd.scoring.prompt``, which the remote backend uses
too.
"""
