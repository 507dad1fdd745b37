"""Automatic mixed precision under an exact bits-per-weight budget (``qcompiler autotune``).

``search.auto_recipe`` measures (``measure``, cached by ``cache``) and solves (``knapsack``); the config
side (:class:`~qcompiler.config.auto.AutoPrecision`, the candidates, the Recipe it writes) is in
``qcompiler.config.auto``. Nothing is imported here, so the command line's parser stays light.
"""
