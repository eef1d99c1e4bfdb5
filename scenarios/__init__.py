"""The data side: federated partitions, class-incremental streams, named presets."""
