"""Built-in fine-tuning strategies, installed as ``moola_plugins``.

Each module registers its strategy through the ``moola_engine`` entry-point
group of our own pyproject, exactly as a third-party plugin would.
"""
