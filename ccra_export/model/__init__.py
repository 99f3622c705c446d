"""The PyTorch side (``ccra_export.model``): the CCRA reference module, the vision model, checkpoint
loading and the ``ccra::lpwca`` torch custom op. Only ``export`` and ``workflows`` use it.
"""
