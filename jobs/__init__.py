"""The application layer: the jobs behind ``python -m pipeline <command>`` and the MLproject.

The only package that imports both the library (:mod:`pipeline`, :mod:`analysis`) and the
tracking layer (:mod:`tracking`): it loads models, runs the library's stages and hands their
tables and files to :mod:`tracking` to log.
"""
