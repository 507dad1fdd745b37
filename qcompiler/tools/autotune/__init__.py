"""Automatic mixed precision under an exact bits-per-weight budget (``qcompiler autotune``).

``search.auto_recipe`` measures (``measure``, cached by ``cache``) and solves (``knapsack``); the config
side (:class:`~qcompiler.config.auto.AutoPrecision`, the candidates, the Recipe it writes) is in
``qcompiler.config.auto``.
"""

from qcompiler.tools.autotune.search import AutoResult, LayerChoice, auto_recipe

__all__ = ["AutoResult", "LayerChoice", "auto_recipe"]
