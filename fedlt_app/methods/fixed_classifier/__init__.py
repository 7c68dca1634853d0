"""Fixed-classifier methods: the class vectors are fixed (FedETF's simplex ETF, FedLoGe's sparse ETF) or moved only
by the server (FedNH).

All three keep a personal part on each client and report the personalised accuracy.
"""
