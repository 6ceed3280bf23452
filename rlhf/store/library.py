"""The response library in SQL through SQLAlchemy: SQLite by default (a path), any database URL works unchanged.

Tables
- prompts:      id, chat messages, where the prompt came from
- samples:      one response to a prompt: text, the model and round it came from, token count, finish reason;
                `key` makes writing idempotent (re-running a stage never duplicates a sample)
- annotators:   who ranks: a simulated evaluator, an AI judge, a user function, an importer, a person
- rankings:     one annotator's ranking of one task (a prompt's samples): tiers over indices into sample_ids,
                ties, "all bad", rationale, when; unique per (annotator, prompt, task_key)
- gold:         the simulated panel's mean utility of a sample: for evaluation only, never for training
- comparisons:  what `rlhf filter` selected for reward-model training: per task, (better, worse, strength) pairs

Every write is one transaction; on SQLite it begins IMMEDIATE (takes the write lock up front) and waits for a
busy database instead of failing, in WAL mode, so concurrent writers (annotators, the web app) lose nothing.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class PromptRow(Base):
    __tablename__ = "prompts"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    messages: Mapped[list] = mapped_column(JSON)  # [{"role", "content"}, ...] ending with the user's turn
    source: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SampleRow(Base):
    __tablename__ = "samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(1024), unique=True)  # idempotency: "r0|MODEL|PROMPT|3", "import|..."
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id"), index=True)
    model: Mapped[str] = mapped_column(String(1024))
    round: Mapped[int] = mapped_column(Integer, default=0, index=True)
    text: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(16))  # "eos", "length" (cut at max_new_tokens), "imported"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AnnotatorRow(Base):
    __tablename__ = "annotators"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # simulated, judge, function, import, human
    meta: Mapped[dict | None] = mapped_column(JSON)
    token_hash: Mapped[str | None] = mapped_column(String(255))  # people signing in to the web app
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RankingRow(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("annotator", "prompt_id", "task_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id"), index=True)
    annotator: Mapped[str] = mapped_column(ForeignKey("annotators.name"), index=True)
    task_key: Mapped[str] = mapped_column(String(1024))  # which set of samples: "r0", "import|FILE|LINE", ...
    sample_ids: Mapped[list] = mapped_column(JSON)  # the ranked samples; tiers index into this list
    tiers: Mapped[list] = mapped_column(JSON)  # best first, ties share a tier
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    rationale: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GoldRow(Base):
    __tablename__ = "gold"
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), primary_key=True)
    utility: Mapped[float] = mapped_column(Float)
    panel: Mapped[str] = mapped_column(String(1024))  # the panel config that defines this gold


class ComparisonRow(Base):
    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    selection: Mapped[str] = mapped_column(String(255), index=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id"), index=True)
    task_key: Mapped[str] = mapped_column(String(1024))
    sample_ids: Mapped[list] = mapped_column(JSON)
    pairs: Mapped[list] = mapped_column(JSON)  # [[better_index, worse_index, strength], ...] into sample_ids
    n_evaluators: Mapped[int] = mapped_column(Integer)


def database_url(library: str | Path) -> str:
    """A path means SQLite at that path; anything with '://' is a SQLAlchemy URL (postgresql://...)."""
    text = str(library)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser()}"


class Library:
    def __init__(self, library: str | Path):
        self.url = database_url(library)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(self.url, connect_args={"timeout": 60} if self.is_sqlite else {})
        if self.is_sqlite:
            _sqlite_transactions(self.engine)
        self._write_engine = self.engine.execution_options(sqlite_immediate=True)
        Base.metadata.create_all(self._write_engine)  # IMMEDIATE: two processes may open a new library at once

    @contextlib.contextmanager
    def read(self):
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextlib.contextmanager
    def write(self):
        """One transaction, committed on leaving the block (rolled back on error) before anything is acknowledged."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    # -- prompts and samples -------------------------------------------------------------------------------
    def add_prompts(self, prompts, source: str | None = None) -> int:
        """Insert prompts not yet in the library; a known id with different messages is an error. Returns #new."""
        new = 0
        with self.write() as s:
            existing = {p.id: p.messages for p in s.scalars(select(PromptRow))}
            for p in prompts:
                messages = [dict(m) for m in p.messages]
                if p.id in existing:
                    if existing[p.id] != messages:
                        raise ValueError(
                            f"prompt id {p.id!r} is already in the library with different text; give it another id"
                        )
                    continue
                s.add(PromptRow(id=p.id, messages=messages, source=source))
                existing[p.id] = messages
                new += 1
        return new

    def prompt_messages(self) -> dict[str, list]:
        with self.read() as s:
            return {p.id: p.messages for p in s.scalars(select(PromptRow))}

    def sample_keys(self, prefix: str = "") -> set[str]:
        with self.read() as s:
            return set(s.scalars(select(SampleRow.key).where(SampleRow.key.startswith(prefix, autoescape=True))))

    def samples(self, round: int | None = None) -> list[SampleRow]:
        with self.read() as s:
            q = select(SampleRow).order_by(SampleRow.id)
            if round is not None:
                q = q.where(SampleRow.round == round)
            return list(s.scalars(q))

    # -- annotators, rankings, gold ------------------------------------------------------------------------
    def ensure_annotator(self, session: Session, name: str, kind: str, meta: dict | None = None) -> None:
        if session.get(AnnotatorRow, name) is None:
            session.add(AnnotatorRow(name=name, kind=kind, meta=meta))
            session.flush()

    def ranked_tasks(self, annotator_prefix: str = "") -> set[tuple[str, str, str]]:
        """(annotator, prompt_id, task_key) of every ranking whose annotator name starts with the prefix."""
        with self.read() as s:
            rows = s.execute(select(RankingRow.annotator, RankingRow.prompt_id, RankingRow.task_key))
            return {tuple(r) for r in rows if r[0].startswith(annotator_prefix)}

    def rankings(self) -> list[RankingRow]:
        with self.read() as s:
            return list(s.scalars(select(RankingRow).order_by(RankingRow.id)))

    def gold(self) -> dict[int, float]:
        with self.read() as s:
            return {g.sample_id: g.utility for g in s.scalars(select(GoldRow))}

    def comparisons(self, selection: str = "default") -> list[ComparisonRow]:
        with self.read() as s:
            q = select(ComparisonRow).where(ComparisonRow.selection == selection).order_by(ComparisonRow.id)
            return list(s.scalars(q))

    def count(self, table) -> int:
        from sqlalchemy import func

        with self.read() as s:
            return s.scalar(select(func.count()).select_from(table))


def _sqlite_transactions(engine) -> None:
    """WAL + our own BEGIN: pysqlite's implicit transactions would take the write lock only at the first write,
    and a reader that then wants to write can fail at once with 'database is locked' instead of waiting."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged label survives power loss, not only a crash
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN")
