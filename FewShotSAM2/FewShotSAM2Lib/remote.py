"""Run on: this computer | a `fewshotsam2 serve` server. The module's one place for the remote choice.

The segmentation process is the same command line either way; with a server it gets `--server URL` and the token
in its environment ($FEWSHOTSAM2_SERVER_TOKEN: never on a command line, never in a file of the job folder). The
URL and the token live in Slicer's user settings (the application's userSettings, group FewShotSAM2/), never in the
scene: a saved or shared scene carries no token. Qt-free, as every Lib module: the panel (`FewShotSAM2RemotePanel`
in FewShotSAM2.py, the Qt side) is built in code (no .ui change) and added below the module's form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SETTINGS_GROUP = "FewShotSAM2/"
TOKEN_ENV = "FEWSHOTSAM2_SERVER_TOKEN"  # = fewshotsam2.serve.auth.TOKEN_ENV (not imported: Slicer-side stays light)


@dataclass(frozen=True)
class Server:
    url: str
    token: str

    def arguments(self) -> list[str]:
        return ["--server", self.url]

    def environment(self) -> dict:
        return {TOKEN_ENV: self.token}


def serverFromChoice(runOn: str, url: str, token: str) -> Optional[Server]:
    """The server to use, None for this computer; ValueError with a message for people when the choice is incomplete."""
    if runOn != "server":
        return None
    url, token = url.strip(), token.strip()
    if not url.startswith(("http://", "https://")):
        raise ValueError("Run on server: give the server's address as https://HOST:PORT (or http://127.0.0.1:PORT).")
    if not token:
        raise ValueError("Run on server: give the token the server's administrator gave you.")
    return Server(url, token)


def checkServer(server: Server) -> str:
    """One line on the server: its version and device, or why it cannot be used (unreachable, token, versions)."""
    from fewshotsam2.serve.client import Client, check_compatible

    client = Client(server.url, server.token, timeout=10)
    version = client.version()
    check_compatible(version, client.url)
    return (f"fewshotsam2 {version.get('fewshotsam2')} on {version.get('device')}, {version.get('replicas')} "
            f"replica(s), {version.get('queued', 0)} job(s) waiting")
