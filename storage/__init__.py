"""Where the pipeline's bytes live; no Prefect, no knowledge of the method's math.

- ``store``: the artifact store (``<root>/<stage>/<fingerprint>/``): writers, the reuse
  check, repairs, runs, gc.
- ``artifact`` (hash-checked reads), ``writer`` (journal, resume, replace, invalidation),
  ``verify`` (the quick check and ``verify``), ``runs`` (run records), ``manifest``,
  ``shards``, ``locks``, ``fingerprint`` (with content digests of inputs), ``fs``,
  ``errors``: its parts.
- ``schemas``: the Parquet tables (rationales, tokenized, teacher cache) and their builders.
- ``teacher_cache``, ``tensor_blobs``, ``teacher_embeddings``: the teacher cache.
- ``distill_dataset``: the joined student/teacher dataset (the data order is the training
  loop's: ``cot2align_core.sampling``).
- ``checkpoints``: training checkpoints (atomic, rotated, a best state, loaded without running
  code): ``CheckpointDir``, the training loop's checkpointer.
- ``inspect``: the ``inspect | verify | ls | gc`` commands.
"""
