"""CLIP-based methods' parts: class names, the frozen backbone and its heads.

Nothing here imports ``open_clip`` at module level: the extra is optional
(``pip install -e ".[clip]"``) and only a run that builds a CLIP model needs it.
"""
