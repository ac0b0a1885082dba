"""Expert placement: which expert lives on which device (`moe place`).

``model`` prices a placement from a run's routing statistics (per-device load, the exchange's
traffic on the pod, ``moe.pod.cost``); ``search`` finds placements (greedy partitioning of the
co-activation graph, simulated annealing); ``apply`` permutes a run's experts into a new run
directory that computes the same outputs; ``command`` is `moe place`.
"""
