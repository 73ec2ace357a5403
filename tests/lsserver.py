"""A throwaway Label Studio server for the integration tests (``make labelstudio`` installs it in .venv-ls/)."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import REPO, free_port

LS_BIN = REPO / ".venv-ls" / "bin" / "label-studio"
USERNAME, PASSWORD = "segkit@example.com", "segkit-test-pass"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # a legacy DRF token: at most 40 characters


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    document_root: Path
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(data_dir: Path, document_root: Path, timeout: float = 300) -> Server:
    """Start Label Studio on a free port of 127.0.0.1 with a fresh SQLite database; wait for /health/."""
    port = free_port()
    env = {**os.environ,
           "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
           "LABEL_STUDIO_USERNAME": USERNAME, "LABEL_STUDIO_PASSWORD": PASSWORD,
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
           "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
           # tests only: let Label Studio call an ML backend on 127.0.0.1
           "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false"}
    env.pop("LABEL_STUDIO_API_KEY", None)
    log = data_dir / "label-studio.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=data_dir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Label Studio exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health/", timeout=2).status_code == 200:
                return Server(url, process, document_root, log)
        except httpx.TransportError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"Label Studio did not answer /health/ within {timeout:.0f} s; see {log}")
