"""Fixed-classifier methods: the class vectors are fixed (FedETF's simplex ETF) or moved only by the server (FedNH).

Both keep a personal part on each client and report the personalised accuracy.
"""
