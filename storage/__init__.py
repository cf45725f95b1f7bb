"""Where the pipeline's bytes live; no Prefect, no knowledge of the method's math.

- ``store``: the artifact store (``<root>/<stage>/<fingerprint>/``), writers, readers, runs, gc.
- ``fingerprint``, ``locks``, ``manifest``, ``shards``, ``verify``, ``fs``: its parts.
- ``schemas``: the Parquet tables (rationales, tokenized, teacher cache) and their builders.
- ``teacher_cache``, ``tensor_blobs``, ``teacher_embeddings``: the teacher cache.
- ``distill_dataset``: the joined student/teacher dataset (the data order is the training
  loop's: ``cot2align_core.sampling``).
- ``checkpoints``: training checkpoints (atomic, rotated, a best state, loaded without running
  code): ``CheckpointDir``, the training loop's checkpointer.
- ``inspect``: the ``inspect | verify | ls | gc`` commands.
"""
