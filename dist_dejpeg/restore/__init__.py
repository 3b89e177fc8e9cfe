"""Restoring images with a trained generator, starting from the generator file (never from the trainer):
``images`` (files in and out), ``tiling`` (windows and blending), ``restorer`` (the ``Restorer`` API and the
do-no-harm guard), ``files`` (folders and globs into an output folder)."""
