"""`must-keys`: create, list and revoke the API keys stored in the job database.

The services read stored keys on each request (remembered for MUST_API_KEY_CACHE_SECONDS), so a
new or revoked key takes effect without a restart:

    must-keys create --tenant acme --name "acme CI"     # prints the key once
    must-keys list [--tenant acme] [--all]
    must-keys revoke KEY_ID

The database is MUST_DATABASE__URL's (or --database-url). Env-var keys (MUST_API_KEYS,
MUST_ADMIN_API_KEYS) keep working beside stored ones.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.auth import keys
from services.config import Settings
from services.db.models import ApiKey
from services.db.session import make_engine, make_session_factory
from services.errors import InvalidRequest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="must-keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="default: MUST_DATABASE__URL")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a key for a tenant and print it (shown only once)")
    create.add_argument("--tenant", required=True, help="the project the key acts for, e.g. acme")
    create.add_argument("--name", help="a note to tell keys apart, e.g. 'acme CI'")
    create.add_argument("--admin", action="store_true", help="the key sees and acts on every tenant's jobs")
    listing = commands.add_parser("list", help="list stored keys (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    return parser


def _describe(row: ApiKey) -> dict[str, object]:
    return {
        "id": row.id,
        "tenant": row.tenant,
        "name": row.name,
        "prefix": row.prefix,
        "admin": row.admin,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Run one key command; exit status 0 done, 1 no such key, 2 bad arguments."""
    args = _parser().parse_args(argv)
    url = args.database_url or Settings().database.url
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            if args.command == "create":
                row, key = keys.create_key(session, tenant=args.tenant, name=args.name, admin=args.admin)
                print(json.dumps(_describe(row) | {"key": key}))
                print("store the key now: it cannot be shown again", file=sys.stderr)
            elif args.command == "list":
                for row in keys.list_keys(session, tenant=args.tenant, include_revoked=args.all):
                    print(json.dumps(_describe(row)))
            elif not keys.revoke_key(session, args.key_id):
                print(f"no live key has the id {args.key_id!r}", file=sys.stderr)
                return 1
            else:
                print(f"revoked {args.key_id}", file=sys.stderr)
    except InvalidRequest as exc:
        print(exc.message, file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
