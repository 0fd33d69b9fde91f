"""The coprocessor side: model definitions, training, Triton model configs and recorun-server."""
