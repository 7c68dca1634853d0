"""Loss-level methods: the client's loss is re-weighted, calibrated or balanced; encoder and classifier train as one.

Focal loss, FedLC's logit calibration, Ratio Loss, CLIMB's constrained client weights and Fed-GraB's
gradient balancer. Their server parts, where they have one, only collect statistics for the next round.
"""
