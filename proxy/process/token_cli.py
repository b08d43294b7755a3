"""`inference-gateway token login|get|logout`: a researcher's Globus access token for the gateway.

Globus's native-app login (authorization code with PKCE, no client secret): `login` prints a URL, the
researcher signs in with their browser and pastes the code it shows; the access and refresh tokens go to
`~/.globus/app/{client id}/{app name}/tokens.json` (mode 0600), where globus-sdk's own apps keep theirs.
With the existing gateway's public client id and app name (`inference_app`), the file is the one its
`inference_auth_token.py` writes, so a researcher who logged in with that script need not log in again.
`get` prints a valid access token, refreshing it when it expires within a minute: scripts call it for
each run (`OPENAI_API_KEY=$(inference-gateway token get)`). `logout` revokes both tokens at Globus and
deletes them.

The site publishes two values, given as options or in the environment: the public client id of the
login app (`INFERENCE_GATEWAY_CLIENT_ID`) and the gateway's scope (`INFERENCE_GATEWAY_SCOPE`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import globus_sdk
from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData

from proxy.process.command_line import Subparsers

DEFAULT_APP_NAME = "inference_app"
REFRESH_MARGIN_SECONDS = 60
"""A token that expires sooner is refreshed first, so the request that uses it does not fail halfway."""


class TokenError(Exception):
    """What the researcher should do next; printed as one line, exit status 1."""


_ACTIONS = {
    "login": "log in with a browser (unless the stored tokens are still valid) and store the tokens",
    "get": "print a valid access token, refreshed first when it expires within a minute",
    "logout": "revoke both tokens at Globus and delete them",
}


def add_parser(subparsers: Subparsers) -> None:
    """`token` and its actions, `token login|get|logout`, each a command with its own `--help`. The
    options are taken before the action's name as well as after it."""
    parser = subparsers.add_parser(
        "token", help="log in to Globus and print access tokens for the gateway", description=__doc__
    )
    _add_options(parser)
    actions = parser.add_subparsers(dest="action", required=True, title="actions")
    for action, summary in _ACTIONS.items():
        _add_options(actions.add_parser(action, help=summary, description=summary), inherited=True)
    parser.set_defaults(run=run)


def _add_options(parser: argparse.ArgumentParser, inherited: bool = False) -> None:
    """An action's own options leave the value alone when not given (the defaults are the `token`
    parser's), so that they count wherever they are written."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if inherited else value

    parser.add_argument(
        "--client-id",
        default=default(os.environ.get("INFERENCE_GATEWAY_CLIENT_ID")),
        help="public client id of the site's login app (env INFERENCE_GATEWAY_CLIENT_ID)",
    )
    parser.add_argument(
        "--scope",
        default=default(os.environ.get("INFERENCE_GATEWAY_SCOPE")),
        help="the gateway's scope, https://auth.globus.org/scopes/<gateway client id>/action_all "
        "(env INFERENCE_GATEWAY_SCOPE)",
    )
    parser.add_argument("--app-name", default=default(DEFAULT_APP_NAME), help="names the token file's folder")
    parser.add_argument(
        "--force",
        action="store_true",
        default=default(False),
        help="login: log in again even with valid tokens",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if not args.client_id or not args.scope:
            raise TokenError(
                "set INFERENCE_GATEWAY_CLIENT_ID and INFERENCE_GATEWAY_SCOPE (or --client-id and --scope) "
                "to the values your site publishes"
            )
        tokens = Tokens(args.client_id, args.scope, args.app_name)
        if args.action == "login":
            tokens.login(force=args.force)
            print(f"logged in; tokens are in {tokens.path}", file=sys.stderr)
        elif args.action == "get":
            print(tokens.access_token())
        else:
            tokens.logout()
            print("logged out; the tokens were revoked and deleted", file=sys.stderr)
    except TokenError as exc:
        print(f"inference-gateway token {args.action}: {exc}", file=sys.stderr)
        return 1
    except globus_sdk.GlobusAPIError as exc:
        print(
            f"inference-gateway token {args.action}: Globus refused: {exc.code} {exc.message}",
            file=sys.stderr,
        )
        return 1
    return 0


def token_file(client_id: str, app_name: str) -> Path:
    """Where globus-sdk's apps keep a user's tokens (production environment, Linux and macOS)."""
    return Path.home() / ".globus" / "app" / client_id / app_name / "tokens.json"


class Tokens:
    def __init__(self, client_id: str, scope: str, app_name: str) -> None:
        self.path = token_file(client_id, app_name)
        self._scope = scope
        self._client = globus_sdk.NativeAppAuthClient(client_id)
        self._storage = JSONTokenStorage(self.path, namespace="DEFAULT")

    def login(self, *, force: bool) -> None:
        if not force and self._stored() is not None:
            try:
                self.access_token()
                return
            except TokenError:
                pass
        self._client.oauth2_start_flow(requested_scopes=self._scope, refresh_tokens=True)
        print("Open this URL, sign in, and paste the authorization code it shows:", file=sys.stderr)
        print(self._client.oauth2_get_authorize_url(), file=sys.stderr)
        print("Authorization code: ", end="", file=sys.stderr, flush=True)
        code = sys.stdin.readline().strip()
        if not code:
            raise TokenError("no authorization code was entered")
        self._store(self._client.oauth2_exchange_code_for_tokens(code))

    def access_token(self) -> str:
        stored = self._stored()
        if stored is None:
            raise TokenError("not logged in: run `inference-gateway token login`")
        if stored.expires_at_seconds - REFRESH_MARGIN_SECONDS > time.time():
            return stored.access_token
        if not stored.refresh_token:
            raise TokenError("the token expired and cannot be refreshed: run `inference-gateway token login`")
        try:
            self._store(self._client.oauth2_refresh_token(stored.refresh_token))
        except globus_sdk.AuthAPIError as exc:
            if exc.http_status in (400, 401):
                raise TokenError(
                    "Globus no longer accepts the login: run `inference-gateway token login`"
                ) from None
            raise
        refreshed = self._stored()
        if refreshed is None:
            raise TokenError("Globus's answer held no token for the gateway's scope")
        return refreshed.access_token

    def logout(self) -> None:
        for data in self._storage.get_token_data_by_resource_server().values():
            for token in (data.refresh_token, data.access_token):
                if token:
                    self._client.oauth2_revoke_token(token)
            self._storage.remove_token_data(data.resource_server)
        self.path.unlink(missing_ok=True)

    def _stored(self) -> TokenStorageData | None:
        """The stored token that carries the gateway's scope, whichever resource server it names."""
        if not self.path.exists():
            return None
        for data in self._storage.get_token_data_by_resource_server().values():
            if self._scope in data.scope.split():
                return data
        return None

    def _store(self, response: globus_sdk.OAuthTokenResponse) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._storage.store_token_response(response)  # globus-sdk writes it readable by the owner only
