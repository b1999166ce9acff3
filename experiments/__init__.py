"""The shipped experiments as package data: this folder is installed as ``deeplab_v1.experiments``
(pyproject.toml ``package-dir``) and read through ``importlib.resources`` (``deeplab_v1.cli``), so
``deeplab run`` and ``deeplab run crf-demo`` work from a wheel, offline. No code lives here."""
