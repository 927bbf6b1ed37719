"""Votes in a real database: SQLite by default (``STUDY/votes.db``), PostgreSQL by URL, through SQLAlchemy 2.

Three tables, each keyed by the study id so that one PostgreSQL database can hold many studies:

- ``study_raters``: a server-issued opaque rater id, and the SHA-256 of the rater's secret token (the cookie). A
  leaked database lets nobody vote as a rater.
- ``study_assignments``: a pair shown to a rater, in which order (``left_is_a``), when, and when answered. The
  unique (study, rater, pair) constraint is what guarantees that a rater never sees the same pair twice, even
  with two requests racing.
- ``study_votes``: one row per question answered: the choice as shown (``left``/``right``/``tie``), the winning
  model (``None`` for a tie), the model shown on the left, the rater and the time.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

logger = logging.getLogger(__name__)

CHOICES = ("left", "right", "tie")

metadata = MetaData()
raters = Table(
    "study_raters",
    metadata,
    Column("rater_id", String(32), primary_key=True),
    Column("study_id", String(32), nullable=False, index=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
assignments = Table(
    "study_assignments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_id", String(32), nullable=False, index=True),
    Column("rater_id", String(32), ForeignKey("study_raters.rater_id"), nullable=False),
    Column("pair_id", Integer, nullable=False),
    Column("token", String(48), nullable=False, unique=True),
    Column("left_is_a", Boolean, nullable=False),
    Column("shown_at", DateTime(timezone=True), nullable=False),
    Column("answered_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("study_id", "rater_id", "pair_id", name="uq_study_rater_pair"),
)
votes = Table(
    "study_votes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_id", String(32), nullable=False, index=True),
    Column("assignment_id", Integer, ForeignKey("study_assignments.id"), nullable=False),
    Column("rater_id", String(32), ForeignKey("study_raters.rater_id"), nullable=False),
    Column("pair_id", Integer, nullable=False),
    Column("question", String(32), nullable=False),
    Column("choice", String(8), nullable=False),
    Column("winner", Integer, nullable=True),
    Column("left_model", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("assignment_id", "question", name="uq_assignment_question"),
)


class StoreError(RuntimeError):
    """The votes database cannot be opened; the message names it without its password."""


class VoteRefused(ValueError):
    """A vote the server will not store; ``status`` is the HTTP status the page gets (403, 409, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Assignment:
    """A pair shown to a rater; ``token`` names it in image URLs and in the vote, so URLs never say which model is
    which (the page knows only left and right)."""

    token: str
    pair_id: int
    left_is_a: bool


def database_url(url: str | None, study_root: Path) -> str:
    """The SQLAlchemy URL: ``STUDY/votes.db`` (SQLite) by default; ``postgresql://`` uses psycopg 3."""
    if not url:
        return f"sqlite:///{(study_root / 'votes.db').resolve()}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def safe_url(url: str) -> str:
    """``url`` without its password: what a log line may show."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: show only its scheme
        return url.split(":", 1)[0] + "://…"


def _now() -> datetime:
    return datetime.now(UTC)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class VoteStore:
    """Raters, assignments and votes of one study in a SQL database (tables created when missing)."""

    def __init__(self, url: str, study_id: str, engine: Engine | None = None) -> None:
        self.url = url
        self.study_id = study_id
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = engine or create_engine(url, **kwargs)
            metadata.create_all(self.engine)
        except (SQLAlchemyError, ImportError) as err:
            cause = str(getattr(err, "orig", None) or err).strip().splitlines()[0][:300]
            raise StoreError(f"cannot open the votes database {safe_url(url)}: {cause}") from err
        logger.info("votes of study %s in %s", study_id, safe_url(url))

    def close(self) -> None:
        self.engine.dispose()

    # --- raters -------------------------------------------------------------------------------------------
    def new_rater(self) -> tuple[str, str]:
        """A new rater: ``(rater_id, token)``. The id is opaque and random; only the token's hash is stored."""
        rater_id, token = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                insert(raters).values(
                    rater_id=rater_id, study_id=self.study_id, token_hash=_hash(token), created_at=_now()
                )
            )
        return rater_id, token

    def rater_of(self, token: str | None) -> str | None:
        """The rater id whose secret is ``token`` (``None`` for an unknown or missing token)."""
        if not token or len(token) > 128:
            return None
        with self.engine.connect() as conn:
            return conn.execute(
                select(raters.c.rater_id).where(
                    raters.c.token_hash == _hash(token), raters.c.study_id == self.study_id
                )
            ).scalar_one_or_none()

    # --- assignments --------------------------------------------------------------------------------------
    def open_assignment(self, rater_id: str) -> Assignment | None:
        """The pair shown to ``rater_id`` and not answered yet (a reload shows it again, not a new one)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(assignments.c.token, assignments.c.pair_id, assignments.c.left_is_a)
                .where(
                    assignments.c.study_id == self.study_id,
                    assignments.c.rater_id == rater_id,
                    assignments.c.answered_at.is_(None),
                )
                .order_by(assignments.c.id)
                .limit(1)
            ).first()
        return Assignment(row.token, row.pair_id, bool(row.left_is_a)) if row else None

    def assignment(self, rater_id: str, token: str) -> Assignment | None:
        """``rater_id``'s assignment named ``token`` (``None`` when it is not theirs or does not exist)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(assignments.c.token, assignments.c.pair_id, assignments.c.left_is_a).where(
                    assignments.c.study_id == self.study_id,
                    assignments.c.rater_id == rater_id,
                    assignments.c.token == token,
                )
            ).first()
        return Assignment(row.token, row.pair_id, bool(row.left_is_a)) if row else None

    def seen_pairs(self, rater_id: str) -> set[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(assignments.c.pair_id).where(
                    assignments.c.study_id == self.study_id, assignments.c.rater_id == rater_id
                )
            )
            return {r.pair_id for r in rows}

    def answered_count(self, rater_id: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(assignments)
                    .where(
                        assignments.c.study_id == self.study_id,
                        assignments.c.rater_id == rater_id,
                        assignments.c.answered_at.is_not(None),
                    )
                ).scalar_one()
            )

    def answers_per_pair(self) -> dict[int, int]:
        """How many raters answered each pair (assignment balances on it)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(assignments.c.pair_id, func.count())
                .where(assignments.c.study_id == self.study_id, assignments.c.answered_at.is_not(None))
                .group_by(assignments.c.pair_id)
            )
            return {r[0]: int(r[1]) for r in rows}

    def add_assignment(self, rater_id: str, pair_id: int, left_is_a: bool) -> Assignment | None:
        """Show ``pair_id`` to ``rater_id``; ``None`` when it was already shown (a concurrent request won)."""
        token = secrets.token_urlsafe(24)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(assignments).values(
                        study_id=self.study_id,
                        rater_id=rater_id,
                        pair_id=pair_id,
                        token=token,
                        left_is_a=left_is_a,
                        shown_at=_now(),
                    )
                )
        except IntegrityError:
            return None
        return Assignment(token, pair_id, left_is_a)

    # --- votes --------------------------------------------------------------------------------------------
    def record(
        self, rater_id: str, token: str, answers: Mapping[str, str], questions: list[str], pair_models: tuple[int, int]
    ) -> int:
        """Store the answers to every question of one shown pair, in one transaction; returns the votes stored.

        Raises:
            VoteRefused: 403 for a pair this rater was not shown, 409 for one already answered, 422 for a question
                not configured, a missing question or a choice other than left/right/tie.
        """
        unknown = sorted(set(answers) - set(questions))
        if unknown:
            raise VoteRefused(422, f"questions not in this study: {unknown}")
        missing = [q for q in questions if q not in answers]
        if missing:
            raise VoteRefused(422, f"questions not answered: {missing}")
        bad = {q: c for q, c in answers.items() if c not in CHOICES}
        if bad:
            raise VoteRefused(422, f"a choice is one of {list(CHOICES)}; got {sorted(bad)}")
        found = self.assignment(rater_id, token)
        if found is None:
            raise VoteRefused(403, "this pair was not shown to you")
        a, b = pair_models
        left, right = (a, b) if found.left_is_a else (b, a)
        now = _now()
        with self.engine.begin() as conn:
            done = conn.execute(
                update(assignments)
                .where(
                    assignments.c.token == token,
                    assignments.c.rater_id == rater_id,
                    assignments.c.answered_at.is_(None),
                )
                .values(answered_at=now)
            )
            if done.rowcount != 1:
                raise VoteRefused(409, "this pair is answered already")
            assignment_id = conn.execute(select(assignments.c.id).where(assignments.c.token == token)).scalar_one()
            conn.execute(
                insert(votes),
                [
                    {
                        "study_id": self.study_id,
                        "assignment_id": assignment_id,
                        "rater_id": rater_id,
                        "pair_id": found.pair_id,
                        "question": q,
                        "choice": answers[q],
                        "winner": {"left": left, "right": right}.get(answers[q]),
                        "left_model": left,
                        "created_at": now,
                    }
                    for q in questions
                ],
            )
        return len(questions)

    def all_votes(self) -> list[dict[str, Any]]:
        """Every vote of the study, oldest first, as plain dicts (the report's input)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    votes.c.rater_id,
                    votes.c.pair_id,
                    votes.c.question,
                    votes.c.choice,
                    votes.c.winner,
                    votes.c.left_model,
                    votes.c.created_at,
                )
                .where(votes.c.study_id == self.study_id)
                .order_by(votes.c.id)
            )
            return [dict(r._mapping) for r in rows]
