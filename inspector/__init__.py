"""espfix-inspect: an inspector for the Linux x86-64 espfix64 mechanism.

Layers, each importing only those before it:

``model`` (pure layout math) -> ``elfcore``/``symbols``/``memory``/``target``/
``hostfacts``/``elfwrite`` (memory sources) -> ``pagetable`` (walker) ->
``state`` (kernel state through the walker) -> ``audit``/``snapshot`` ->
``report`` -> ``cli``.
"""

__version__ = "0.1.0"
