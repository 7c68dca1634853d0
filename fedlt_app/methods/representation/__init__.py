"""Representation-level methods: a regulariser on the encoder's features (MOON's model-contrastive loss)."""
