"""Two-stage (Faster R-CNN) SSOD methods: Soft Teacher (seed 001) and DTG-SSOD (seed 002).

``*_ops.py`` hold the papers' math as pure, vectorised tensor functions (no model needed, unit
tested on hand cases); ``common.py`` the model-facing helpers shared by the methods (sampling,
box encoding, view mapping of proposals); ``soft_teacher.py`` and ``dtg.py`` the methods.
"""
