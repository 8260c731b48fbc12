"""The results database's URL inside the stack, built from its Secrets Manager secret.

The Lambdas get the secret's ARN and the RDS Proxy host in their environment, never the
password (names.ENV_DB_SECRET_ARN, ENV_DB_HOST, ENV_DB_NAME): the value is fetched at run time
so a rotation needs no redeploy, and nothing secret shows in the console or the template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from chipscale import names
from chipscale.errors import ChipscaleError


class DatabaseSecretError(ChipscaleError):
    """The database secret is missing, unreadable or lacks a field."""


def url_from_secret(
    secret: Mapping[str, Any],
    *,
    host: str | None = None,
    dbname: str | None = None,
    sslmode: str = "require",
) -> str:
    """A ``postgresql://`` URL (TLS required unless ``sslmode`` says otherwise) from an
    RDS-style secret document.

    ``host`` replaces the secret's (the RDS Proxy endpoint instead of the instance), and
    ``dbname`` the database when the secret has none. The password is URL-encoded: generated
    passwords hold characters that would otherwise break the URL.
    """
    missing = [key for key in ("username", "password") if not secret.get(key)]
    host = host or secret.get("host")
    dbname = dbname or secret.get("dbname")
    if not host:
        missing.append("host")
    if not dbname:
        missing.append("dbname")
    if missing:
        raise DatabaseSecretError(f"the database secret lacks {', '.join(missing)}")
    user = quote(str(secret["username"]), safe="")
    password = quote(str(secret["password"]), safe="")
    port = int(secret.get("port") or 5432)
    return f"postgresql://{user}:{password}@{host}:{port}/{quote(str(dbname))}?sslmode={sslmode}"


def url_from_environment(secrets_client: Any, env: Mapping[str, str] = os.environ) -> str:
    """The database URL of the stack this Lambda runs in (see the module docstring); libpq's
    own ``PGSSLMODE`` may relax TLS for a local database without it (tests)."""
    arn = env.get(names.ENV_DB_SECRET_ARN)
    if not arn:
        raise DatabaseSecretError(f"{names.ENV_DB_SECRET_ARN} is not set")
    try:
        value = secrets_client.get_secret_value(SecretId=arn)["SecretString"]
        secret = json.loads(value)
    except (KeyError, ValueError) as exc:
        raise DatabaseSecretError(f"the database secret {arn} is not a JSON document") from exc
    except Exception as exc:  # botocore ClientError: name it without the payload
        raise DatabaseSecretError(f"cannot read the database secret {arn}: {exc}") from exc
    if not isinstance(secret, dict):
        raise DatabaseSecretError(f"the database secret {arn} is not a JSON object")
    return url_from_secret(
        secret,
        host=env.get(names.ENV_DB_HOST) or None,
        dbname=env.get(names.ENV_DB_NAME) or None,
        sslmode=env.get("PGSSLMODE", "require"),
    )
