"""Prefect tasks, one module per stage; each takes the config, its stage instance, its
fingerprint and the upstream references, calls core + storage, and returns a small
:class:`tasks.common.StageRef`. The stage graph is :mod:`tasks.registry`; the stage modules are
imported only when their stage runs (so that planning starts no Prefect and imports no torch)."""
