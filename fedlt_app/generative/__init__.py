"""ReGL's synthetic data: each client fills its minority and missing classes with generated images.

* :mod:`.shortfall`: how many images each class lacks against a target (pure numpy);
* :mod:`.pipeline`: the local text-to-image pipeline (``regl-generator``), loaded offline, and the
  throttle that keeps clients sharing a machine from loading it all at once;
* :mod:`.lora`: the optional LoRA adaptation of the pipeline's UNet to the client's own images;
* :mod:`.synthetic`: generation, conversion to the data set's images, the on-disk cache, and the
  client's real plus synthetic training data;
* :mod:`.phase`: the server's one generation query before round 1 and the clients' reply.

Nothing here imports diffusers, peft or transformers at module level: the extra is optional
(``pip install -e ".[regl]"``) and only a run with ``synthetic-data=regl`` needs it.
"""
