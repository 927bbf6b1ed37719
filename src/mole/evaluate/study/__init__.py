"""The human preference study of the paper (Fig. 5): pairs of images from evaluation runs, a rating page, votes
in a SQL database, win rates with confidence intervals and agreement statistics.

Modules: :mod:`design` (the study folder, built from `mole evaluate run` outputs), :mod:`store` (votes in
SQLite or PostgreSQL), :mod:`assign` (which pair a rater sees next), :mod:`app` (the page and its API),
:mod:`stats` and :mod:`report` (the numbers), :mod:`cli` (``mole study``).
"""

from __future__ import annotations

from mole.evaluate.study.design import DEFAULT_QUESTIONS, Question, Study, StudyError, create_study, load_study

__all__ = ["DEFAULT_QUESTIONS", "Question", "Study", "StudyError", "create_study", "load_study"]
