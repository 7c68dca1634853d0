"""Server-side distillation: the server distils an ensemble of the round's client models into the global model
on data of its own (FedIC's calibrated ensemble)."""
