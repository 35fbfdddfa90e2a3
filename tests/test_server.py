"""`reprovision mlflow-server start` refuses what could not work, naming the fix, before it starts anything.

The servers themselves run in test_tracking_outage.py (the default, local one) and test_team_server.py
(PostgreSQL, S3 and a login)."""

from __future__ import annotations

import pytest

from reprovision.core import track
from reprovision.tools import cli, server


@pytest.fixture
def empty_repo(tmp_path, monkeypatch):
    for name in (server.ADMIN_USERNAME_ENV, server.ADMIN_PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_auth_without_the_admin_login_in_the_environment_starts_nothing(empty_repo, monkeypatch, capsys):
    assert cli.main(["mlflow-server", "start", "--auth"]) == 2
    error = capsys.readouterr().err
    assert "set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD" in error and "Nothing was started" in error
    assert not (empty_repo / track.SERVER_STATE).exists()
    monkeypatch.setenv(server.ADMIN_USERNAME_ENV, "admin")
    with pytest.raises(server.ServerError, match=r"set MLFLOW_AUTH_ADMIN_PASSWORD \("):
        server.start(empty_repo, auth=True)
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, "short")
    with pytest.raises(server.ServerError, match="MLFLOW_AUTH_ADMIN_PASSWORD is shorter than MLflow's minimum of 12"):
        server.start(empty_repo, auth=True)
    assert not (empty_repo / track.SERVER_STATE).exists()


def test_a_database_uri_without_its_driver_names_the_one_to_use(empty_repo):
    # SQLAlchemy's bare postgresql:// means psycopg2; the team extras install psycopg 3.
    with pytest.raises(server.ServerError, match=r"needs the Python module psycopg2.*postgresql\+psycopg://"):
        server.start(empty_repo, backend_store_uri="postgresql://mlflow@db.lan/mlflow")
    assert not (empty_repo / track.SERVER_STATE).exists()


def test_a_database_that_does_not_answer_is_reported_at_once_with_its_password_hidden(empty_repo):
    # MLflow itself would retry it for ~100 s before saying why.
    with pytest.raises(server.ServerError, match=r"postgres:\*\*\*@127\.0\.0\.1:1/mlflow: no connection \(.*refused"):
        server.start(empty_repo, backend_store_uri="postgresql+psycopg://postgres:secret@127.0.0.1:1/mlflow")
    assert not (empty_repo / track.SERVER_STATE).exists()
