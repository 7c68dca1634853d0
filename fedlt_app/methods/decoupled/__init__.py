"""Decoupled methods: the classifier is re-balanced or re-trained apart from the encoder's instance-balanced training.

RedGrape (and fedlt's GRAPE-LA on top of it) re-balance the classifier on the clients from global
gradient prototypes; CReFF and CCVR re-train it on the server from federated features or statistics,
RUCR on each client from mixed prototype features (evaluation only).
"""
