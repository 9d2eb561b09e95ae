"""The store's projects: create one (its owner its first member), add members, close it.

A project's status moves only along ``decisions.PROJECT_TRANSITIONS``; a closed project keeps
its history and takes no new members.
"""

from __future__ import annotations

from sqlalchemy import Connection, exists, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from foundation.errors import NotFoundError, PolicyDenied, SpecError
from policies.db import project_members, projects
from policies.decisions import ProjectStatus, ProjectView, check_project_transition
from policies.store_base import StoreBase, check_name, check_text, known_names
from policies.store_records import ProjectRecord
from policies.store_users import active_user


def load_project(conn: Connection, name: str) -> ProjectRecord:
    row = conn.execute(select(projects).where(projects.c.name == name)).first()
    if row is None:
        known = conn.execute(select(projects.c.name)).scalars().all()
        raise NotFoundError(f"unknown project {name!r}; known projects: {known_names(known)}")
    members = (
        conn.execute(
            select(project_members.c.member)
            .where(project_members.c.project == name)
            .order_by(project_members.c.member)
        )
        .scalars()
        .all()
    )
    return ProjectRecord(
        row.name,
        row.purpose,
        row.owner,
        ProjectStatus(row.status),
        tuple(members),
        row.created_at,
    )


class ProjectsMixin(StoreBase):
    """``StateStore``'s project methods (the ``projects`` and ``project_members`` tables)."""

    def create_project(self, name: str, purpose: str, owner: str) -> ProjectRecord:
        """Create an active project; ``owner`` (an active user) becomes its first member."""
        check_name("name", name)
        purpose = check_text("purpose", purpose, "say in a sentence what the project is for")
        taken = SpecError("name", f"project {name!r} already exists", "pick another name")
        try:
            with self.engine.begin() as conn:
                active_user(conn, owner, "owner")
                if conn.execute(select(exists().where(projects.c.name == name))).scalar():
                    raise taken
                now = self._now()
                conn.execute(
                    projects.insert().values(
                        name=name,
                        purpose=purpose,
                        owner=owner,
                        status=ProjectStatus.ACTIVE.value,
                        created_at=now,
                    )
                )
                conn.execute(
                    project_members.insert().values(
                        project=name, member=owner, added_by=owner, added_at=now
                    )
                )
                return load_project(conn, name)
        except DBIntegrityError:
            raise taken from None

    def add_member(self, project: str, user: str, by: str) -> ProjectRecord:
        """Add an active user to an active project (adding a member twice changes nothing)."""
        with self.engine.begin() as conn:
            rec = load_project(conn, project)
            if rec.status != ProjectStatus.ACTIVE:
                raise PolicyDenied(
                    f"project {project} is {rec.status.value}; it takes no new members"
                )
            active_user(conn, user, "user")
            if user not in rec.members:
                conn.execute(
                    project_members.insert().values(
                        project=project, member=user, added_by=by, added_at=self._now()
                    )
                )
            return load_project(conn, project)

    def close_project(self, name: str) -> ProjectRecord:
        """Close an active project: it keeps its history and can run nothing more."""
        with self.engine.begin() as conn:
            rec = load_project(conn, name)
            check_project_transition(name, rec.status, ProjectStatus.CLOSED)
            conn.execute(
                projects.update()
                .where(projects.c.name == name)
                .values(status=ProjectStatus.CLOSED.value)
            )
            return load_project(conn, name)

    def get_project(self, name: str) -> ProjectRecord:
        with self.engine.connect() as conn:
            return load_project(conn, name)

    def list_projects(self, user: str | None = None) -> list[ProjectRecord]:
        """All projects, or those ``user`` is a member of."""
        query = select(projects.c.name).order_by(projects.c.name)
        if user is not None:
            query = query.where(
                projects.c.name.in_(
                    select(project_members.c.project).where(project_members.c.member == user)
                )
            )
        with self.engine.connect() as conn:
            names = conn.execute(query).scalars().all()
            return [load_project(conn, n) for n in names]

    def project_view(self, name: str) -> ProjectView:
        return self.get_project(name).view()
