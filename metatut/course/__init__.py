"""What only the course (the notebooks and exercises) needs, apart from the library.

==========================  ===========================================================================
``course.checks``           exercise checkers of notebooks 01-03 (:class:`CheckFailed`, ``check_*``)
``course.checks_family``    exercise checkers of notebook 04 (Reptile, Meta-SGD)
``course.checks_fewshot``   exercise checkers of notebooks 05-06 (episode sampler, ProtoNet logits)
``course.checks_capstone``  exercise checkers of the capstone, exercise 8 (training loop, held-out evaluation)
``course.widgets``          ipywidgets explorers (needs the ``course`` extra: ipywidgets, matplotlib)
``course.plots``            matplotlib helpers (needs the ``course`` extra)
``course.budget``           the budget profiles: :func:`profile`, :func:`pick`, :data:`PROFILES`, :func:`quiet`
==========================  ===========================================================================

Importing :mod:`metatut.course` imports none of them (so no course-only package); the old paths
(``metatut.checks``, ``metatut.widgets``, ``metatut.plots``, ``metatut.pick`` ...) keep working.
"""
