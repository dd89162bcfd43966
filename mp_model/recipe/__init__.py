"""The application built on the model library: data, training, run folders, evaluation, ``mp`` and the quick start.

Dependencies point one way: ``bench -> mp_model.recipe -> mp_model -> mp_kernels``; nothing here imports ``bench``.
"""
